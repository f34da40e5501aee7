"""Rules for the ATen operations of an exported graph (`export.py`) that have no torch.fx twin in `ops.py`.

`exported_rule` dispatches one node: the rules for shapes, positions and
constants are in `aten_views.py`; the layers and attention are here:

- attention (`scaled_dot_product_attention`, or `matmul` and `softmax` written
  out): queries, keys and values share their heads; with fewer key/value heads
  (grouped-query attention) one unit is a key/value head with its group of
  query heads;
- `embedding` (a layer from token ids), `addmm` (GPT-2's `Conv1D`, a linear
  layer with its weight transposed), a mean over the channels (RMSNorm, a
  channels-first LayerNorm: each member's block on its own in the concatenated
  graph), a split of a fused projection (`Spaces.cut`), indexing positions.
"""

import torch
import torch.nn.functional as F
from torch.fx.node import Node

from ntdist.fusion.analysis.aten_positions import _cat, _index, _pad, _roll, _select, _slice, _unbind
from ntdist.fusion.analysis.aten_views import (BINARY, KEEP, MINE, UNARY, VIEWS, Stacked, _at, _binary, _constant,
                                               _expand, _hidden, _keep, _moved, _shape, _squeeze, _trainable, _unary,
                                               _unsqueeze, _view, _with_param, aten)
from ntdist.fusion.analysis.functional import record
from ntdist.fusion.analysis.plan import IN, Param, Tup, Val
from ntdist.fusion.analysis.shapes import mean, one, refuse

def exported_rule(node, gm, env, sp, layers, nonlinear):
    """The value of an exported graph's `node`, or MINE when the rules of `ops.py` apply."""
    ins = [env.get(a) for a in node.all_input_nodes]
    if any(isinstance(v, Stacked) for v in ins) and node.target not in STACKED:
        refuse(node.name, "works on stacked parts of channels (only permute, transpose, unbind, select follow them)")
    if node.target in RULES:
        return RULES[node.target](node, gm, env, sp, layers, nonlinear)
    if not any(_hidden(sp, v) or _trainable(gm, v) for v in ins):
        return _constant(node) if _shape(node) else None
    return MINE


def _split(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if not _hidden(sp, x):
        return None
    src = _shape(node.args[0])
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(src)
    size = node.args[1]
    sizes = [size] * (src[dim] // size) + ([src[dim] % size] if src[dim] % size else []) \
        if isinstance(size, int) else list(size)
    return _pieces(node, x, src, dim, sizes, sp, "split")


def _chunk(node, gm, env, sp, layers, nonlinear):
    """`chunk(n)`: n parts of the channels; in the concatenated graph each part holds every member's part."""
    x = env.get(node.args[0])
    if not _hidden(sp, x):
        return None
    src = _shape(node.args[0])
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(src)
    step = -(-src[dim] // node.args[1])
    sizes = [min(step, src[dim] - lo) for lo in range(0, src[dim], step)]
    return _pieces(node, x, src, dim, sizes, sp, None)


def _pieces(node, x, src, dim, sizes, sp, rewrite):
    """The parts of a split or chunk of `x`: along the channels, they must end where its layers' outputs do."""
    if dim != x.cdim:
        return Tup(tuple(x for _ in sizes))
    edges = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    bounds = [0]
    for d in x.lay:
        bounds.append(bounds[-1] + sp.size[d.space] * d.factor)
    inside = [e for e in edges if e not in bounds]
    if inside:
        if len(x.lay) != 1 or len(sp.creators(x.lay[0].space)) != 1:
            refuse(node.name, f"splits channels at {edges}, inside one layer's output shared by several layers")
        sp.cut(sp.creators(x.lay[0].space).pop(), inside)
        refuse(node.name, f"splits channels at {inside}, inside one layer's output")
    if rewrite:
        sp.rewrites.append((node.name, rewrite, 1))
    pieces, cuts = [], [0] + edges + [src[dim]]
    for lo, hi in zip(cuts, cuts[1:]):
        pieces.append(Val(tuple(d for d, b in zip(x.lay, bounds) if lo <= b < hi), len(src), None, x.cdim))
    return Tup(tuple(pieces))


def _heads(node, q, k, sp):
    """Join the heads of queries `q` and keys `k`; with fewer key heads, a unit is a key head and its query group."""
    hq, hk = _shape(node.args[0])[q.cdim], _shape(node.args[1])[k.cdim]
    if len(q.lay) != 1 or len(k.lay) != 1 or hq % hk:
        refuse(node.name, f"attends with {hq} query heads to {hk} key heads in a way the fusion does not follow")
    a, b = q.lay[0], k.lay[0]
    want = b.factor * (hq // hk)
    if a.factor != want:        # one side's layers must open coarser units: ask, and walk again
        if a.factor < want:
            sp.coarsen(a.space, want // a.factor if want % a.factor == 0 else want)
        else:
            sp.coarsen(b.space, a.factor // want if a.factor % want == 0 else a.factor)
        return
    sp.union(a.space, b.space)


def _attention(node, gm, env, sp, layers, nonlinear):
    q, k, v = (env.get(a) for a in node.args[:3])
    if not all(_hidden(sp, t) for t in (q, k, v)):
        refuse(node.name, "attends over queries, keys or values that are not all hidden features")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, Node) and _hidden(sp, env.get(mask)):
        refuse(node.name, "uses hidden features as an attention mask")
    if isinstance(mask, Node) and _trainable(gm, env.get(mask)):     # a bias per head (Swin's position table)
        shape = _shape(mask)
        _with_param(node, q, env.get(mask), shape, q.cdim - (len(_shape(node.args[0])) - len(shape)), gm, sp, layers)
    if any(t.cdim != len(_shape(a)) - 3 for t, a in zip((q, k, v), node.args[:3])):
        refuse(node.name, "attends over tensors whose heads are not the dimension before positions and features")
    sp.union_layouts(k.lay, v.lay, node.name)
    _heads(node, q, k, sp)
    return _at(node, q, q.cdim)


def _matmul(node, gm, env, sp, layers, nonlinear):
    a, b = (env.get(n) for n in node.args[:2])
    if not (_hidden(sp, a) and _hidden(sp, b)):
        refuse(node.name, "multiplies a feature tensor by a matrix the fusion does not know")
    nd = len(_shape(node))
    if a.cdim >= len(_shape(node.args[0])) - 2 or b.cdim >= len(_shape(node.args[1])) - 2:
        refuse(node.name, "multiplies matrices along the channel dimension")
    _heads(node, a, b, sp)
    nonlinear.append((node.name, a.lay))
    return _at(node, a, nd - (len(_shape(node.args[0])) - a.cdim))


def _softmax(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if not _hidden(sp, x):
        return _constant(node)
    if node.args[1] % len(_shape(node)) == x.cdim:
        refuse(node.name, "takes a softmax over the channels")
    nonlinear.append((node.name, x.lay))
    return x


def _mean(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if not _hidden(sp, x):
        return _constant(node)
    nd = len(_shape(node.args[0]))
    dims = [d % nd for d in node.args[1]]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if x.cdim not in dims:
        return mean(node.name, node, x, dims, keep)
    if dims != [x.cdim] or not keep or len(x.lay) != 1:
        refuse(node.name, "averages over the channels together with other dimensions, or concatenated channels")
    sp.rewrites.append((node.name, "mean", x.cdim))
    nonlinear.append((node.name, x.lay))
    return x


def _group_norm(node, gm, env, sp, layers, nonlinear):
    """`group_norm(x, groups, weight, bias)` on one layer's channels: k times the groups in the concatenation."""
    x, weight, bias = (env.get(a) if isinstance(a, Node) else None for a in (node.args[0], *node.args[2:4]))
    if not _hidden(sp, x) or x.cdim != 1 or len(x.lay) != 1 or x.lay[0].factor != 1:
        refuse(node.name, "normalises groups of channels that are not one layer's channels first")
    params = [p for p in (weight, bias) if p is not None]
    if not all(_trainable(gm, p) for p in params):
        refuse(node.name, "normalises groups with tensors that are not parameters")
    if params:
        record(layers, sp, _owner(node, params), "bn", x.lay, x.lay)
    sp.rewrites.append((node.name, "arg", 1))
    nonlinear.append((node.name, x.lay))
    return x


def _owner(node, params):
    owners = {p.name.rpartition(".")[0] for p in params}
    if len(owners) != 1:
        refuse(node.name, f"reads {sorted(p.name for p in params)}; the fusion follows a layer's own tensors only")
    return owners.pop()


def _embedding(node, gm, env, sp, layers, nonlinear):
    weight, ids = env.get(node.args[0]), env.get(node.args[1])
    if not _trainable(gm, weight) or _hidden(sp, ids):
        refuse(node.name, "looks up an embedding the fusion does not follow (a table indexed by features)")
    owner = _owner(node, [weight])
    width = _shape(node.args[0])[1]
    out = record(layers, sp, owner, "embed", None if owner in layers else sp.open(owner, width), one(IN))
    nd = len(_shape(node))
    return Val(out, nd, None, nd - 1)


def _tied_linear(node, gm, env, sp, layers, nonlinear):
    """`F.linear` on an embedding table (tied input and output embeddings): the table's width is its input."""
    weight = env.get(node.args[1])
    owner = weight.name.rpartition(".")[0] if isinstance(weight, Param) else None
    if owner is None or layers.get(owner) is None or layers[owner].kind != "embed":
        return MINE
    x = env.get(node.args[0])
    if len(node.args) > 2 and node.args[2] is not None or not _hidden(sp, x):
        refuse(node.name, "reads a tied embedding table with a bias or on the model input")
    sp.union_layouts(layers[owner].out, x.lay, node.name)
    sp.rewrites.append((node.name, "tied", sp.find(layers[owner].out[0].space)))
    nd = len(_shape(node))
    return Val(one(sp.new(_shape(node.args[1])[0], "")), nd, None, nd - 1)


def _addmm(node, gm, env, sp, layers, nonlinear):
    bias, x, weight = (env.get(a) for a in node.args[:3])
    if not (_trainable(gm, bias) and _trainable(gm, weight)) or not isinstance(x, Val) or x.cdim != 1:
        refuse(node.name, "multiplies features by a matrix that is not one layer's weight")
    owner = _owner(node, [bias, weight])
    width = _shape(node.args[2])[1]
    out = record(layers, sp, owner, "tlinear", None if owner in layers else sp.open(owner, width), x.lay)
    return Val(out, 2, None, 1)


RULES = {**{t: _binary for t in BINARY}, **{t: _unary for t in UNARY}, **{t: _view for t in VIEWS},
         **{t: _keep for t in KEEP}, aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
         aten.expand.default: _expand, aten.split.Tensor: _split, aten.split_with_sizes.default: _split,
         aten.chunk.default: _chunk, aten.group_norm.default: _group_norm,
         aten.unbind.int: _unbind, aten.roll.default: _roll, torch.permute: _moved, torch.transpose: _moved, torch.cat: _cat, aten.pad.default: _pad, aten.constant_pad_nd.default: _pad,
         aten.scaled_dot_product_attention.default: _attention, aten.matmul.default: _matmul,
         aten.softmax.int: _softmax, aten._softmax.default: _softmax, aten.mean.dim: _mean,
         aten.index.Tensor: _index, aten.slice.Tensor: _slice, aten.select.int: _select,
         aten.embedding.default: _embedding, F.linear: _tied_linear, aten.addmm.default: _addmm}
STACKED = {torch.permute, torch.transpose, aten.unbind.int, aten.select.int, *KEEP}
