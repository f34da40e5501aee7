"""The near-duplicate unit check of `fusion.diversity` across ranks, without gathering the members.

`duplicate_units` compares a seeded sample of at most s = `max_units` units of each member's layer
with all units of the other members. Across ranks the same sample is drawn on every rank (the
layers' shapes come from the template, so a rank that holds no member draws it too), and per layer:
1. each holder broadcasts its members' sampled rows: every rank receives the k x s rows, k * s * fan_in
   floats, never a whole model;
2. each rank looks for a near-copy of every other member's sampled rows among the full rows of the
   members it holds;
3. one MAX all-reduce of the k x s flags gives every rank the same fractions.
Each rank holds its members and one layer's k x s sampled rows at a time, where rank 0 used to
receive the k models. The flags are the single-process ones: a row has a near-copy in the pool of
all other members exactly when it has one in one of them.
"""

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ntdist.distributed.comm import meta_template
from ntdist.distributed.world import World, on_comm_device
from ntdist.fusion.diversity import has_near_copy, judged_layers, sample_generator, sample_rows, unit_rows


@torch.no_grad()
def duplicate_units_across_ranks(world: World, held: Dict[int, nn.Module], holders: List[int],
                                 make_template: Callable[[], nn.Module], threshold: float = 0.95,
                                 max_units: Optional[int] = None) -> Dict[str, float]:
    """`fusion.diversity.duplicate_units` of all k members (`holders[i]`: the rank holding member i), the same
    on every rank; `held` maps member index -> model for the members this rank holds."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    k, device = len(holders), world.device
    shapes = judged_layers(meta_template(make_template))   # shapes only: no weights
    own = {i: judged_layers(model) for i, model in held.items()}
    sample = sample_generator()
    out = {}
    for index, (name, layer) in enumerate(shapes):
        units = layer.weight.shape[0]
        width = unit_rows(layer).shape[1]
        picks = [sample_rows(units, max_units, sample) for _ in range(k)]
        s = units if picks[0] is None else len(picks[0])
        full = {i: unit_rows(layers[index][1]).to(device) for i, layers in own.items()}
        sampled = torch.empty(k, s, width, device=device)
        for i in range(k):
            if i in full:
                sampled[i] = full[i] if picks[i] is None else full[i][picks[i].to(device)]
            if world.size > 1:
                on_comm_device(world, dist.broadcast, sampled[i], holders[i])
        found = torch.zeros(k, s, dtype=torch.uint8, device=device)
        for j, rows in full.items():
            for i in range(k):
                if i != j:
                    found[i] |= has_near_copy(sampled[i], rows, threshold).to(torch.uint8)
        if world.size > 1:
            world.wait_for("the duplicate check of their members")   # ranks hold different numbers of members
            on_comm_device(world, dist.all_reduce, found, op=dist.ReduceOp.MAX)
        out[name] = int(found.sum()) / (k * s) if s else 0.0
    return out
