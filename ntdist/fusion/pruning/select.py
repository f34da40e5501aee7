"""Structured magnitude pruning to an exact width, per channel space.

`targets` turns `width` / `keep_ratio` into an exact unit count per hidden
space (round(original * ratio), never torch-pruning's off-by-one);
`select` ranks the units of the (virtually) concatenated members with an
importance function and keeps the best ones; `prune` applies that to a single
model. Residually coupled channels share one space and are pruned together.
Spaces a grouped convolution cuts into blocks (its input and output channel
groups) are pruned block by block, the same blocks in every such space, so the
result keeps whole groups: the original channels per group, fewer groups.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ntdist.errors import UserError
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.fusion.checks import check_finite
from ntdist.fusion.analysis.graph import Plan, analyze
from ntdist.fusion.pruning.importance import DEFAULT_IMPORTANCE, group_l2, l1, l2, resolve, space_views


def ratio_of(plan: Plan, ref_sizes: Dict[int, int], k: float, width=None, keep_ratio=None) -> float:
    """The keep ratio relative to the original width; checks it lies in (0, k]."""
    if width is not None and keep_ratio is not None:
        raise UserError("give either width or keep_ratio, not both")
    if width is not None:
        if plan.first_space is None:
            raise UserError("width needs a model whose first layer is a hidden Linear or Conv layer; use keep_ratio")
        orig = ref_sizes[plan.first_space]
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= k * orig:
            raise UserError(f"width must be an integer between 1 and {k * orig:g} ({k:g} models of "
                            f"width {orig}), got {width!r}")
        r = width / orig
    elif keep_ratio is not None:
        r = float(keep_ratio)
        if not math.isfinite(r) or not 0 < r <= k:
            raise UserError(f"keep_ratio must lie in (0, {k:g}] for k={k:g} models, got {keep_ratio!r}")
    else:
        return 1.0
    if plan.atoms and r != 1.0:
        raise UserError(f"this model routes channels by position (a channel shuffle or a split inside a layer's "
                        f"output), so NT keeps its width: use the members' width, not ratio {r:g}")
    if plan.widths and r != 1.0:
        raise UserError(f"this model's forward writes its channel or head count as a constant (layer "
                        f"'{plan.widths[0][0]}'), so NT keeps its width: use the members' width, not ratio {r:g}")
    return r


def _round(n: int, ratio: float) -> int:
    t = int(math.floor(n * ratio + 0.5))
    if t < 1:
        raise UserError(f"pruning to ratio {ratio:g} leaves no unit in a layer of width {n}; use a larger width")
    return t


def targets(plan: Plan, ref_sizes: Dict[int, int], ratio: float) -> Dict[int, int]:
    """Exact number of units to keep in every hidden space: round(original * ratio), at least 1.

    A space cut into groups keeps round(groups * ratio) whole blocks.
    """
    out = {s: _round(n, ratio) for s, n in ref_sizes.items()}
    for spaces, groups, _ in plan.coupled:
        for s in spaces:
            out[s] = _round(ref_sizes[s] // block_size(plan, s, groups), ratio) * block_size(plan, s, groups)
    return out


def block_size(plan: Plan, space: int, groups: int) -> int:
    """Units per group block of a space a grouped convolution cuts into `groups` blocks."""
    return plan.sizes[space] // groups


def shares(plan: Plan, want: Dict[int, int], sizes: List[Dict[int, int]], weights) -> Dict[int, List[int]]:
    """Units of every space each member keeps before merging (prune_merge), whole blocks in grouped spaces."""
    out = {}
    for s in plan.sizes:
        caps = [sz[s] for sz in sizes]
        out[s] = split(min(want[s], sum(caps)), weights, caps)   # may be 0 for some members if want < k
    for spaces, groups, _ in plan.coupled:
        b = block_size(plan, spaces[0], groups)
        caps = [sz[spaces[0]] // b for sz in sizes]
        blocks = split(min(want[spaces[0]] // b, sum(caps)), weights, caps)
        for s in spaces:
            out[s] = [n * block_size(plan, s, groups) for n in blocks]
    return out


def split(total: int, weights: Sequence[float], caps: Sequence[int]) -> List[int]:
    """Split `total` units among members proportionally to `weights` (largest remainder), each <= its cap."""
    wsum = float(sum(weights))
    quotas = [total * w / wsum for w in weights]
    shares = [min(int(math.floor(q)), c) for q, c in zip(quotas, caps)]
    left = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda m: (-(quotas[m] - math.floor(quotas[m])), m))
    while left > 0:
        moved = False
        for m in order:
            if left > 0 and shares[m] < caps[m]:
                shares[m] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return shares


def verify_finite(models, plan: Plan, importance, keep) -> None:
    """Check the members are finite, skipping what `select` already checked through finite scores.

    l2 and l1 scores read every weight and bias of the layers producing a pruned
    space, group_l2 every weight producing or consuming one, so a NaN or inf there
    already made `select` fail; everything else is checked here.
    """
    skip = set()
    fn = resolve(importance)

    def pruned(dims) -> bool:
        return dims is not None and all(keep.get(d.space) is not None for d in dims)

    for name, spec in plan.tensors.items():
        first = spec.dims[0] if spec.dims else None
        second = spec.dims[1] if spec.dims and len(spec.dims) > 1 else None
        if fn in (l1, l2) and spec.part in ("weight", "bias") and pruned(first):
            skip.add(name)
        elif fn is group_l2 and spec.part == "weight" and (pruned(first) or pruned(second)):
            skip.add(name)
    check_finite(models, skip)


def _ranked(scores: List[torch.Tensor], count: int, models) -> torch.Tensor:
    return top(ranked_scores(scores, models), count)


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the `count` highest scores (of equal scores, the lower index first)."""
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:count]).values


def scorer(models: Sequence[nn.Module], plan: Plan, importance, weights: Sequence[float]):
    """A function space -> [each member's unit scores (float64)] for the given importance."""
    fn = resolve(importance)
    sizes = [plan.space_sizes(tensors_of(m)) for m in models]
    views = [space_views(tensors_of(m), plan, w) for m, w in zip(models, weights)]

    def unit_scores(s):
        out = []
        for m, v in enumerate(views):
            score = fn(v[s]).reshape(-1)
            if score.shape[0] != sizes[m][s]:
                raise UserError(f"importance returned {score.shape[0]} scores for a layer of {sizes[m][s]} units")
            out.append(score.double())
        return out
    return unit_scores


def ranked_scores(scores: List[torch.Tensor], models) -> torch.Tensor:
    """The concatenated scores; UserError if any is not finite."""
    scores = torch.cat(scores)
    if not torch.isfinite(scores).all():
        check_finite(models)
        raise UserError("importance scores are not finite; check the importance function")
    return scores


def select(models: Sequence[nn.Module], plan: Plan, importance, want: Dict[int, int],
           weights: Sequence[float]) -> Dict[int, Optional[torch.Tensor]]:
    """Sorted indices into the concatenated space of the `want[s]` most important units of each space."""
    sizes = [plan.space_sizes(tensors_of(m)) for m in models]
    totals = {s: sum(sz[s] for sz in sizes) for s in plan.sizes}
    if all(want[s] >= totals[s] for s in plan.sizes):
        return {}
    unit_scores = scorer(models, plan, importance, weights)
    keep = {}
    for spaces, groups, _ in plan.coupled:      # whole blocks, the same ones in every coupled space
        blocks = {s: block_size(plan, s, groups) for s in spaces}
        if want[spaces[0]] >= totals[spaces[0]]:
            keep.update({s: None for s in spaces})
            continue
        per_block = [sum(sc.reshape(-1, blocks[s]).sum(1) for s, sc in zip(spaces, member))
                     for member in zip(*(unit_scores(s) for s in spaces))]
        best = _ranked(per_block, want[spaces[0]] // blocks[spaces[0]], models)
        keep.update({s: (best[:, None] * b + torch.arange(b, device=best.device)).reshape(-1)
                     for s, b in blocks.items()})
    for s in plan.order:
        if s in keep:
            continue
        keep[s] = None if want[s] >= totals[s] else _ranked(unit_scores(s), want[s], models)
    return keep


def prune(model: nn.Module, width: Optional[int] = None, keep_ratio: Optional[float] = None,
          importance=DEFAULT_IMPORTANCE, example_inputs=None, reference: Optional[nn.Module] = None,
          plan: Optional[Plan] = None, want: Optional[Dict[int, int]] = None) -> nn.Module:
    """Prune one model to `width` / `keep_ratio` (relative to `reference`, default the model itself)."""
    plan = plan if plan is not None else analyze(model, example_inputs)
    if want is None:
        ref = plan.space_sizes(tensors_of(reference if reference is not None else model))
        want = targets(plan, ref, ratio_of(plan, ref, 1, width, keep_ratio))
    keep = select([model], plan, importance, want, [1.0])
    verify_finite([model], plan, importance, keep)
    return assemble([model], plan, [1.0], keep)
