"""Neuron Transplantation for k models: concat, the NT step, the pairwise step and `fuse` (method dispatch).

`fuse_pair` is the single step every pairwise schedule is made of (and the one
the distributed tree calls across ranks); `schedule.recursive_plan(k)` describes the
tree, and `fuse(..., schedule="recursive")` is literally that plan folded with
`fuse_pair`, so a distributed run following the same plan gets bit-identical
weights. Output weights are leaf counts, so every member ends with equal weight.
"""

from typing import Optional, Sequence

import torch.nn as nn

from ntdist.errors import UserError, check_choice
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.fusion.checks import check_finite, check_models, check_weights, normalized
from ntdist.fusion.dedup.merge import DEDUP_THRESHOLD, dedup_fuse
from ntdist.fusion.dedup.choice import OVERFLOWS
from ntdist.fusion.dedup.activations import CRITERIA
from ntdist.fusion.analysis.graph import Plan, analyze
from ntdist.fusion.pruning.importance import DEFAULT_IMPORTANCE, resolve
from ntdist.fusion.wide.norms import group_layer_norms
from ntdist.fusion.pruning.select import ratio_of, select, shares, targets, verify_finite
from ntdist.fusion.pruning.torch_pruning import DEFAULT_PRUNER, check_pruner, tp_nt_step
from ntdist.fusion.schedule import SCHEDULES, fold
from ntdist.fusion.wide.widegraph import widen_graph

METHODS = ("nt", "avg", "ot")
ORDERS = ("merge_prune", "prune_merge")


def concat(models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None, example_inputs=None) -> nn.Module:
    """The wide model: hidden layers side by side, output layer averaging the members (weighted)."""
    models = check_models(models)
    w = normalized(check_weights(weights, len(models)))
    plan = analyze(models[0], example_inputs)
    if plan.inexact:
        raise UserError(plan.inexact)
    if plan.captured and (plan.shuffles or plan.widths or plan.norms):
        raise UserError(f"{type(models[0]).__name__} branches on shapes in forward, and its concatenation would be "
                        "rebuilt from a traced graph (LayerNorm, channel shuffle or constant width); concat refuses "
                        "it, fuse(method='nt') still returns the original class")
    wide = assemble(models, plan, w)
    if plan.shuffles or plan.widths:
        wide = widen_graph(wide, plan.shuffles, plan.widths, len(models))
    return group_layer_norms(wide, len(models), plan.norm_parts) if plan.norms else wide


def check_dedup(dedup: bool, threshold: float, order: str, overflow: str = "drop", criterion: str = "weights") -> None:
    """UserError unless `dedup` is a bool, the threshold a cosine in (0, 1), the order merge_prune,
    `overflow` one of OVERFLOWS and `criterion` one of CRITERIA."""
    if not isinstance(dedup, bool):
        raise UserError(f"dedup must be true or false (on | off), got {dedup!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise UserError(f"dedup_threshold must be a cosine similarity in (0, 1), e.g. 0.9, got {threshold!r}")
    if dedup and order != "merge_prune":
        raise UserError(f"dedup merges duplicates while selecting from all members at once; it needs "
                        f"order merge_prune, got {order!r}")
    check_choice(overflow, OVERFLOWS, "dedup_overflow")
    check_choice(criterion, CRITERIA, "dedup_criterion")


def nt_step(models: Sequence[nn.Module], weights: Sequence[float], plan: Plan, ratio: float,
            reference: nn.Module, importance=DEFAULT_IMPORTANCE, order="merge_prune", dedup: bool = False,
            dedup_threshold: float = DEDUP_THRESHOLD, merged: Optional[dict] = None,
            pruner: str = DEFAULT_PRUNER, dedup_overflow: str = "drop", dedup_criterion: str = "weights",
            example_inputs=None) -> nn.Module:
    """Concatenate `models` and prune back to `ratio` x the reference width, in the given order.

    With `dedup`, near-duplicate units are merged instead of taking slots (`fusion.dedup`); the
    activation criterion compares the units' outputs on `example_inputs`.
    `pruner="torch_pruning"` builds the wide model and prunes it with Torch-Pruning (`tp_prune`).
    """
    w = normalized(weights)
    ref_sizes = plan.space_sizes(tensors_of(reference))
    want = targets(plan, ref_sizes, ratio)
    check_choice(order, ORDERS, "order")
    check_dedup(dedup, dedup_threshold, order, dedup_overflow, dedup_criterion)
    check_pruner(pruner, "nt", order, dedup, importance)
    if pruner != DEFAULT_PRUNER:
        return tp_nt_step(models, w, plan, want, reference, example_inputs)
    if dedup:
        return dedup_fuse(models, plan, w, want, importance, dedup_threshold, merged, dedup_overflow,
                          dedup_criterion, example_inputs)
    if order == "merge_prune":
        keep = select(models, plan, importance, want, w)
        verify_finite(models, plan, importance, keep)
        return assemble(models, plan, w, keep)
    if plan.atoms:
        raise UserError("order='prune_merge' cannot fuse this model: it routes channels by position (a channel "
                        "shuffle or a split inside a layer's output), so each member must keep its width; "
                        "use order='merge_prune'")
    check_finite(models)
    each = shares(plan, want, [plan.space_sizes(tensors_of(m)) for m in models], w)
    pruned = []
    for m, model in enumerate(models):
        mine = {s: each[s][m] for s in plan.sizes}
        pruned.append(assemble([model], plan, [1.0], select([model], plan, importance, mine, [1.0])))
    return assemble(pruned, plan, w, None)


def fuse_pair(a: nn.Module, b: nn.Module, weight_a: float = 1.0, weight_b: float = 1.0, *,
              importance=DEFAULT_IMPORTANCE, order: str = "merge_prune", width: Optional[int] = None,
              keep_ratio: Optional[float] = None, example_inputs=None, reference: Optional[nn.Module] = None,
              plan: Optional[Plan] = None, dedup: bool = False, dedup_threshold: float = DEDUP_THRESHOLD,
              merged: Optional[dict] = None, pruner: str = DEFAULT_PRUNER, dedup_overflow: str = "drop",
              dedup_criterion: str = "weights") -> nn.Module:
    """Fuse two models with NT; `weight_a`/`weight_b` are the leaf counts (or weights) each stands for.

    The result has `width` (or `keep_ratio` x) the width of `reference` (default
    `a`, which must then have the original width), capped at what the pair has.
    `dedup`, `dedup_threshold`, `dedup_overflow`, `dedup_criterion`, `merged` and `pruner` are
    those of `fuse`; the activation criterion runs the pair on `example_inputs`.
    """
    check_models([a, b], shapes=False, finite=False)
    wa, wb = check_weights([weight_a, weight_b], 2)
    plan = plan if plan is not None else analyze(a, example_inputs)
    reference = reference if reference is not None else a
    ratio = ratio_of(plan, plan.space_sizes(tensors_of(reference)), float("inf"), width, keep_ratio)
    return nt_step([a, b], [wa, wb], plan, ratio, reference, importance, order, dedup, dedup_threshold, merged,
                    pruner, dedup_overflow, dedup_criterion, example_inputs)


def fuse(models: Sequence[nn.Module], method: str = "nt", schedule: str = "flat", importance=DEFAULT_IMPORTANCE,
         order: str = "merge_prune", width: Optional[int] = None, keep_ratio: Optional[float] = None,
         example_inputs=None, weights: Optional[Sequence[float]] = None, dedup: bool = False,
         dedup_threshold: float = DEDUP_THRESHOLD, merged: Optional[dict] = None,
         pruner: str = DEFAULT_PRUNER, dedup_overflow: str = "drop", dedup_criterion: str = "weights") -> nn.Module:
    """Fuse k models of one architecture into one (of the original width unless `width`/`keep_ratio`).

    `weights` are the members' output weights (default equal). For method
    'avg' and 'ot' the result always has the members' width, so `width`,
    `keep_ratio`, `importance`, `order` and the dedup arguments only apply to 'nt'.
    `dedup` merges a unit into a kept one when their incoming weights have cosine
    similarity above `dedup_threshold` (see `ntdist.fusion.dedup.merge`); `dedup_overflow`
    "merge" folds a unit that finds no free slot into its most similar kept unit
    and "match" joins units of different members, most similar pair first, until the
    classes fit the slots, instead of dropping them ("drop"); `dedup_criterion` "activations" compares the
    units' outputs on `example_inputs` (a few hundred training inputs) instead of
    their parameters; `merged`, when given, receives the number of merged units per
    layer, summed over the pairwise steps. `pruner` is 'ntdist' (never builds the wide
    model) or 'torch_pruning' (the authors' pipeline: concat, then Torch-Pruning's group
    L2 pruner; `ntdist.fusion.pruning.torch_pruning`), NT only.
    """
    from ntdist.fusion.baselines import average
    from ntdist.fusion.ot import ot_fuse

    models = check_models(models, finite=False)        # each method checks finiteness on its own pass
    check_choice(method, METHODS, "method")
    check_choice(schedule, SCHEDULES, "schedule")
    check_choice(order, ORDERS, "order")
    w = check_weights(weights, len(models))
    check_pruner(pruner, method, order, dedup, importance)
    if method != "nt":      # avg and OT keep the members' width: width, keep_ratio, importance, order unused
        if method == "avg":
            return average(models, w) if schedule == "flat" else fold(
                models, w, schedule, lambda a, b, wa, wb: average([a, b], [wa, wb]))
        plan = analyze(models[0], example_inputs)
        return ot_fuse(models, w, plan=plan) if schedule == "flat" else fold(
            models, w, schedule, lambda a, b, wa, wb: ot_fuse([a, b], [wa, wb], plan=plan))
    resolve(importance)
    check_dedup(dedup, dedup_threshold, order, dedup_overflow, dedup_criterion)
    plan = analyze(models[0], example_inputs)
    ratio = ratio_of(plan, plan.space_sizes(tensors_of(models[0])), len(models), width, keep_ratio)
    if schedule == "flat":
        return nt_step(models, w, plan, ratio, models[0], importance, order, dedup, dedup_threshold, merged,
                        pruner, dedup_overflow, dedup_criterion, example_inputs)
    return fold(models, w, schedule, lambda a, b, wa, wb: fuse_pair(
        a, b, wa, wb, importance=importance, order=order, width=width, keep_ratio=keep_ratio,
        example_inputs=example_inputs, reference=models[0], plan=plan, dedup=dedup,
        dedup_threshold=dedup_threshold, merged=merged, pruner=pruner, dedup_overflow=dedup_overflow,
        dedup_criterion=dedup_criterion))
