"""Input validation shared by every fusion method: member count, architecture, weights, finiteness."""

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ntdist.errors import UserError


def _tensors(model: nn.Module):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def check_models(models: Sequence[nn.Module], min_count: int = 2, shapes: bool = True,
                 finite: bool = True) -> List[nn.Module]:
    """The models as a list; UserError unless there are enough, of one architecture (with finite values)."""
    models = list(models)
    if len(models) < min_count:
        raise UserError(f"fusion needs at least {min_count} models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise UserError(f"model {i} is a {type(m).__name__}, not a torch.nn.Module")
    ref = _tensors(models[0])
    for i, model in enumerate(models[1:], 1):
        if type(model) is not type(models[0]):
            raise UserError(f"model {i} is a {type(model).__name__} but model 0 is a "
                            f"{type(models[0]).__name__}; fuse models of one architecture")
        ts = _tensors(model)
        for name, t in ref.items():
            if name not in ts:
                raise UserError(f"model {i} has no parameter '{name}' (model 0 has shape {list(t.shape)}); "
                                "fuse models of one architecture")
            if shapes and ts[name].shape != t.shape:
                raise UserError(f"models differ at parameter '{name}': shape {list(t.shape)} in model 0 vs "
                                f"{list(ts[name].shape)} in model {i}; fuse models of one architecture")
        for name in ts:
            if name not in ref:
                raise UserError(f"model {i} has a parameter '{name}' that model 0 lacks; "
                                "fuse models of one architecture")
    if finite:
        check_finite(models)
    return models


def check_widths(models: Sequence[nn.Module], plan) -> bool:
    """Whether the members differ in width; UserError unless they differ in hidden widths only (every
    dimension of every tensor that is not a hidden space of `plan`, the analysis of model 0, agrees with
    model 0's) and the model is one of Linear, convolution and BatchNorm layers, where the concatenation
    of members of different widths is exact."""
    ref, differ = _tensors(models[0]), False
    for i, model in enumerate(models[1:], 1):
        for name, t in _tensors(model).items():
            r, spec = ref[name], plan.tensors.get(name)
            dims = spec.dims if spec is not None and spec.role != "shared" else ()
            for d in range(max(t.dim(), r.dim())):
                size, expected = (t.shape[d] if d < t.dim() else None), (r.shape[d] if d < r.dim() else None)
                if size == expected:
                    continue
                if t.dim() != r.dim() or d >= len(dims) or dims[d] is None:
                    raise UserError(f"models differ at parameter '{name}': shape {list(r.shape)} in model 0 vs "
                                    f"{list(t.shape)} in model {i}, and dimension {d} is no hidden width; fuse "
                                    "models of one architecture (members may differ in hidden widths only)")
                differ = True
    if differ:
        names = {"ln": "LayerNorms", "lnf": "LayerNorms", "mha": "attention", "heads": "attention heads",
                 "gconv": "grouped convolutions"}
        found = [names.get(layer.kind, f"{layer.kind} layers") for layer in plan.layers.values()
                 if layer.kind not in ("linear", "conv", "dwconv", "bn", "param")]
        found += [why for why, there in (("LayerNorms", plan.norms), ("channel shuffles", plan.shuffles or plan.atoms),
                                         ("channel counts written as constants", plan.widths),
                                         ("grouped convolutions", plan.coupled)) if there]
        if found:
            raise UserError(f"the members differ in width, which fuses only for models of Linear, convolution and "
                            f"BatchNorm layers; {type(models[0]).__name__} has {' and '.join(dict.fromkeys(found))}: "
                            "fuse members of one width")
    return differ


def check_finite(models: Sequence[nn.Module], skip=()) -> None:
    """UserError naming the model and tensor if any float parameter or buffer (not in `skip`) is NaN or inf.

    Each tensor is reduced to its minimum and maximum (which carry a NaN through), held as float64 (exact for
    every float dtype, so no finite value turns inf), and each device's extremes are checked together: one
    read back per device, however many tensors. Only when one is not finite are they read tensor by tensor.
    """
    named, extremes = [], {}
    for i, model in enumerate(models):
        for name, t in _tensors(model).items():
            if name in skip or not t.is_floating_point() or t.numel() == 0:
                continue
            named.append((i, name, t.device))
            extremes.setdefault(t.device, []).append(torch.stack(torch.aminmax(t.detach())).double())
    stacked = {device: torch.stack(pairs) for device, pairs in extremes.items()}
    if all(bool(torch.isfinite(pairs).all()) for pairs in stacked.values()):
        return
    finite = {device: iter(torch.isfinite(pairs).all(dim=1).tolist()) for device, pairs in stacked.items()}
    for i, name, device in named:
        if not next(finite[device]):
            raise UserError(f"model {i} has NaN or inf values in '{name}'; fuse trained, finite models")


def check_weights(weights: Optional[Sequence[float]], k: int) -> List[float]:
    """Output-average weights as floats (default 1 each, i.e. uniform); UserError if unusable."""
    if weights is None:
        return [1.0] * k
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise UserError(f"got {len(weights)} weights for {k} models; give one weight per model")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise UserError(f"weights must be positive finite numbers, got {weights}")
    return weights


def normalized(weights: Sequence[float]) -> List[float]:
    """Weights scaled to sum to one."""
    total = float(sum(weights))
    return [float(w) / total for w in weights]
