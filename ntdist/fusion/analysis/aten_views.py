"""Shape rules for an exported graph's ATen operations and the helpers every ATen rule shares (`aten_rules.py`).

Every node of an exported graph knows its output shape (`export.py`), so these
rules read shapes instead of guessing them. Whatever is computed from the model
input, buffers and lifted tensors alone (position ids, attention masks, rotary
tables) is a constant: the same in every member, never widened, and allowed to
meet hidden channels only where it broadcasts over them. A view with an
explicit shape that splits the channels into (units, features of each unit)
keeps the units as the channel dimension, each a unit of that many features
(`Spaces.coarsen` asks the layer to open its space so); merging them back
multiplies the factor again; the channel size written in the shape is recorded
(`Plan.rewrites`), k times in the concatenated graph. Position rules are in
`aten_positions.py`.
"""

import math
from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
from torch.fx.node import Node

from ntdist.fusion.analysis.plan import IN, Dim, Layer, Param, Val
from ntdist.fusion.analysis.shapes import is_input, one, refuse

aten = torch.ops.aten
MINE = object()     # returned by `exported_rule` for nodes the generic rules of `ops.py` handle
BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.sub.Scalar,
          aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar}
UNARY = {aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.erf.default,
         aten.abs.default, aten.reciprocal.default, aten.cos.default, aten.sin.default, aten.square.default}
KEEP = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.type_as.default, aten.contiguous.default,
        aten.clone.default, aten.alias.default, aten.detach.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _shape(node):
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return tuple(meta.shape) if meta is not None else ()


def _hidden(sp, v) -> bool:
    return isinstance(v, Val) and not is_input(sp, v.lay)


def _trainable(gm, v) -> bool:
    if not isinstance(v, Param):
        return False
    owner, _, attr = v.name.rpartition(".")
    return isinstance(getattr(gm.get_submodule(owner) if owner else gm, attr), nn.Parameter)


def _constant(node) -> Val:
    return Val(one(IN), len(_shape(node)) or None, None)


def _at(node, x, cdim) -> Val:
    return Val(x.lay, len(_shape(node)), None, cdim)


def _binary(node, gm, env, sp, layers, nonlinear):
    args = [a for a in node.args[:2] if isinstance(a, Node)]
    vals = [env.get(a) for a in args]
    params = [v for v in vals if _trainable(gm, v)]
    hidden = [(a, v) for a, v in zip(args, vals) if _hidden(sp, v)]
    if not hidden:
        if len(params) == 1 and node.target in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor):
            return _param_view(node, params[0])     # a parameter plus a mask: still one value per channel
        return MINE if params else _constant(node)
    nd = len(_shape(node))
    a, x = hidden[0]
    cdim = nd - (len(_shape(a)) - x.cdim)
    for b, v in zip(args, vals):
        side = _shape(b)
        where = cdim - (nd - len(side))
        if _hidden(sp, v):
            if len(side) - v.cdim != nd - cdim:
                refuse(node.name, "combines two feature tensors whose channels lie in different dimensions")
            if v is not x:
                sp.union_layouts(x.lay, v.lay, node.name)
        elif isinstance(v, Param) and _trainable(gm, v):
            _with_param(node, x, v, side, where, gm, sp, layers)
        elif 0 <= where < len(side) and side[where] != 1:
            refuse(node.name, "combines channels with a tensor computed from the input alone that varies along "
                              "them; the concatenated model has k times the channels")
    if node.target in (aten.mul.Tensor, aten.div.Tensor) and len(hidden) > 1:
        nonlinear.append((node.name, x.lay))
    return _at(node, x, cdim)


def _with_param(node, x, param, shape, axis, gm, sp, layers):
    """`x * p` or `x + p` with a parameter (or a view of one) that holds one value per channel of x."""
    owner, _, attr = param.name.rpartition(".")
    full = getattr(gm.get_submodule(owner) if owner else gm, attr)
    width = sum(sp.size[d.space] * d.factor for d in x.lay)
    if not 0 <= axis < len(shape) or shape[axis] != width:
        refuse(node.name, f"combines a feature tensor with parameter '{param.name}', which does not follow its channels")
    if full.dim() != len(shape):        # a view that added dimensions of size 1: find the channels in the tensor
        axes = [d for d, s in enumerate(full.shape) if s == width]
        if len(axes) != 1:
            refuse(node.name, f"combines a feature tensor with a view of '{param.name}' the fusion cannot place")
        axis = axes[0]
    old = layers.get(param.name)
    if old is not None:
        sp.union_layouts(old.inp, x.lay, node.name)
    else:
        layers[param.name] = Layer("param", x.lay, x.lay, axis)


def _unary(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if not _hidden(sp, x):
        return _constant(node) if not _trainable(gm, x) else refuse(
            node.name, f"computes with parameter '{x.name}' alone, which the fusion does not follow")
    if node.target is not aten.pow.Tensor_Scalar or node.args[1] != 1:
        nonlinear.append((node.name, x.lay))
    return x


def _keep(node, gm, env, sp, layers, nonlinear):
    """A conversion or copy: the values keep their channels."""
    x = env.get(node.args[0])
    if isinstance(x, Stacked):
        return x
    if isinstance(x, Param):
        return _param_view(node, x)
    return x if _hidden(sp, x) else _constant(node)


def _param_view(node, x):
    return Param(x.name, _shape(node))


def _unsqueeze(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if isinstance(x, Param):
        return _param_view(node, x)
    if not _hidden(sp, x):
        return _constant(node)
    nd = len(_shape(node))
    d = node.args[1] % nd
    return _at(node, x, x.cdim + (1 if d <= x.cdim else 0))


def _squeeze(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if not _hidden(sp, x):
        return _constant(node)
    src = _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else [d for d, s in enumerate(src) if s == 1]
    dims = [d % len(src) for d in (dims if isinstance(dims, (list, tuple)) else [dims]) if src[d % len(src)] == 1]
    if x.cdim in dims:
        refuse(node.name, "squeezes away the channel dimension")
    return _at(node, x, x.cdim - sum(1 for d in dims if d < x.cdim))


def _expand(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if isinstance(x, Param):
        return _param_view(node, x)
    if not _hidden(sp, x):
        return _constant(node)
    sizes, src = list(node.args[1]), _shape(node.args[0])
    cdim = x.cdim + len(sizes) - len(src)
    if sizes[cdim] not in (-1, src[x.cdim]):
        refuse(node.name, "expands the channel dimension")
    if sizes[cdim] != -1:
        sp.rewrites.append((node.name, "shape", cdim))
    return _at(node, x, cdim)


def _groups(src, dst):
    """Consecutive dimensions of `src` and `dst` whose sizes multiply to the same number, in order."""
    out, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and not (j < len(dst) and dst[j] == 1):
            out.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and not (i < len(src) and src[i] == 1):
            out.append(([], [j]))
            j += 1
            continue
        a, b, pa, pb = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                a.append(i)
                pa *= src[i]
                i += 1
            else:
                b.append(j)
                pb *= dst[j]
                j += 1
        out.append((a, b))
    return out


class Stacked(NamedTuple):
    """Equal parts of one layer's channels held along their own dimension `pdim` (a fused q/k/v projection viewed
    as [3, heads, head_dim]): part i has layout `parts[i]` along dimension `cdim`, until it is taken apart."""

    parts: Tuple
    pdim: int
    cdim: int


def _stack(node, x, sp, dst, b):
    """A view [..., p * c, ...] -> [..., p, units, features]: p parts, each split into units of features."""
    count, inner = dst[b[0]], math.prod(dst[d] for d in b[2:])
    total = sum(sp.size[d.space] * d.factor for d in x.lay)
    if len(x.lay) == 1:         # ask for the layer to open its output as `count` parts, and walk again
        creators = sp.creators(x.lay[0].space)
        if len(creators) != 1:
            refuse(node.name, "views the output of several layers as stacked parts")
        sp.cut(creators.pop(), [total // count * i for i in range(1, count)])
        refuse(node.name, f"views one layer's channels as {count} stacked parts")
    if len(x.lay) != count or len({sp.size[d.space] * d.factor for d in x.lay}) != 1:
        refuse(node.name, f"views {len(x.lay)} concatenated parts as {count} stacked ones")
    parts = []
    for d in x.lay:
        if d.factor % inner:
            sp.coarsen(d.space, inner // math.gcd(d.factor, inner))
        parts.append((Dim(d.space, max(1, d.factor // inner)),))
    if node.args[1][b[1]] != -1:
        sp.rewrites.append((node.name, "shape", b[1]))
    return Stacked(tuple(parts), b[0], b[1])


def _view(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if isinstance(x, Param):
        return _param_view(node, x)
    if not _hidden(sp, x):
        return _constant(node)
    src, dst = _shape(node.args[0]), _shape(node)
    a, b = next((a, b) for a, b in _groups(src, dst) if x.cdim in a)
    if len(a) == 1 and len(b) > 2 and dst[b[0]] > 1:
        return _stack(node, x, sp, dst, b)
    if a[0] != x.cdim:
        refuse(node.name, f"reshapes {list(src)} to {list(dst)}, merging channels into positions before them")
    lay = x.lay
    if len(a) > 1:          # channels merged with the dimensions after them: a coarser unit (heads back to features)
        if len(b) != 1:
            refuse(node.name, f"reshapes {list(src)} to {list(dst)}, mixing channels")
        inner = math.prod(src[d] for d in a[1:])
        lay = tuple(Dim(d.space, d.factor * inner) for d in lay)
    elif len(b) > 1:        # channels split into (units, features of each unit): the first holds the units
        inner = math.prod(dst[d] for d in b[1:])
        if len(lay) != 1:
            refuse(node.name, f"splits concatenated channels {list(src)} into {list(dst)}")
        d = lay[0]
        if d.factor % inner:        # ask for coarser units; the walk goes on to gather every such request
            sp.coarsen(d.space, inner // math.gcd(d.factor, inner))
        lay = (Dim(d.space, max(1, d.factor // inner)),)
    cdim = b[0]
    if node.args[1][cdim] != -1:
        sp.rewrites.append((node.name, "shape", cdim))
    return Val(lay, len(dst), None, cdim)


def _moved(node, gm, env, sp, layers, nonlinear):
    """`permute` or `transpose` of a parameter: a view of it; of stacked parts: both dimensions move; of features:
    the rules of `ops.py`."""
    x = env.get(node.args[0])
    if isinstance(x, Stacked):
        nd = len(_shape(node))
        if node.target is torch.permute:
            order = [d % nd for d in node.args[1]]
            return Stacked(x.parts, order.index(x.pdim), order.index(x.cdim))
        a, b = node.args[1] % nd, node.args[2] % nd
        swap = {a: b, b: a}
        return Stacked(x.parts, swap.get(x.pdim, x.pdim), swap.get(x.cdim, x.cdim))
    return _param_view(node, x) if isinstance(x, Param) else MINE


def _taken(x, dim, nd):
    """The Val of one part of stacked parts, taken out along `pdim` (the rank drops by one)."""
    return [Val(lay, nd - 1, None, x.cdim - (1 if x.pdim < x.cdim else 0)) for lay in x.parts]
