"""Optimal-transport fusion (Singh & Jaggi style, weights mode) with POT's exact `ot.emd`.

Every model is aligned to an anchor (model 0), space by space in creation
order: the cost between an anchor unit and a member unit is the Euclidean
distance of their incoming weight rows (bias appended, inputs already aligned),
summed over all layers producing the space, so residually coupled channels
share one transport. The transport permutes (or, if it is not a permutation,
mixes) every tensor dimension of that space: weights, biases, BatchNorm scale,
shift and running statistics. The aligned models are then averaged. Cost
matrices are n x n (torch.cdist on rows), never n x n x D.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ntdist.fusion.wide.assemble import clone_with, tensors_of
from ntdist.fusion.baselines import average
from ntdist.fusion.checks import check_models, check_weights
from ntdist.fusion.analysis.graph import Plan, analyze
from ntdist.fusion.analysis.plan import parts_of


class _Transport:
    """A row-stochastic n_anchor x n_member map, kept as an index vector when it is a permutation."""

    def __init__(self, plan: np.ndarray, device):
        n_a = plan.shape[0]
        nz = (plan > 0).sum(axis=1)   # the solver works on the host; the map lives beside the weights
        self.perm = torch.as_tensor(plan.argmax(axis=1), device=device) if (nz == 1).all() else None
        self.matrix = None if self.perm is not None else torch.as_tensor(plan * n_a, device=device)
        self.n = n_a

    def apply(self, t: torch.Tensor, d: int, factor: int) -> torch.Tensor:
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
    """`t` with every part of `layout` along dimension d transported onto the anchor's units."""
    if len(layout) == 1:
        return maps[layout[0].space].apply(t, d, layout[0].factor)
    return torch.cat([maps[p.space].apply(piece, d, p.factor) for p, piece in parts_of(t, d, layout, sizes)], d)


def _solve(cost: Optional[torch.Tensor], n: int, device) -> _Transport:
    """Exact OT on the cost matrix; the identity for a space no single layer produces alone (nothing to compare)."""
    import ot

    if cost is None:
        return _Transport(np.eye(n), device)
    n_a, n_m = cost.shape
    a = np.full(n_a, 1.0 / n_a)
    b = np.full(n_m, 1.0 / n_m)
    m = np.ascontiguousarray(cost.detach().double().cpu().numpy())
    return _Transport(ot.emd(a, b, m, numItermax=max(100000, 50 * n_a * n_m)), device)


def align(member: Dict[str, torch.Tensor], anchor: Dict[str, torch.Tensor], plan: Plan) -> Dict[str, torch.Tensor]:
    """The member's tensors with every hidden space transported onto the anchor's units."""
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
            maps[s] = _solve(cost_of(s, False), sizes[s], device)
        for s in [s for s in plan.order if s in deferred]:
            maps[s] = _solve(cost_of(s, True), sizes[s], device)
        out = {}
        for name, spec in plan.tensors.items():
            t = member[name]
            if spec.role in ("layer", "output"):
                for d, lay in enumerate(spec.dims):
                    if lay is not None:
                        t = _move(maps, t, d, lay, sizes)
            out[name] = t.clone() if t is member[name] else t
    return out


def ot_fuse(models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None, example_inputs=None,
            plan: Optional[Plan] = None) -> nn.Module:
    """Align every model to model 0 with exact OT, then average them (weighted)."""
    models = check_models(models)
    w = check_weights(weights, len(models))
    plan = plan if plan is not None else analyze(models[0], example_inputs)
    anchor = tensors_of(models[0])
    aligned = [models[0]] + [clone_with(models[0], align(tensors_of(m), anchor, plan)) for m in models[1:]]
    return average(aligned, w)
