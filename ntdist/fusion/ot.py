"""Optimal-transport fusion (Singh & Jaggi), in their two modes, with exact or entropic transport.

Every model is aligned to an anchor (model 0), space by space. The cost between an
anchor unit and a member unit comes from one of `OT_MODES`: "weights", the Euclidean
distance of their incoming weight rows (bias appended, inputs already aligned, so
spaces are solved in creation order), or "activations", the Euclidean distance of
their outputs on a batch of inputs (each unit's channel of every producing layer's
output before the non-linearity, over every input and position, centred per unit;
outputs do not depend on how earlier spaces are aligned, so every space is solved at
once). Either is summed over all layers producing the space, so residually coupled
channels share one transport. The transport is POT's exact `ot.emd` (`reg=0`) or
entropic Sinkhorn (`reg>0`, relative to the largest cost, log-domain for stability). The transport permutes (or, if it is not a permutation,
mixes) every tensor dimension of that space: weights, biases, BatchNorm scale,
shift and running statistics. The aligned models are then averaged. Cost
matrices are n x n (torch.cdist on rows), never n x n x D.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ntdist.errors import UserError, check_choice
from ntdist.fusion.wide.assemble import clone_with, tensors_of
from ntdist.fusion.baselines import average
from ntdist.fusion.checks import check_models, check_weights, check_widths
from ntdist.fusion.dedup.activations import activation_signatures
from ntdist.fusion.analysis.graph import Plan, analyze
from ntdist.fusion.analysis.plan import parts_of


OT_MODES = ("weights", "activations")


def check_ot(mode: str, reg: float, what: str = "") -> None:
    """One line for an unknown mode or a regularisation that is not a finite number >= 0."""
    check_choice(mode, OT_MODES, f"{what}ot_mode")
    if not 0 <= reg < float("inf"):
        raise UserError(f"{what}ot_reg must be 0 (exact transport) or a positive number (Sinkhorn), got {reg}")


class _Transport:
    """A row-stochastic n_anchor x n_member map, kept as an index vector when it is a permutation."""

    def __init__(self, plan: np.ndarray, device):
        n_a = plan.shape[0]
        nz = (plan > 0).sum(axis=1)   # the solver works on the host; the map lives beside the weights
        self.perm = torch.as_tensor(plan.argmax(axis=1), device=device) if (nz == 1).all() else None
        self.matrix = None if self.perm is not None else torch.as_tensor(plan * n_a, device=device)
        self.n = n_a
        self.ratio = plan.shape[1] / n_a   # member units per anchor unit

    def apply(self, t: torch.Tensor, d: int, factor: int, reader: bool = False) -> torch.Tensor:
        """`t` along dimension d onto the anchor's units: an anchor unit gets the mean of the member units sent to
        it; a layer that reads the space (`reader`) gets their sum instead (the same where the widths agree)."""
        if reader and self.ratio != 1:
            return self.apply(t, d, factor) * self.ratio
        if self.perm is not None:
            steps = torch.arange(factor, device=self.perm.device)
            idx = self.perm if factor == 1 else (self.perm[:, None] * factor + steps).reshape(-1)
            return t.index_select(d, idx)
        x = t.movedim(d, 0)
        rest = x.shape[1:]
        x = x.reshape(x.shape[0] // factor, -1)
        y = self.matrix.to(t.dtype) @ x
        return y.reshape(self.n * factor, *rest).movedim(0, d)


def _producers(plan: Plan):
    """space -> list of (weight name, bias name or None, [(dim, Layout) of its other channel dims]).

    Only layers whose output is the one space count (a depthwise conv or BatchNorm
    over a concatenation follows the transports of the parts it reads).
    """
    biases = {spec.module: name for name, spec in plan.tensors.items()
              if spec.part == "bias" and spec.dims and spec.dims[0] is not None}
    out: Dict[int, List] = {s: [] for s in plan.sizes}
    for name, spec in plan.tensors.items():
        if spec.part == "weight" and spec.dims and spec.dims[0] is not None and len(spec.dims[0]) == 1:
            ins = [(d, lay) for d, lay in enumerate(spec.dims) if d > 0 and lay is not None]
            out[spec.dims[0][0].space].append((name, biases.get(spec.module), ins))
    return out


def _move(maps, t: torch.Tensor, d: int, layout, sizes) -> torch.Tensor:
    """`t` with every part of `layout` along dimension d transported onto the anchor's units (dimension 0 is the
    units a layer produces, any other one those it reads)."""
    if len(layout) == 1:
        return maps[layout[0].space].apply(t, d, layout[0].factor, d > 0)
    return torch.cat([maps[p.space].apply(piece, d, p.factor, d > 0) for p, piece in parts_of(t, d, layout, sizes)],
                     d)


def _solve(cost: Optional[torch.Tensor], n: int, device, reg: float = 0.0) -> _Transport:
    """OT on the cost matrix (exact, or Sinkhorn with `reg` relative to the largest cost); the identity for a
    space no single layer produces alone (nothing to compare)."""
    import ot

    if cost is None:
        return _Transport(np.eye(n), device)
    n_a, n_m = cost.shape
    a = np.full(n_a, 1.0 / n_a)
    b = np.full(n_m, 1.0 / n_m)
    m = np.ascontiguousarray(cost.detach().double().cpu().numpy())
    if reg > 0:
        scale = m.max() if m.max() > 0 else 1.0
        return _Transport(ot.sinkhorn(a, b, m / scale, reg, method="sinkhorn_log", numItermax=10000), device)
    return _Transport(ot.emd(a, b, m, numItermax=max(100000, 50 * n_a * n_m)), device)


def activation_costs(anchor: nn.Module, member: nn.Module, plan: Plan, inputs) -> Dict[int, torch.Tensor]:
    """space -> [anchor units, member units] distances of the units' outputs on `inputs` (activations mode)."""
    sizes = plan.space_sizes(tensors_of(anchor))
    costs: Dict[int, torch.Tensor] = {}
    for space, parts in activation_signatures([anchor, member], plan, inputs, "ot_mode 'activations'").items():
        for part in parts:
            c = torch.cdist(part[:sizes[space]], part[sizes[space]:])
            costs[space] = c if space not in costs else costs[space] + c
    return costs


def align(member: Dict[str, torch.Tensor], anchor: Dict[str, torch.Tensor], plan: Plan,
          costs: Optional[Dict[int, torch.Tensor]] = None, reg: float = 0.0) -> Dict[str, torch.Tensor]:
    """The member's tensors with every hidden space transported onto the anchor's units: by the weights'
    costs, or by `costs` given per space (`activation_costs`; a space without one keeps its order)."""
    prods = _producers(plan)
    sizes, device = plan.space_sizes(member), next(iter(member.values())).device
    maps: Dict[int, _Transport] = {}
    deferred = set()

    def cost_of(s, use_all):
        total = None
        for wname, bname, ins in prods[s]:
            if not use_all and any(p.space not in maps for _, lay in ins for p in lay):
                deferred.add(s)
                continue
            wm, wa = member[wname], anchor[wname]
            for d, lay in ins:
                wm = _move(maps, wm, d, lay, sizes)
            rows_m, rows_a = wm.reshape(wm.shape[0], -1), wa.reshape(wa.shape[0], -1)
            if bname is not None:
                rows_m = torch.cat([rows_m, member[bname][:, None]], 1)
                rows_a = torch.cat([rows_a, anchor[bname][:, None]], 1)
            c = torch.cdist(rows_a.float(), rows_m.float())
            total = c if total is None else total.add_(c)
        return total

    with torch.no_grad():
        for s in plan.order:
            given = costs.get(s) if costs is not None else cost_of(s, False)
            maps[s] = _solve(given, sizes[s], device, reg)
        for s in [s for s in plan.order if s in deferred]:
            maps[s] = _solve(cost_of(s, True), sizes[s], device, reg)
        out = {}
        for name, spec in plan.tensors.items():
            t = member[name]
            if spec.role in ("layer", "output"):
                for d, lay in enumerate(spec.dims):
                    if lay is not None:
                        t = _move(maps, t, d, lay, sizes)
            out[name] = t.clone() if t is member[name] else t
    return out


def align_to(anchor: nn.Module, member: nn.Module, plan: Plan, mode: str = "weights", reg: float = 0.0,
             example_inputs=None) -> nn.Module:
    """A copy of `member` aligned to `anchor` (the OT mode's costs, exact or Sinkhorn transport)."""
    costs = activation_costs(anchor, member, plan, example_inputs) if mode == "activations" else None
    return clone_with(anchor, align(tensors_of(member), tensors_of(anchor), plan, costs, reg))


def aligned_members(models: Sequence[nn.Module], plan: Optional[Plan] = None, mode: str = "weights",
                    reg: float = 0.0, example_inputs=None) -> List[nn.Module]:
    """Model 0 and every other model aligned to it with OT (`mode`, `reg` as in `ot_fuse`): what OT averages,
    and what its repair fits to (`fusion.repair`, unit j of the average stands for unit j of each of them).
    `models` are checked by the caller (`check_models`)."""
    plan = plan if plan is not None else analyze(models[0], example_inputs)
    check_widths(models, plan)
    return [models[0]] + [align_to(models[0], m, plan, mode, reg, example_inputs) for m in models[1:]]


def ot_fuse(models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None, example_inputs=None,
            plan: Optional[Plan] = None, mode: str = "weights", reg: float = 0.0) -> nn.Module:
    """Align every model to model 0 with OT (`mode`: weights or activations on `example_inputs`, a few hundred
    training inputs; `reg`: 0 exact, > 0 Sinkhorn), then average them (weighted)."""
    check_ot(mode, reg)
    models = check_models(models, shapes=False)
    w = check_weights(weights, len(models))
    return average(aligned_members(models, plan, mode, reg, example_inputs), w)
