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

from ntdist.errors import UserError
from ntdist.fusion.analysis.plan import Plan, TensorSpec


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
                memo[id(p)] = nn.Parameter(torch.empty(0, device=p.device), requires_grad=p.requires_grad)
        for b in mod._buffers.values():
            if b is not None:
                memo[id(b)] = torch.empty(0, device=b.device)
    model = copy.deepcopy(template, memo)
    installed = {}      # tied parameters (one tensor under two names) stay one parameter
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr in list(mod._parameters):
            if mod._parameters[attr] is not None:
                old = mod._parameters[attr]
                if id(old) not in installed:
                    installed[id(old)] = nn.Parameter(new[f"{mname}.{attr}" if mname else attr],
                                                      requires_grad=old.requires_grad)
                mod._parameters[attr] = installed[id(old)]
        for attr in list(mod._buffers):
            if mod._buffers[attr] is not None:
                mod._buffers[attr] = new[f"{mname}.{attr}" if mname else attr]
    return model


class Selection:
    """Where each member's kept units of every space come from and where they go."""

    def __init__(self, sizes: List[Dict[int, int]], keep: Optional[Dict[int, Optional[torch.Tensor]]], device):
        self.sizes, self.parts, self.new_size, self._cache = sizes, {}, {}, {}
        self.device = device   # of the weights: every index tensor made here lives there
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
            self._cache[key] = (idx[:, None] * factor + torch.arange(factor, device=idx.device)).reshape(-1)
        return self._cache[key], pos * factor, count * factor

    def length(self, layout) -> Optional[int]:
        """The result's size along a dimension with this layout (None for an unwidened one)."""
        return None if layout is None else sum(self.new_size[d.space] * d.factor for d in layout)

    def place(self, layout, member: int):
        """(source indices or None, destination) of member's kept entries along a dimension with `layout`.

        The destination is (start, count) for one part; for a concatenation it is
        an index tensor, since each part puts every member's block in its own place.
        """
        if len(layout) == 1:
            idx, start, count = self.index(layout[0].space, layout[0].factor, member)
            return idx, (start, count)
        key = (layout, member)
        if key not in self._cache:
            src, dst, whole, local, result = [], [], True, 0, 0
            for d in layout:
                idx, start, count = self.index(d.space, d.factor, member)
                n = self.sizes[member][d.space] * d.factor
                whole = whole and idx is None
                src.append(local + (torch.arange(n, device=self.device) if idx is None else idx))
                dst.append(torch.arange(result + start, result + start + count, device=self.device))
                local += n
                result += self.new_size[d.space] * d.factor
            self._cache[key] = (None if whole else torch.cat(src), torch.cat(dst))
        return self._cache[key]


def _combine(ts: Sequence[torch.Tensor], dims, sel: Selection, weights) -> torch.Tensor:
    wide = [(d, lay) for d, lay in enumerate(dims) if lay is not None]
    if not wide:
        acc = ts[0] * weights[0]
        for t, w in zip(ts[1:], weights[1:]):
            acc.add_(t, alpha=w)
        return acc
    shape = list(ts[0].shape)
    for d, lay in wide:
        shape[d] = sel.length(lay)
    make = torch.empty if len(wide) == 1 else torch.zeros
    out = make(shape, dtype=ts[0].dtype, device=ts[0].device)
    for m, t in enumerate(ts):
        piece, target, scatter = t, out, []
        for d, lay in wide:
            src, dst = sel.place(lay, m)
            if src is not None:
                piece = piece.index_select(d, src)
            if isinstance(dst, tuple):
                target = target.narrow(d, *dst)
            else:
                scatter.append((d, dst))
        if piece.numel() == 0:
            continue
        if weights is not None and weights[m] != 1.0:
            piece = piece * weights[m]
        if not scatter:
            target.copy_(piece)
            continue
        for d, dst in scatter[:-1]:     # other members' entries in these slices are cross weights: zero
            shape = list(piece.shape)
            shape[d] = target.shape[d]
            piece = piece.new_zeros(shape).index_copy_(d, dst, piece)
        target.index_copy_(scatter[-1][0], scatter[-1][1], piece)
    return out


def assembled_tensor(spec: TensorSpec, ts: Sequence[torch.Tensor], sel: Selection, weights: Sequence[float]):
    """One tensor of `assemble`'s result from the members' tensors `ts` of that name.

    `ts` is read member by member (the first one twice), so a sequence that loads each tensor on access holds
    one member's tensor at a time beside the result (`commands.lazyfuse`)."""
    if spec.role == "shared":
        return ts[0].clone()
    if spec.role == "counter":
        return torch.stack(list(ts)).max(0).values
    return _combine(ts, spec.dims, sel, weights if spec.role == "output" else None)


def assemble(models: Sequence[nn.Module], plan: Plan, weights: Sequence[float],
             keep: Optional[Dict[int, Optional[torch.Tensor]]] = None, template: nn.Module = None,
             sizes: Optional[List[Dict[int, int]]] = None) -> nn.Module:
    """The concatenation of `models` (output weights `weights`, summing to 1) restricted to `keep`.

    `keep[space]` is a sorted LongTensor of indices into the concatenated space
    (member 0's units first), or None to keep every unit. `sizes` holds each model's
    space sizes where its tensors cannot tell them (a concatenated model: `concat_sizes`).
    """
    all_ts = [tensors_of(m) for m in models]
    sizes = sizes if sizes is not None else [plan.space_sizes(ts) for ts in all_ts]
    sel = Selection(sizes, keep, next(iter(all_ts[0].values())).device)
    new = {}
    with torch.no_grad():
        for name, spec in plan.tensors.items():
            new[name] = assembled_tensor(spec, [t[name] for t in all_ts], sel, weights)
    model = clone_with(template if template is not None else models[0], new)
    _set_attributes(model, models, plan, sel)
    return model


def _set_attributes(model: nn.Module, members, plan: Plan, sel: Selection):
    for name, layer in plan.layers.items():
        if layer.kind in ("param", "lnf"):
            continue
        mod = model.get_submodule(name)
        out_n, in_n = sel.length(layer.out), sel.length(layer.inp)
        if layer.kind == "linear":
            mod.out_features = mod.weight.shape[0]
            mod.in_features = mod.weight.shape[1]
        elif layer.kind == "embed":
            mod.embedding_dim = mod.weight.shape[1]
        elif layer.kind == "tlinear" and hasattr(mod, "nf"):
            mod.nf = mod.weight.shape[1]
        elif layer.kind == "conv":
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = mod.weight.shape[1] * getattr(mod, "groups", 1)
        elif layer.kind == "dwconv":
            mod.in_channels = mod.out_channels = mod.groups = out_n
        elif layer.kind == "gconv":
            mod.groups = in_n // mod.weight.shape[1]
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = in_n
        elif layer.kind == "bn" and out_n is not None:
            mod.num_features = out_n
        elif layer.kind == "ln" and out_n is not None:
            mod.normalized_shape = (out_n,)
        elif layer.kind == "heads":
            mod.n_heads = out_n
            if out_n * mod.head_dim != in_n:      # its forward reshapes the heads back to the stream's width
                raise UserError(f"cannot prune attention '{name}' to {out_n} heads of {mod.head_dim} features "
                                f"with {in_n} channels in its input; choose a width that keeps both in proportion")
        elif layer.kind == "mha":
            mod.embed_dim = mod.kdim = mod.vdim = in_n
            mod.num_heads = out_n // (3 * mod.head_dim)
            if mod.num_heads * mod.head_dim != in_n:
                raise UserError(f"cannot prune attention '{name}' to {mod.num_heads} heads of {mod.head_dim} "
                                f"features with {in_n} channels in its input; keep the members' width")
