"""Neuron Transplantation for k models: concat, the NT step, the pairwise step and `fuse` (method dispatch).

`fuse_pair` is the single step every pairwise schedule is made of (and the one
the distributed tree calls across ranks); `schedule.recursive_plan(k)` describes the
tree, and `fuse(..., schedule="recursive")` is literally that plan folded with
`fuse_pair`, so a distributed run following the same plan gets bit-identical
weights. Output weights are leaf counts, so every member ends with equal weight.
"""

import warnings
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ntdist.errors import UserError, check_choice
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.fusion.wide.exported import concat_exported
from ntdist.fusion.checks import check_finite, check_models, check_weights, check_widths, normalized
from ntdist.fusion.dedup.merge import dedup_fuse
from ntdist.fusion.analysis.graph import Plan, analyze
from ntdist.fusion.options import NTOptions
from ntdist.fusion.wide.norms import group_layer_norms
from ntdist.fusion.pruning.select import ratio_of, select, shares, targets, verify_finite
from ntdist.fusion.pruning.torch_pruning import DEFAULT_PRUNER, tp_nt_step
from ntdist.fusion.repair import Reduce, repair, same
from ntdist.fusion.repair.inputs import calibration_batches
from ntdist.fusion.schedule import DEFAULT_SCHEDULE, SCHEDULES, fold
from ntdist.fusion.wide.widegraph import widen_graph

METHODS = ("nt", "avg", "ot")
PLANNED = ("nt", "ot")   # the methods that read the channel plan (`analyze`); avg only adds tensors
TRACE_ROWS = 4    # calibration rows the analysis traces with when no example_inputs are given


def concat(models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None, example_inputs=None) -> nn.Module:
    """The wide model: hidden layers side by side, output layer averaging the members (weighted); members may
    differ in hidden widths (`check_widths`)."""
    models = check_models(models, shapes=False)
    w = normalized(check_weights(weights, len(models)))
    plan = analyze(models[0], example_inputs)
    check_widths(models, plan)
    if plan.inexact:
        raise UserError(plan.inexact)
    if plan.graph is not None:      # analysed through torch.export: the widened exported graph
        return concat_exported(models, plan, w)
    if plan.captured and (plan.shuffles or plan.widths or plan.norms or plan.mixers):
        raise UserError(f"{type(models[0]).__name__} branches on shapes in forward, and its concatenation would be "
                        "rebuilt from a traced graph (LayerNorm, channel shuffle, constant width or token mixing); "
                        "concat refuses it, fuse(method='nt') still returns the original class")
    wide = assemble(models, plan, w)
    if plan.shuffles or plan.widths or plan.mixers:
        wide = widen_graph(wide, plan.shuffles, plan.widths, len(models), plan.mixers, models,
                           [plan.space_sizes(tensors_of(m)) for m in models])
    return group_layer_norms(wide, len(models), plan.norm_parts) if plan.norms else wide


def nt_step(models: Sequence[nn.Module], weights: Sequence[float], plan: Plan, ratio: float,
            reference: nn.Module, options: NTOptions, merged: Optional[dict] = None, example_inputs=None,
            calibration=None, notes: Optional[List[str]] = None, reduce: Reduce = same) -> nn.Module:
    """Concatenate `models` and prune back to `ratio` x the reference width, in `options.order`.

    With `options.dedup`, near-duplicate units are merged instead of taking slots and `merged`
    receives the counts; the activation criterion compares the units' outputs on `example_inputs`.
    `options.pruner` "torch_pruning" builds the wide model and prunes it with Torch-Pruning.
    With `options.repair` (and `calibration` inputs), the kept units' incoming weights are refitted
    to the concatenated model (`fusion.repair`; its sums go through `reduce`, and the layers it
    leaves as pruned are named in `notes`).
    """
    w = normalized(weights)
    ref_sizes = plan.space_sizes(tensors_of(reference))
    want = targets(plan, ref_sizes, ratio)
    if options.pruner != DEFAULT_PRUNER:
        return tp_nt_step(models, w, plan, want, reference, example_inputs)
    if options.dedup:
        return dedup_fuse(models, plan, w, want, options, merged, example_inputs)
    if options.order == "merge_prune":
        keep = select(models, plan, options.importance, want, w)
        verify_finite(models, plan, options.importance, keep)
        fused = assemble(models, plan, w, keep)
        return repair(models, plan, w, keep, fused, calibration, ridge=options.repair_ridge, notes=notes,
                      reduce=reduce) if options.repairs(calibration) else fused
    if plan.atoms:
        raise UserError("order='prune_merge' cannot fuse this model: it routes channels by position (a channel "
                        "shuffle or a split inside a layer's output), so each member must keep its width; "
                        "use order='merge_prune'")
    check_finite(models)
    sizes = [plan.space_sizes(tensors_of(m)) for m in models]
    each = shares(plan, want, sizes, w)
    pruned, keeps = [], []
    for m, model in enumerate(models):
        mine = {s: each[s][m] for s in plan.sizes}
        keeps.append(select([model], plan, options.importance, mine, [1.0]))
        pruned.append(assemble([model], plan, [1.0], keeps[-1]))
    fused = assemble(pruned, plan, w, None)
    return repair(models, plan, w, _joined(keeps, sizes, plan), fused, calibration, ridge=options.repair_ridge,
                  notes=notes, reduce=reduce) if options.repairs(calibration) else fused


def _joined(keeps: List[Dict[int, Optional[torch.Tensor]]], sizes: List[Dict[int, int]],
            plan: Plan) -> Dict[int, torch.Tensor]:
    """Each member's own kept units (prune_merge) as indices into the concatenated spaces."""
    joined = {}
    for s in plan.sizes:
        parts, offset = [], 0
        for keep, size in zip(keeps, sizes):
            mine = keep.get(s)
            parts.append((torch.arange(size[s]) if mine is None else mine.cpu()) + offset)
            offset += size[s]
        joined[s] = torch.cat(parts)
    return joined


def report_notes(found: Sequence[str], notes: Optional[List[str]]) -> None:
    """Each distinct note of a fusion once: appended to `notes` when the caller collects them (the CLI prints
    them), else a `UserWarning`."""
    for note in dict.fromkeys(found):
        if notes is None:
            warnings.warn(note, UserWarning, stacklevel=3)
        elif note not in notes:
            notes.append(note)


def traced_inputs(example_inputs, calibration):
    """The inputs the analysis traces the model with: `example_inputs`, else a few rows of the first calibration
    batch (read batches), so a model whose input rank the analysis cannot guess (tokens as [N, T, C]) is
    measured on what the user gave rather than refused."""
    if example_inputs is not None or not isinstance(calibration, list) or not calibration:
        return example_inputs
    return calibration[0][:TRACE_ROWS]


def fuse_pair(a: nn.Module, b: nn.Module, weight_a: float = 1.0, weight_b: float = 1.0, *,
              options: Optional[NTOptions] = None, example_inputs=None, reference: Optional[nn.Module] = None,
              plan: Optional[Plan] = None, merged: Optional[dict] = None, calibration=None,
              notes: Optional[List[str]] = None, reduce: Optional[Reduce] = None, **nt_options) -> nn.Module:
    """Fuse two models with NT; `weight_a`/`weight_b` are the leaf counts (or weights) each stands for.

    The NT options come as `options=NTOptions(...)` or as its fields by keyword
    (`importance="l1", dedup=True`; both: the keywords replace those fields). The result
    has `width` (or `keep_ratio` x) the width of `reference` (default `a`, which must
    then have the original width), capped at what the pair has; `merged` is that of
    `fuse`; the activation criterion runs the pair on `example_inputs`; repair refits the
    pair's fusion to their concatenation on `calibration` inputs, its layer sums passed
    through `reduce` (the distributed tree sums them over the ranks that fuse the pair).
    Layers the repair leaves as pruned are appended to `notes` (each once), or warned about
    when `notes` is None.
    """
    options = NTOptions.build(options, nt_options, "fuse_pair")
    check_models([a, b], shapes=False, finite=False)
    if options.repairs(calibration):     # repair lstsq without calibration inputs: refused before any work
        calibration = calibration_batches(calibration, model=a)
    wa, wb = check_weights([weight_a, weight_b], 2)
    plan = plan if plan is not None else analyze(a, traced_inputs(example_inputs, calibration))
    reference = reference if reference is not None else a
    ratio = ratio_of(plan, plan.space_sizes(tensors_of(reference)), float("inf"), options.width, options.keep_ratio)
    found: List[str] = []
    fused = nt_step([a, b], [wa, wb], plan, ratio, reference, options, merged, example_inputs, calibration, found,
                    reduce or same)
    report_notes(found, notes)
    return fused


def average_step(models: Sequence[nn.Module], weights: Sequence[float], method: str, plan: Optional[Plan],
                 options: Optional[NTOptions], calibration, notes: List[str], ot: dict) -> nn.Module:
    """Average `models` ('avg') or align them to the first by OT and average them ('ot'; `ot` holds its mode,
    reg and example inputs); with `options` (repair on), refit the result to the aligned members' weighted
    average on `calibration` (`repair` with `keep` None), the layers it leaves as they were named in `notes`."""
    from ntdist.fusion.baselines import average
    from ntdist.fusion.ot import aligned_members

    if method == "ot":
        models = aligned_members(check_models(models, shapes=False), plan, **ot)
    fused = average(models, weights)
    if options is None:
        return fused
    return repair(models, plan, weights, None, fused, calibration, ridge=options.repair_ridge,
                  notes=notes)


def fuse(models: Sequence[nn.Module], method: str = "nt", schedule: str = DEFAULT_SCHEDULE, *,
         options: Optional[NTOptions] = None, example_inputs=None, weights: Optional[Sequence[float]] = None,
         merged: Optional[dict] = None, calibration=None, ot_mode: str = "weights", ot_reg: float = 0.0,
         notes: Optional[List[str]] = None,
         **nt_options) -> nn.Module:
    """Fuse k models of one architecture into one (of the original width unless `width`/`keep_ratio`).

    Members of Linear, convolution and BatchNorm layers may differ in hidden widths: 'nt' and 'ot' return
    the first member's structure (`width`/`keep_ratio` relative to it); 'avg' needs one width.

    `weights` are the members' output weights (default equal). NT's options come as
    `options=NTOptions(...)` or as its fields by keyword (`importance`, `order`, `width`,
    `keep_ratio`, `pruner`, `dedup`, `dedup_threshold`, `dedup_overflow`, `dedup_criterion`;
    given both, the keywords replace those fields); see `NTOptions` for each. For method
    'avg' and 'ot' the result always has the members' width and the NT options are not read,
    except `repair` and `repair_ridge` (below), and a pruner other than 'ntdist' is refused (they do not prune).
    `example_inputs` trace the model (without them, the first few `calibration` inputs do) and feed
    `dedup_criterion` "activations" (a few hundred training inputs); `merged`, when given, receives the number of units dedup merged per
    layer, summed over the pairwise steps. `calibration` (a tensor of inputs, or an iterable of
    input batches such as a DataLoader, read once; a few thousand training inputs; floating inputs
    take the members' dtype) lets NT refit its result to the concatenated model (`repair`: "auto"
    does so whenever it is given; every pairwise step refits to its own pair); what it refuses:
    `repair.inputs`.
    With `repair="lstsq"`, 'avg' and 'ot' refit their average to the members' weighted average
    of their (aligned) outputs, layer by layer (`repair` with `keep` None; "auto" leaves them as
    they are), on the same `calibration` inputs and with `repair_ridge`.
    `ot_mode` ("weights" or "activations", which compares units' outputs on `example_inputs`) and `ot_reg`
    (0: exact transport; > 0: Sinkhorn) are OT's, refused with another method.
    The layers the repair cannot refit (attention, a module called twice, ...) are named once
    per fusion: appended to `notes` when given, else as a `UserWarning` each.
    """
    from ntdist.fusion.ot import check_ot

    options = NTOptions.build(options, nt_options, "fuse")
    models = check_models(models, shapes=False, finite=False)   # each method checks finiteness on its own pass
    check_choice(method, METHODS, "method")
    check_choice(schedule, SCHEDULES, "schedule")
    w = check_weights(weights, len(models))
    options.check_methods([method], names=("pruner",))
    check_ot(ot_mode, ot_reg)
    if method != "ot" and (ot_mode, ot_reg) != ("weights", 0.0):
        raise UserError(f"ot_mode and ot_reg are OT's options; method '{method}' does not read them: drop them")
    if options.repairs(calibration, method):     # repair lstsq without calibration inputs: refused here
        calibration = calibration_batches(calibration, model=models[0])   # checked once, read by every step
    found: List[str] = []
    if method != "nt":      # avg and OT keep the members' width: the NT options but repair's are unused
        if method == "avg" and any(a.shape != b.shape for m in models[1:] for a, b in zip(
                models[0].state_dict().values(), m.state_dict().values())):
            raise UserError("averaging needs members of identical shapes; members of different widths fuse "
                            "with method 'nt' or 'ot' (to the first member's widths)")
        repairs = options.repairs(calibration, method)
        plan = analyze(models[0], traced_inputs(example_inputs, calibration)) if method == "ot" or repairs else None
        step = partial(average_step, method=method, plan=plan, options=options if repairs else None,
                       calibration=calibration, notes=found, ot=dict(mode=ot_mode, reg=ot_reg,
                                                                     example_inputs=example_inputs))
        fused = step(models, w) if schedule == "flat" else fold(models, w, schedule,
                                                                lambda a, b, wa, wb: step([a, b], [wa, wb]))
        report_notes(found, notes)
        return fused
    plan = analyze(models[0], traced_inputs(example_inputs, calibration))
    check_widths(models, plan)
    ratio = ratio_of(plan, plan.space_sizes(tensors_of(models[0])), len(models), options.width, options.keep_ratio)
    if schedule == "flat":
        fused = nt_step(models, w, plan, ratio, models[0], options, merged, example_inputs, calibration, found)
    else:
        fused = fold(models, w, schedule, lambda a, b, wa, wb: fuse_pair(
            a, b, wa, wb, options=options, example_inputs=example_inputs, reference=models[0], plan=plan,
            merged=merged, calibration=calibration, notes=found))
    report_notes(found, notes)
    return fused
