"""The distillation teacher: the output average of the k members, whole on every rank or sharded over the ranks.

Whole (`finetune.teacher_shard=off`): every rank receives all k members and runs them on its own batch, so each
rank holds k models (with ResNet-18, k=16 and 64 GPUs: 16 copies per GPU).

Sharded (`on`, and `auto` with several ranks): rank r keeps only the members it trained,
`MemberLayout.members_of(r)`: its block of members when W < k (the ones it holds), its group's member when
W >= k (received once from the holder), so at most ceil(k/W) models. For every fine-tuning batch:
1. one all-gather of every rank's inputs, each padded to `capacity` rows (the loader's batch size, which no
   batch exceeds): a rank never needs another's batch size, so there is no host synchronisation;
2. each rank runs its members on the gathered chunks it covers: all W chunks when W <= k; when g = W/k ranks
   share a member, the g of them split the chunks (rank j of the group takes chunks j, j+g, ...), so every
   rank runs k chunks whatever W is;
3. one reduce-scatter sums the (W, capacity, classes) logits over the ranks and leaves each rank its own
   chunk; its first n rows / k are the teacher's output for its batch (padding rows are computed, never used).
Two collectives per call, so every rank must call the teacher once per training batch, in step: the
data-parallel loop does (the sampler gives every rank the same number of batches, a resumed epoch starts
all ranks at the same batch, evaluation never calls the teacher).
"""

from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn

from ntdist.distributed.comm import gather_models, meta_template, recv_model, send_model
from ntdist.distributed.devices import comm_device
from ntdist.distributed.layout import MemberLayout
from ntdist.distributed.world import World, guarded
from ntdist.fusion import Ensemble

TEACHER_SHARD = ("auto", "on", "off")   # finetune.teacher_shard


class ShardedTeacher(nn.Module):
    """This rank's share of the teacher (`members`: member index -> model); `forward(x)` is a collective
    that returns the mean of all k members' logits on this rank's `x` (at most `capacity` rows)."""

    def __init__(self, world: World, layout: MemberLayout, members: Dict[int, nn.Module], capacity: int):
        super().__init__()
        self.world, self.num_members, self.capacity = world, layout.num_members, capacity
        self.indices = sorted(members)
        self.members = nn.ModuleList(members[i] for i in self.indices)
        group = layout.group_size
        # the gathered chunks this rank covers, as a slice: indexing with a list would copy it to the GPU per call
        self.chunks = slice(world.rank % group, world.size, group)
        self.wire = comm_device(world)   # gloo gathers and scatters CPU tensors only

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, size = x.shape[0], self.world.size
        if n > self.capacity:
            raise ValueError(f"a batch of {n} rows exceeds the sharded teacher's capacity of {self.capacity}")
        padded = x.new_zeros((self.capacity,) + tuple(x.shape[1:]), device=self.wire if size > 1 else x.device)
        padded[:n] = x
        gathered = padded.new_empty((size * self.capacity,) + tuple(x.shape[1:]))
        if size > 1:
            guarded(dist.all_gather_single, gathered, padded)
        else:
            gathered.copy_(padded)
        mine = gathered.view(size, self.capacity, *x.shape[1:])[self.chunks].flatten(0, 1).to(x.device)
        summed = None
        for model in self.members:
            y = model(mine).float()   # summed in float32 also under bf16/fp16 autocast
            summed = y if summed is None else summed + y
        logits = summed.new_zeros((size, self.capacity) + tuple(summed.shape[1:]))
        logits[self.chunks] = summed.view(-1, self.capacity, *summed.shape[1:])
        if size > 1:
            logits = logits.to(self.wire)
            own = logits.new_empty(logits.shape[1:])
            guarded(dist.reduce_scatter_single, own, logits.flatten(0, 1))
        else:
            own = logits[0].clone()
        return own[:n].to(x.device) / self.num_members


def share_members(world: World, layout: MemberLayout, held: Dict[int, nn.Module],
                  make_template) -> Dict[int, nn.Module]:
    """The members `world.rank` trained, as models on this rank: its own held ones, and when g ranks trained a
    member, that member sent by its holder to the g-1 other ranks of its group (in the same order on all ranks)."""
    mine: Dict[int, nn.Module] = {i: held[i] for i in layout.held_by(world.rank)}
    for member in range(layout.num_members):
        holder, group = layout.holder(member), layout.group_ranks(member)
        for rank in group[1:]:
            if world.rank == holder:
                send_model(world, held[member], rank)
            elif world.rank == rank:
                mine[member] = recv_model(world, meta_template(make_template), holder).to(world.device)
    return mine


def use_sharded(setting: str, world_size: int) -> bool:
    """Whether `finetune.teacher_shard` = `setting` shards the teacher on `world_size` ranks."""
    return setting == "on" or (setting == "auto" and world_size > 1)


def whole_teacher(world: World, layout: MemberLayout, held: Dict[int, nn.Module], make_template) -> Ensemble:
    """All k members on every rank (k broadcasts), outputs averaged."""
    members = gather_models(world, {i: m.cpu() for i, m in held.items()}, layout.holders, make_template, root=None)
    return Ensemble([members[i] for i in range(layout.num_members)])


def member_bytes(models: List[nn.Module]) -> int:
    """Bytes of the parameters and buffers of `models` (what a teacher keeps in memory)."""
    return sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
