"""Build a model from members' tensors: the concatenated (wide) model, optionally pruned on the fly.

`assemble(models, plan, weights, keep)` computes every parameter and buffer of
the model that concatenating `models` and then keeping only the units `keep`
would give, without ever materialising the wide model: each member's block is
index-selected and copied straight into its place. With `keep=None` the result
is the full concatenation. Hidden weights are block-diagonal (cross-member
weights exactly zero); output layers take each member's block scaled by its
weight and the weighted average of biases, so the model computes exactly the
weighted average of the members' outputs.
"""

import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ntdist.fusion.plan import Plan


def tensors_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by state-dict name (shared ones listed under each name)."""
    out = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                out[f"{mname}.{attr}" if mname else attr] = t.detach()
    return out


def clone_with(template: nn.Module, new: Dict[str, torch.Tensor]) -> nn.Module:
    """Deep-copy `template` without copying its tensors, then install the tensors in `new`."""
    memo = {}
    for mod in template.modules():
        for p in mod._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(torch.empty(0), requires_grad=p.requires_grad)
        for b in mod._buffers.values():
            if b is not None:
                memo[id(b)] = torch.empty(0)
    model = copy.deepcopy(template, memo)
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr in list(mod._parameters):
            if mod._parameters[attr] is not None:
                old = mod._parameters[attr]
                mod._parameters[attr] = nn.Parameter(new[f"{mname}.{attr}" if mname else attr],
                                                     requires_grad=old.requires_grad)
        for attr in list(mod._buffers):
            if mod._buffers[attr] is not None:
                mod._buffers[attr] = new[f"{mname}.{attr}" if mname else attr]
    return model


class _Selection:
    """Where each member's kept units of every space come from and where they go."""

    def __init__(self, sizes: List[Dict[int, int]], keep: Optional[Dict[int, Optional[torch.Tensor]]]):
        self.sizes, self.parts, self.new_size, self._cache = sizes, {}, {}, {}
        for s in sizes[0]:
            offset, pos, parts = 0, 0, []
            chosen = keep.get(s) if keep else None
            for m, size in enumerate(sizes):
                n = size[s]
                if chosen is None:
                    parts.append((None, pos, n))
                else:
                    lo = torch.searchsorted(chosen, offset)
                    hi = torch.searchsorted(chosen, offset + n)
                    local = chosen[lo:hi] - offset
                    parts.append((None if len(local) == n else local, pos, len(local)))
                offset += n
                pos += parts[-1][2]
            self.parts[s], self.new_size[s] = parts, pos

    def index(self, space: int, factor: int, member: int):
        """Local indices (expanded by `factor`) of member's kept units, their start and count in the result."""
        idx, pos, count = self.parts[space][member]
        if idx is None or factor == 1:
            return idx, pos * factor, count * factor
        key = (space, factor, member)
        if key not in self._cache:
            self._cache[key] = (idx[:, None] * factor + torch.arange(factor)).reshape(-1)
        return self._cache[key], pos * factor, count * factor


def _combine(ts: Sequence[torch.Tensor], dims, sel: _Selection, weights) -> torch.Tensor:
    wide = [(d, dim) for d, dim in enumerate(dims) if dim is not None]
    if not wide:
        acc = ts[0] * weights[0]
        for t, w in zip(ts[1:], weights[1:]):
            acc.add_(t, alpha=w)
        return acc
    shape = list(ts[0].shape)
    for d, dim in wide:
        shape[d] = sel.new_size[dim.space] * dim.factor
    make = torch.empty if len(wide) == 1 else torch.zeros
    out = make(shape, dtype=ts[0].dtype, device=ts[0].device)
    for m, t in enumerate(ts):
        piece, target, empty = t, out, False
        for d, dim in wide:
            idx, start, count = sel.index(dim.space, dim.factor, m)
            if count == 0:
                empty = True
                break
            if idx is not None:
                piece = piece.index_select(d, idx)
            target = target.narrow(d, start, count)
        if empty:
            continue
        target.copy_(piece)
        if weights is not None and weights[m] != 1.0:
            target.mul_(weights[m])
    return out


def assemble(models: Sequence[nn.Module], plan: Plan, weights: Sequence[float],
             keep: Optional[Dict[int, Optional[torch.Tensor]]] = None, template: nn.Module = None) -> nn.Module:
    """The concatenation of `models` (output weights `weights`, summing to 1) restricted to `keep`.

    `keep[space]` is a sorted LongTensor of indices into the concatenated space
    (member 0's units first), or None to keep every unit.
    """
    all_ts = [tensors_of(m) for m in models]
    sizes = [plan.space_sizes(ts) for ts in all_ts]
    sel = _Selection(sizes, keep)
    new = {}
    with torch.no_grad():
        for name, spec in plan.tensors.items():
            ts = [t[name] for t in all_ts]
            if spec.role == "shared":
                new[name] = ts[0].clone()
            elif spec.role == "counter":
                new[name] = torch.stack(ts).max(0).values
            else:
                new[name] = _combine(ts, spec.dims, sel, weights if spec.role == "output" else None)
    model = clone_with(template if template is not None else models[0], new)
    _set_attributes(model, models, plan, sel)
    return model


def _set_attributes(model: nn.Module, members, plan: Plan, sel: _Selection):
    for name, layer in plan.layers.items():
        mod = model.get_submodule(name)
        out_n = sel.new_size.get(layer.out)
        in_n = sel.new_size.get(layer.inp)
        if layer.kind == "linear":
            mod.out_features = mod.weight.shape[0]
            mod.in_features = mod.weight.shape[1]
        elif layer.kind == "conv":
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = mod.weight.shape[1] * mod.groups
        elif layer.kind == "dwconv":
            mod.in_channels = mod.out_channels = mod.groups = out_n
        elif layer.kind == "gconv":
            mod.groups = sum(m.get_submodule(name).groups for m in members)
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = in_n
        elif layer.kind == "bn" and out_n is not None:
            mod.num_features = out_n
