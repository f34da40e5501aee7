"""Unit importance scores for structured magnitude pruning.

An importance is a plain callable `fn(view) -> Tensor[n]` giving one score per
unit of a channel space (higher = keep). `view` is a `SpaceView` of one
member's block of that space: the unit-major rows of the layers producing it,
their biases, the unit-major columns of the layers consuming it and the
BatchNorm scales. Cross-member weights of the concatenated model are exactly
zero, so row and column norms are the same whether they are computed on a
member's block or on the wide model; the fusion calls the function once per
member block and concatenates the scores.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

from ntdist.errors import UserError, suggest
from ntdist.fusion.analysis.plan import parts_of


@dataclass
class SpaceView:
    """Per-unit tensors of one channel space; every entry is [n_units, ...] (units on dim 0)."""

    producers: List[torch.Tensor] = field(default_factory=list)   # weight rows of producing layers
    biases: List[torch.Tensor] = field(default_factory=list)      # [n] biases of producing layers
    consumers: List[torch.Tensor] = field(default_factory=list)   # weight columns of consuming layers
    scales: List[torch.Tensor] = field(default_factory=list)      # [n] BatchNorm scales

    @property
    def size(self) -> int:
        return self.producers[0].shape[0]


def _norm(t: torch.Tensor, p: int) -> torch.Tensor:
    if t.dim() == 1:
        return t.abs()
    return torch.linalg.vector_norm(t, p, dim=tuple(range(1, t.dim())))


_CHUNK = 1 << 20   # elements squared at a time when summing a transposed view


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each unit (dim 0) of `t`."""
    if t.dim() > 1 and t.stride(0) < t.stride(1):
        # A consumer's columns (a transposed weight): a norm over the strided dimension runs about 20x
        # slower on a CPU than summing squares over contiguous blocks of the weight's rows.
        step = max(1, _CHUNK // max(1, t.numel() // t.shape[1]))
        total = torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
        for start in range(0, t.shape[1], step):
            block = t[:, start:start + step]
            total += block.square().sum(dim=tuple(range(1, block.dim())))
        return total
    return _norm(t, 2).square()


def l2(view: SpaceView) -> torch.Tensor:
    """L2 norm of each unit's incoming weights (rows of the producing layers, biases included)."""
    total = torch.zeros(view.size, dtype=torch.float64, device=view.producers[0].device)
    for t in view.producers + view.biases:
        total += _sq(t).double()
    return total.sqrt()


def l1(view: SpaceView) -> torch.Tensor:
    """L1 norm of each unit's incoming weights (rows of the producing layers, biases included)."""
    total = torch.zeros(view.size, dtype=torch.float64, device=view.producers[0].device)
    for t in view.producers + view.biases:
        total += _norm(t, 1).double()
    return total


def group_l2(view: SpaceView) -> torch.Tensor:
    """Torch-pruning's group magnitude: mean over the coupled layers of squared L2 norms.

    Each producing layer contributes its squared outgoing row, each consuming
    layer its squared incoming column and each BatchNorm its squared scale;
    biases are left out (as torch-pruning does by default).
    """
    parts = [_sq(t).double() for t in view.producers + view.consumers + view.scales]
    return torch.stack(parts).mean(0)


IMPORTANCES: Dict[str, Callable[[SpaceView], torch.Tensor]] = {"l2": l2, "group_l2": group_l2, "l1": l1}
DEFAULT_IMPORTANCE = "group_l2"   # chosen on digits and MNIST-1D, MLPs and CNNs (docs/FUSION.md)


def resolve(importance, what: str = "importance") -> Callable[[SpaceView], torch.Tensor]:
    """An importance callable from its name in IMPORTANCES, or the callable itself; `what` names it in errors."""
    if callable(importance):
        return importance
    if importance not in IMPORTANCES:
        raise UserError(f"unknown {what} '{importance}'{suggest(str(importance), IMPORTANCES)}; "
                        f"choose one of {sorted(IMPORTANCES)} or pass a callable")
    return IMPORTANCES[importance]


def space_views(tensors: Dict[str, torch.Tensor], plan, weight: float = 1.0) -> Dict[int, SpaceView]:
    """The SpaceView of every hidden space of one model; output-layer columns are scaled by `weight`.

    A dimension made of concatenated parts contributes each part to its own space.
    """
    views = {s: SpaceView() for s in plan.sizes}
    sizes = plan.space_sizes(tensors)
    kinds = {"bias": "biases", "scale": "scales"}
    for name, spec in plan.tensors.items():
        if spec.role not in ("layer", "output") or not spec.dims:
            continue
        t = tensors[name]
        first = spec.dims[0]
        if spec.part == "weight":
            if first is not None:
                for d, rows in parts_of(t, 0, first, sizes):
                    views[d.space].producers.append(rows.unflatten(0, (-1, d.factor)) if d.factor > 1 else rows)
            if len(spec.dims) > 1 and spec.dims[1] is not None:
                for d, col in parts_of(t.transpose(0, 1), 0, spec.dims[1], sizes):
                    if d.factor > 1:
                        col = col.unflatten(0, (col.shape[0] // d.factor, d.factor))
                    views[d.space].consumers.append(col * weight if spec.role == "output" else col)
        elif spec.part in kinds and first is not None:
            for d, vals in parts_of(t, 0, first, sizes):
                getattr(views[d.space], kinds[spec.part]).append(vals.unflatten(0, (-1, d.factor))
                                                                 if d.factor > 1 else vals)
    return views
