"""Fusing members that live on different ranks.

NT-recursive follows the same pairwise tree as the single-process
`fuse(models, schedule="recursive")`: in each round the holders of a pair meet
(the right holder sends its model as flat tensors to the left holder, who fuses
with `fuse_pair`), an odd model out passes up unchanged, and the root's result is
broadcast to every rank. Without repair each rank sends at most one model per round. With repair,
every rank of the pair's members gets both models (`spread`) and fuses the pair, and
the repair's sums over each rank's own calibration inputs are added by one all-reduce
per layer in that subgroup (`summed_over`), so the step fits on all their inputs. Weight
averaging is one all-reduce (`reduce_average`); OT broadcasts its anchor (member
0), each holder aligns its own members to it, and the same all-reduce averages
(`ot_reduce`). Every other method gathers the members on rank 0, fuses there and
broadcasts.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ntdist.distributed.comm import (broadcast_model, destroy_groups, gather_models, meta_template, new_groups,
                                     recv_model, send_model)
from ntdist.distributed.devices import comm_device
from ntdist.distributed.world import World, on_comm_device
from ntdist.fusion import NTOptions, average, fuse, fuse_pair
from ntdist.fusion.checks import check_models
from ntdist.fusion.analysis.graph import analyze
from ntdist.fusion.repair import Reduce, packed, unpacked
from ntdist.fusion.ot import align_to
from ntdist.fusion.schedule import recursive_plan


def fusion_device(world: World) -> torch.device:
    """Where members are fused: the training device alone, else the device models travel on (`comm_device`:
    the GPU under NCCL, the CPU under gloo, also on a GPU machine that chose gloo)."""
    return world.device if world.size == 1 else comm_device(world)


def step_ranks(holders: List[int], size: int, first: int, leaves: int) -> List[int]:
    """The ranks of the members `first` .. `first + leaves - 1`: their holders and, where a group of ranks trained
    a member (more ranks than members), that whole group. The ranks that repair a pairwise step together."""
    last = first + leaves - 1
    after = holders[last + 1] if last + 1 < len(holders) else size
    return list(range(holders[first], max(after, holders[last] + 1)))


def spread(owners: List[int], ranks: List[int]) -> List[List[Tuple[int, int]]]:
    """Stages of (source, destination) sends that copy a model from `owners` to every rank of `ranks`: each owner
    sends to one rank per stage, and a rank that received sends in the next (as a broadcast tree does)."""
    have, waiting, stages = sorted(owners), [r for r in ranks if r not in owners], []
    while waiting:
        stage = list(zip(have, waiting))
        waiting = waiting[len(stage):]
        have = sorted(have + [dst for _, dst in stage])
        stages.append(stage)
    return stages


def summed_over(world: World, group) -> Reduce:
    """The repair's reduction across `group`: each layer's sums added over its ranks by one all-reduce (on the
    comm device)."""
    def reduce(normal):
        flat = packed(normal)
        on_comm_device(world, dist.all_reduce, flat, group=group)
        return unpacked(flat, normal)
    return reduce


def tree_fuse(world: World, held: Dict[int, torch.nn.Module], holders: List[int],
              make_template: Callable[[], torch.nn.Module], options: NTOptions, example_inputs=None,
              merged: Optional[dict] = None, sent: Optional[List[int]] = None, calibration=None,
              notes: Optional[List[str]] = None) -> torch.nn.Module:
    """NT-recursive across ranks with `options`; returns the fused model on every rank.

    `held` maps member index -> model for the members this rank holds; `holders[i]`
    is the rank holding member i. A subtree is named by its leftmost member. Without
    repair a pair is fused by its left holder alone, to which the right holder sends its
    model. With repair (`options.repairs(calibration)`) every rank of the pair's members
    (`step_ranks`) gets both models and fuses the pair, and the repair's sums are added over
    those ranks (`summed_over`): `calibration` is this rank's own share of the inputs, and
    the step is repaired on the shares of all its ranks, as one process with all of them would.
    `merged` receives this rank's dedup merge counts (as in `fuse_pair`); `sent`, when
    given, the number of models this rank sent in each round; `notes` the layers the
    repair left as pruned (each once).
    """
    repairs = options.repairs(calibration)
    reference = meta_template(make_template)   # original width, the pruning's target: its shapes only, no memory
    plan = None                                # the same data-flow plan the single-process fuse uses
    models, owners = dict(held), {i: [h] for i, h in enumerate(holders)}
    rounds = [[(left, right, leaves_left, leaves_right,
                step_ranks(holders, world.size, left, leaves_left + leaves_right) if repairs else [holders[left]])
               for left, right, leaves_left, leaves_right in steps] for steps in recursive_plan(len(holders))]
    shared = list(dict.fromkeys(tuple(ranks) for steps in rounds for *_, ranks in steps if len(ranks) > 1))
    groups = dict(zip(shared, new_groups(world, [list(ranks) for ranks in shared]).values()))
    try:
        for steps in rounds:
            moves = [(src, dst, part) for left, right, _, _, ranks in steps for part in (left, right)
                     for stage in spread(owners[part], ranks) for src, dst in stage]
            sends = 0
            for src, dst, part in moves:      # every rank walks the same list in order: no two wait on each other
                if world.rank == src:
                    send_model(world, models[part], dst)
                    sends += 1
                elif world.rank == dst:
                    # a received model is allocated on the comm device, which is the fusion device
                    models[part] = recv_model(world, meta_template(make_template), src)
            for left, right, leaves_left, leaves_right, ranks in steps:
                a, b = models.pop(left, None), models.pop(right, None)
                owners[left] = ranks
                if world.rank not in ranks:
                    continue
                plan = plan or analyze(a, example_inputs)   # traced on a member: same architecture
                reduce = summed_over(world, groups[tuple(ranks)]) if len(ranks) > 1 else None
                models[left] = fuse_pair(a, b, leaves_left, leaves_right, options=options, reference=reference,
                                         plan=plan, example_inputs=example_inputs, merged=merged,
                                         calibration=calibration, notes=notes, reduce=reduce)
            if sent is not None:
                sent.append(sends)
            world.wait_for("a round of the fusion tree")   # the next round's receivers wait for this round's fusions
    finally:
        destroy_groups(groups)
    root = holders[0]
    result = models[0] if world.rank == root else meta_template(make_template)
    return broadcast_model(world, result, root)


def gather_fuse(world: World, held: Dict[int, torch.nn.Module], holders: List[int],
                make_template: Callable[[], torch.nn.Module], **fuse_args) -> torch.nn.Module:
    """Gather all members on rank 0, `fuse(...)` there, broadcast the result."""
    gathered = gather_models(world, held, holders, make_template, root=0)
    if world.is_main:
        fused = fuse([gathered[i].to(fusion_device(world)) for i in range(len(holders))], **fuse_args)
    else:
        fused = meta_template(make_template)
    world.wait_for(f"fusing {len(holders)} members on rank 0")
    return broadcast_model(world, fused, 0)


@torch.no_grad()
def reduce_average(world: World, held: Dict[int, torch.nn.Module], holders: List[int],
                   make_template: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Uniform weight averaging of all members as one all-reduce; the average on every rank (on the fusion device).

    What `average` computes for all k members: each float tensor is the sum of member / k (each rank adds
    its own members, then the ranks add their sums), step counters take the maximum, other integer tensors
    are member 0's. Sums over ranks may round differently from one process's sum, by an ulp.
    """
    k = len(holders)
    if world.size == 1:
        return average([held[i] for i in range(k)])
    result, device = meta_template(make_template), fusion_device(world)
    result = result.to_empty(device=device) if any(t.is_meta for t in result.state_dict().values()) \
        else result.to(device)
    mine = [held[i].state_dict() for i in sorted(held)]
    for name, out in result.state_dict().items():
        if out.is_floating_point():
            out.zero_()
            for state in mine:
                out.add_(state[name].to(out.device), alpha=1.0 / k)
            op = dist.ReduceOp.SUM
        elif name.endswith("num_batches_tracked"):
            out.copy_(max((state[name] for state in mine), default=torch.zeros_like(out, device="cpu")))
            op = dist.ReduceOp.MAX
        else:
            out.copy_(held[0].state_dict()[name] if 0 in held else torch.zeros_like(out))
            op = dist.ReduceOp.SUM
        on_comm_device(world, dist.all_reduce, out, op=op)
    return result


@torch.no_grad()
def ot_reduce(world: World, held: Dict[int, torch.nn.Module], holders: List[int],
              make_template: Callable[[], torch.nn.Module], example_inputs=None, ot_mode: str = "weights",
              ot_reg: float = 0.0) -> torch.nn.Module:
    """What `fuse(members, method="ot", ot_mode=..., ot_reg=...)` computes, without gathering the members: member 0 (the anchor) is
    broadcast, each rank aligns the members it holds to it, and `reduce_average` sums the aligned weights
    over the ranks in one all-reduce. A rank holds its members, the anchor and its members' aligned copies.
    The alignments (POT's solver on the host, minutes for wide models) run on the holders alone: the other
    ranks wait for them under distributed.wait_timeout_s before the all-reduce, not under its timeout."""
    anchor = held[0] if 0 in held else meta_template(make_template)
    anchor = broadcast_model(world, anchor, holders[0]).to(fusion_device(world))
    aligned = {}
    if held:   # a rank that holds no member only joins the broadcast and the sum
        check_models([anchor, *held.values()], min_count=1)
        plan = analyze(anchor, example_inputs)
        aligned = {i: model if i == 0 else align_to(anchor, model, plan, ot_mode, ot_reg, example_inputs)
                   for i, model in held.items()}
    world.wait_for("aligning their members to OT's anchor")
    return reduce_average(world, aligned, holders, make_template)
