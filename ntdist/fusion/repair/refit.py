"""Repair after fusion: refit each layer of the fused model to the ensemble it stands for, in forward order.

NT keeps a subset of the concatenated model's units and drops the rest, together
with what they contributed to the next layer. `repair` refits, layer by layer in the
order forward calls them, the incoming weights and bias of every layer that reads a
pruned space, by ridge least squares on calibration inputs: its inputs are taken from
the pruned model as repaired so far, its targets are the concatenated model's
outputs of that layer at the kept units (pre-activation; before a BatchNorm, whose
kept channels carry the members' own statistics) or, for the output layer, the
weighted average of the members' logits. Every producer into a residual stream is
refitted to the stream's kept channels, so their sum matches too. A
`nn.MultiheadAttention` used as self-attention is two such fits, its kept heads'
q/k/v projections and then `out_proj` on the context they give (`attention`).

After averaging and OT (`keep` None) the same refit runs with other targets: fused
unit j stands for unit j of every member once they are aligned (by the identity, or by
OT's transport), so every layer's target is the members' weighted average of their
aligned outputs of it; before a BatchNorm, their averaged normalised outputs taken
back through the fused BatchNorm, whose statistics are the members' averaged ones.

A layer's fit is exact when the concatenated layer's kept outputs are an affine
function of the pruned model's inputs to it (for instance when every dropped unit is a
positive multiple of a kept one, or a linear combination of kept ones before the
activation); otherwise it is the best such function on the calibration inputs.

Cost: layer l's inputs come from a forward of the pruned model that stops at l, per
calibration batch, so a model of L layers costs about L/2 full forwards of the pruned
model per batch. The members never change, so their outputs (the targets) are read for
several layers at once: one forward of each member per batch reads the targets of a
run of consecutive layers (`waves`) whose targets on the whole calibration set fit in
`TARGET_BYTES`; a layer whose targets alone exceed it reads them per batch in forwards
that stop at it. A MultiheadAttention takes part in the waves like any layer: the pass
reads each member's query and output of it, which give its q/k/v and `out_proj` targets
(`capture.stored_bytes` counts them and the pruned model's query). Memory: one batch's activations, the stored targets (at most
`TARGET_BYTES`), and the normal equations of one layer and one chunk of its rows
(`lstsq`, `rows`).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ntdist.fusion.analysis.plan import Plan
from ntdist.fusion.repair.attention import (call_reasons, context, install_projections, owner, projections,
                                            query_and_output)
from ntdist.fusion.repair.capture import (averaged_output, kept_index, reach, reach_all, reach_call, stored_bytes,
                                          trace, unnormalized, waves, wide_output)
from ntdist.fusion.repair.inputs import CALIBRATION_BATCH, calibration_batches
from ntdist.fusion.repair.lstsq import Normal, accumulate, same, solve
from ntdist.fusion.repair.rows import SILENT, coefficients, foldable, install, layer_note, linear_rows, row_chunks
from ntdist.fusion.wide.assemble import tensors_of

RIDGE = 1e-3          # relative to the mean diagonal of each layer's Gram matrix
POSITIONS = 64        # output positions per input and convolution (or channels-last Linear) in the fit
TARGET_BYTES = 256 * 2 ** 20             # targets of the next layers read in one pass of the members, at most
Reduce = Callable[[Normal], Normal]      # a layer's sums -> the sums over every process that takes part


@dataclass
class _Fit:
    """What every layer's refit reads: the members, their analysis, the kept units, the pruned model and the
    calibration batches, and how a layer's sums are fitted."""

    models: Sequence[nn.Module]
    plan: Plan
    weights: List[float]
    keep: Optional[Dict[int, Optional[torch.Tensor]]]    # None: targets are the aligned members' average
    sizes: List[Dict[int, int]]
    pruned: nn.Module
    batches: List[torch.Tensor]
    feeds: Dict[str, str]
    ridge: float
    positions: int
    reduce: Reduce

    def source(self, name: str) -> str:
        """The module whose output in every member the target of layer `name` is made of: the layer itself, or
        (averaged targets) the BatchNorm it feeds, whose averaged outputs are taken back through the fused one."""
        bn = self.feeds.get(name)
        return bn if self.keep is None and bn is not None and foldable(self.pruned.get_submodule(bn)) else name

    def target(self, name: str, outputs: List[torch.Tensor]) -> torch.Tensor:
        """What layer `name` of the pruned model should output, from the members' outputs of `source(name)`."""
        layer, module = self.plan.layers[name], self.pruned.get_submodule(name)
        if self.keep is None:
            mean = averaged_output(outputs, self.weights)
            source = self.source(name)
            return mean if source == name else unnormalized(self.pruned.get_submodule(source), mean)
        if layer.out is None:
            return averaged_output(outputs, self.weights)
        dim = -1 if isinstance(module, nn.Linear) else 1
        target = wide_output(outputs, layer.out, self.sizes, dim)
        index = kept_index(layer.out, self.keep, self.sizes, module.weight.device)
        target = target if index is None else target.index_select(dim % target.dim(), index)
        if target.shape[dim] != module.weight.shape[0]:
            raise ValueError(f"repair: '{name}' has {module.weight.shape[0]} outputs but `keep` selects "
                             f"{target.shape[dim]}; `pruned` must be assemble(models, plan, weights, keep)")
        return target

    @torch.no_grad()
    def targets(self, names: List[str]) -> Dict[str, List]:
        """The targets of the layers `names` on every batch, from one forward of each member per batch; of a
        MultiheadAttention, its `attention_goals`."""
        out: Dict[str, List] = {name: [] for name in names}
        for x in self.batches:
            for name, target in self._targets_on(names, x).items():
                out[name].append(target)
        return out

    def _targets_on(self, names: List[str], x: torch.Tensor) -> Dict[str, object]:
        """`targets` on one batch; each member output is let go once the targets that read it are made."""
        attention = {name for name in names if self.plan.layers[name].kind == "mha"}
        sources = [self.source(name) for name in names]
        read = [reach_all(m, list(dict.fromkeys(sources)), x, attention) for m in self.models]
        out: Dict[str, object] = {}
        for i, (name, source) in enumerate(zip(names, sources)):
            theirs = [r[source] for r in read]
            out[name] = self.attention_goals(name, theirs) if name in attention else self.target(name, theirs)
            if source not in sources[i + 1:]:
                for r in read:
                    del r[source]
            del theirs
        return out

    def attention_goals(self, name: str, calls: List) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """(target of the kept heads' q/k/v, None when the module reads the model input; target of its `out_proj`)
        of MultiheadAttention `name` on one batch, from each member's call of it (`capture.reach_call`)."""
        module, layer = self.pruned.get_submodule(name), self.plan.layers[name]
        members = [m.get_submodule(name) for m in self.models]
        theirs = [query_and_output(mm, call) for mm, call in zip(members, calls)]
        goal_out = self.target(f"{name}.out_proj", [out for _, out in theirs])
        if layer.inp is None:          # on the model input the kept heads' projections are already exact
            return None, goal_out
        outs = [projections(mm, q) for mm, (q, _) in zip(members, theirs)]
        if self.keep is None:          # after averaging or OT: the aligned members' average
            goal = averaged_output(outs, self.weights)
        else:
            goal = wide_output(outs, layer.out, self.sizes, -1)
            index = kept_index(layer.out, self.keep, self.sizes, module.in_proj_weight.device)
            goal = goal if index is None else goal[..., index]
        if goal.shape[-1] != module.in_proj_weight.shape[0]:
            raise ValueError(f"repair: '{name}' projects to {module.in_proj_weight.shape[0]} features but "
                             f"`keep` selects {goal.shape[-1]}; `pruned` must be assemble(models, plan, weights, "
                             f"keep)")
        return goal, goal_out

    @torch.no_grad()
    def refit(self, name: str, targets: Optional[List[torch.Tensor]]) -> None:
        """Refit layer `name` to `targets` (one per batch; None: read from the members here)."""
        module = self.pruned.get_submodule(name)
        bn = self.pruned.get_submodule(self.feeds[name]) if name in self.feeds else None
        bias = module.bias is not None or foldable(bn)
        generator = torch.Generator().manual_seed(0)
        start = coefficients(module, bias) if self.keep is None else None   # averaged: the ridge pulls to these
        normal = None
        for i, x in enumerate(self.batches):
            inputs = reach(self.pruned, name, x, "input")
            target = targets[i] if targets is not None else \
                self.target(name, [reach(m, self.source(name), x, "output") for m in self.models])
            if start is not None:
                target = target - module(inputs)     # fit the change from the averaged weights
            for rows, goal in row_chunks(module, inputs, target, self.positions, generator):
                normal = accumulate(normal, rows, goal, bias)
        coef = solve(self.reduce(normal), self.ridge)
        install(module, coef if start is None else coef + start, bn)

    def _solved(self, rows_of: Callable, bias: bool) -> torch.Tensor:
        """The coefficients of a channels-last regression whose (inputs, targets) on batch i are `rows_of(i, x)`."""
        generator = torch.Generator().manual_seed(0)
        normal = None
        for i, x in enumerate(self.batches):
            inputs, target = rows_of(i, x)
            for rows, goal in linear_rows(inputs, target, self.positions, generator):
                normal = accumulate(normal, rows, goal, bias)
        return solve(self.reduce(normal), self.ridge)

    @torch.no_grad()
    def refit_attention(self, name: str, goals: Optional[List] = None) -> None:
        """Refit MultiheadAttention `name`: the kept heads' q/k/v projections, then `out_proj` on the context
        they give (`attention`). `goals`: its `attention_goals` per batch, read in a wave (None: read from the
        members here). When there are two passes, the first keeps each batch's query and `out_proj` target for the
        second (its own refit does not change the module's input): always with `goals`, whose bytes the wave counts,
        else while they fit in `TARGET_BYTES`."""
        module, layer = self.pruned.get_submodule(name), self.plan.layers[name]
        kept: List = []

        def read(i, x):    # the pruned model's query, the targets of q/k/v and of out_proj
            if i < len(kept):
                return kept[i]
            query, _ = query_and_output(module, reach_call(self.pruned, name, x))
            if goals is not None:
                goal, goal_out = goals[i]
                goals[i] = None        # q/k/v's target is read once
            else:
                goal, goal_out = self.attention_goals(name, [reach_call(m, name, x) for m in self.models])
            if i == len(kept) and layer.inp is not None and (
                    goals is not None or (query.nbytes + goal_out.nbytes) * len(self.batches) <= TARGET_BYTES):
                kept.append((query, None, goal_out))
            return query, goal, goal_out

        def projected(i, x):
            query, goal, _ = read(i, x)
            return query, goal

        def attended(i, x):
            query, _, goal_out = read(i, x)
            return context(module, query), goal_out

        if layer.inp is not None:      # on the model input the kept heads' projections are already exact
            install_projections(module, self._solved(projected, module.in_proj_bias is not None))
        install(module.out_proj, self._solved(attended, module.out_proj.bias is not None))


def repair(models: Sequence[nn.Module], plan: Plan, weights: Sequence[float],
           keep: Optional[Dict[int, Optional[torch.Tensor]]], pruned: nn.Module, calibration, *, ridge: float = RIDGE,
           positions: int = POSITIONS, batch_size: int = CALIBRATION_BATCH,
           notes: Optional[List[str]] = None, reduce: Reduce = same) -> nn.Module:
    """Refit `pruned` (NT's result, `assemble(models, plan, weights, keep)`) to the concatenation of `models`
    (`keep` None: an average refitted to the aligned `models`' average, below).

    `models` are the members in the order `keep` indexes them (member 0's units first);
    `plan` is their analysis; `weights` their output weights (normalised here);
    `keep[space]` the sorted indices of the kept units into the concatenated space, or
    None for all of them (what `pruning.select.select` returns).

    `keep` None: `pruned` is the members' weighted average (`baselines.average`) and
    `models` are the members aligned to it (for OT, each transported onto the anchor's
    units; for averaging, the members themselves), so that fused unit j stands for unit
    j of every member. Every layer is then refitted to the members' weighted average
    of their outputs of it; a layer that feeds a BatchNorm (with running statistics) to
    the members' averaged BatchNorm outputs, taken back through the fused BatchNorm
    (`capture.unnormalized`), so the fused model's normalised outputs match theirs. The
    ridge pulls toward the averaged weights rather than toward zero (each layer fits the
    change from them), so a layer the average already gets right (identical members, OT
    of a permuted copy) stays as it is.

    `calibration` is a tensor of inputs (split into batches of `batch_size`) or an iterable of batches
    (tensors, or tuples whose first item is the inputs), on the models' device.
    `ridge` is relative to each layer's mean input energy (`lstsq.ridge_of`);
    `positions` bounds the output positions per input a convolution contributes.
    `reduce` turns each layer's sums over this process's calibration inputs into the sums
    over every process that repairs the same model (default: the sums as they are); a
    distributed caller all-reduces them (`lstsq.packed`), so that W processes with a share
    of the inputs each solve what one process with all of them would. Every process must
    call it for the same layers in the same order, which the same models and plan ensure.

    `pruned` is changed in place and returned: same class, same shapes; only weights,
    biases and (for layers without a bias) the running means of the BatchNorms they
    feed change. Every model runs in eval mode and gets its own mode back. Layers that cannot be refitted are left
    as NT pruned them, each named in a line appended to `notes` when given.
    """
    if keep is not None and not any(v is not None for v in keep.values()):
        return pruned                  # nothing was dropped: the pruned model is the concatenated one
    total = float(sum(weights))
    weights = [float(w) / total for w in weights]
    batches = [b.to(pruned_device(pruned)) for b in calibration_batches(calibration, batch_size, models[0], runs=False)]
    sizes = [plan.space_sizes(tensors_of(m)) for m in models]
    modes = [(m, m.training) for m in (pruned, *models)]
    for m, _ in modes:
        m.eval()
    try:
        with torch.no_grad():
            order, twice, feeds, output_bytes = trace(pruned, plan, batches[0][:2])
        for name in plan.layers:
            if name not in order and plan.layers[name].kind not in SILENT and owner(plan.layers, name) is None:
                _note(notes, name, "forward never calls it as a module (its weights are read directly)")
        fit = _Fit(models, plan, weights, keep, sizes, pruned, batches, feeds, ridge, positions, reduce)
        attention = [name for name in order if plan.layers[name].kind == "mha"]
        attention = call_reasons(pruned, attention, batches[0][:2]) if attention else {}
        todo = []
        for name in order:
            reason = layer_note(plan, name, pruned.get_submodule(name), twice, attention, fit.source(name) != name)
            if reason is None:
                todo.append(name)
            elif reason:
                _note(notes, name, reason)
        for wave in waves(todo, stored_bytes(plan, output_bytes), sum(len(b) for b in batches), TARGET_BYTES):
            stored = fit.targets(wave) if len(wave) > 1 else {}
            for name in wave:
                if name in attention:
                    fit.refit_attention(name, stored.pop(name, None))
                else:
                    fit.refit(name, stored.pop(name, None))
    finally:
        for m, mode in modes:
            m.train(mode)
    return pruned


def pruned_device(model: nn.Module) -> torch.device:
    """Where `model`'s first parameter lives (the CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _note(notes: Optional[List[str]], name: str, reason: str) -> None:
    if notes is not None:
        notes.append(f"repair: '{name}' left as pruned: {reason}")
