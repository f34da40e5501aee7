"""Fusing members that live on different ranks.

NT-recursive follows the same pairwise tree as the single-process
`fuse(models, schedule="recursive")`: in each round the holders of a pair meet
(the right holder sends its model as flat tensors to the left holder, who fuses
with `fuse_pair`), an odd model out passes up unchanged, and the root's result is
broadcast to every rank. Each rank sends at most one model per round. Every
other method gathers the members on rank 0, fuses there and broadcasts.
"""

from typing import Callable, Dict, List

import torch

from ntdist.dist.comm import broadcast_model, gather_models, recv_model, send_model
from ntdist.dist.world import World
from ntdist.fusion import fuse, fuse_pair, recursive_pairs


def _advance(slots: List[tuple], pairs: List[tuple]) -> List[tuple]:
    """Slots (holder, leaves) after one round: the fused pairs in order, then any model left out."""
    paired = {i for pair in pairs for i in pair}
    return [(slots[a][0], slots[a][1] + slots[b][1]) for a, b in pairs] + \
           [slot for i, slot in enumerate(slots) if i not in paired]


def tree_fuse(world: World, held: Dict[int, torch.nn.Module], holders: List[int],
              make_template: Callable[[], torch.nn.Module], **options) -> torch.nn.Module:
    """NT-recursive across ranks; returns the fused model on every rank.

    `held` maps member index -> model for the members this rank holds; `holders[i]`
    is the rank holding member i; `options` go to `fuse_pair` (importance, order, ...).
    """
    slots = [(holder, 1) for holder in holders]
    models = {i: m for i, m in held.items()}
    for pairs in recursive_pairs(len(holders)):
        paired = {i for pair in pairs for i in pair}
        new_models = {}
        for out, (a, b) in enumerate(pairs):
            (left, wa), (right, wb) = slots[a], slots[b]
            if world.rank == right and right != left:
                send_model(world, models[b], left)
            if world.rank == left:
                other = models[b] if right == left else recv_model(world, make_template(), right)
                new_models[out] = fuse_pair(models[a], other, wa, wb, **options)
        rest = [i for i in range(len(slots)) if i not in paired]
        for offset, i in enumerate(rest):
            if world.rank == slots[i][0]:
                new_models[len(pairs) + offset] = models[i]
        slots, models = _advance(slots, pairs), new_models
    root = slots[0][0]
    result = models[0] if world.rank == root else make_template()
    return broadcast_model(world, result, root)


def gather_fuse(world: World, held: Dict[int, torch.nn.Module], holders: List[int],
                make_template: Callable[[], torch.nn.Module], **fuse_args) -> torch.nn.Module:
    """Gather all members on rank 0, `fuse(...)` there, broadcast the result."""
    gathered = gather_models(world, held, holders, make_template, root=0)
    if world.is_main:
        fused = fuse([gathered[i] for i in range(len(holders))], **fuse_args)
    else:
        fused = make_template()
    return broadcast_model(world, fused, 0)
