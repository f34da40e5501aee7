"""Fusing members that live on different ranks.

NT-recursive follows the same pairwise tree as the single-process
`fuse(models, schedule="recursive")`: in each round the holders of a pair meet
(the right holder sends its model as flat tensors to the left holder, who fuses
with `fuse_pair`), an odd model out passes up unchanged, and the root's result is
broadcast to every rank. Each rank sends at most one model per round. Weight
averaging is one all-reduce (`reduce_average`); OT broadcasts its anchor (member
0), each holder aligns its own members to it, and the same all-reduce averages
(`ot_reduce`). Every other method gathers the members on rank 0, fuses there and
broadcasts.
"""

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ntdist.distributed.comm import broadcast_model, gather_models, meta_template, recv_model, send_model
from ntdist.distributed.devices import comm_device
from ntdist.distributed.world import World, on_comm_device
from ntdist.fusion import NTOptions, average, fuse, fuse_pair
from ntdist.fusion.checks import check_models
from ntdist.fusion.analysis.graph import analyze
from ntdist.fusion.ot import align_to
from ntdist.fusion.schedule import recursive_plan


def fusion_device(world: World) -> torch.device:
    """Where members are fused: the training device alone, else the device models travel on (`comm_device`:
    the GPU under NCCL, the CPU under gloo, also on a GPU machine that chose gloo)."""
    return world.device if world.size == 1 else comm_device(world)


def tree_fuse(world: World, held: Dict[int, torch.nn.Module], holders: List[int],
              make_template: Callable[[], torch.nn.Module], options: NTOptions, example_inputs=None,
              merged: Optional[dict] = None, sent: Optional[List[int]] = None, calibration=None) -> torch.nn.Module:
    """NT-recursive across ranks with `options`; returns the fused model on every rank.

    `held` maps member index -> model for the members this rank holds; `holders[i]`
    is the rank holding member i. A subtree is named by its leftmost member and stays
    with that member's holder. `merged` receives this rank's dedup merge counts (as in
    `fuse_pair`); `sent`, when given, the number of models this rank sent in each round; each
    pairwise step repairs against its own pair on `calibration` (every rank holds the same inputs).
    """
    reference = meta_template(make_template)   # original width, the pruning's target: its shapes only, no memory
    plan = None                                # the same data-flow plan the single-process fuse uses
    models = dict(held)
    for steps in recursive_plan(len(holders)):
        sends = 0
        for left, right, leaves_left, leaves_right in steps:
            src, dst = holders[right], holders[left]
            if world.rank == src and src != dst:
                send_model(world, models.pop(right), dst)
                sends += 1
            if world.rank == dst:
                # a received model is allocated on the comm device, which is the fusion device
                other = models.pop(right) if src == dst else recv_model(world, meta_template(make_template), src)
                plan = plan or analyze(models[left], example_inputs)   # traced on a member: same architecture
                models[left] = fuse_pair(models[left], other, leaves_left, leaves_right, options=options,
                                         reference=reference, plan=plan, example_inputs=example_inputs,
                                         merged=merged, calibration=calibration)
        if sent is not None:
            sent.append(sends)
        world.wait_for("a round of the fusion tree")   # the next round's receivers wait for this round's fusions
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
