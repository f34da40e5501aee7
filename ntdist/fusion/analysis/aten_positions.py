"""Position rules for an exported graph's ATen operations (used by `aten_rules.py`).

Positions (batch, tokens, spatial places) may be indexed, sliced, selected,
padded, rolled, joined and unbound freely: each member does the same to every
one of its channels. Channels are taken only part by part: a slice that keeps
whole parts of a concatenation (its ends, k times further in the concatenated
graph, are a `Plan.rewrites` entry), one part of stacked parts (`Stacked`), or
a class token joined to the tokens along positions.
"""

from torch.fx.node import Node

from ntdist.fusion.analysis.aten_views import (MINE, Stacked, _at, _constant, _hidden, _param_view, _shape, _taken,
                                               _trainable, _with_param)
from ntdist.fusion.analysis.plan import Param, Tup, Val
from ntdist.fusion.analysis.shapes import refuse

def _index(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if isinstance(x, Param) and not any(_hidden(sp, env.get(i)) for i in node.args[1] if isinstance(i, Node)):
        return _param_view(node, x)      # a table read at fixed positions (relative position biases)
    if not _hidden(sp, x):
        return _constant(node)
    where = [d for d, i in enumerate(node.args[1]) if i is not None]
    if any(_hidden(sp, env.get(i)) for i in node.args[1] if isinstance(i, Node)):
        refuse(node.name, "indexes with hidden features")
    if x.cdim in range(where[0], where[-1] + 1) or where != list(range(where[0], where[-1] + 1)):
        refuse(node.name, "indexes the channels of a feature tensor")
    nd = len(_shape(node))
    return _at(node, x, x.cdim if x.cdim < where[0] else nd - (len(_shape(node.args[0])) - x.cdim))


def _slice(node, gm, env, sp, layers, nonlinear):
    """Positions sliced: the channels stay. Channels sliced: only whole parts of a concatenation are taken."""
    x = env.get(node.args[0])
    if isinstance(x, Param):
        return _param_view(node, x)
    if not _hidden(sp, x):
        return _constant(node)
    src = _shape(node.args[0])
    if (node.args[1] if len(node.args) > 1 else 0) % len(src) != x.cdim or _shape(node) == src:
        return _at(node, x, x.cdim)
    start, end = (min(max(a % src[x.cdim] if a < 0 else a, 0), src[x.cdim]) if a is not None else d
                  for a, d in zip((list(node.args[2:4]) + [None, None])[:2], (0, src[x.cdim])))
    if len(node.args) > 4 and node.args[4] != 1:
        refuse(node.name, "slices the channels of a feature tensor with a step")
    bounds = [0]
    for d in x.lay:
        bounds.append(bounds[-1] + sp.size[d.space] * d.factor)
    if start not in bounds or end not in bounds:
        refuse(node.name, f"slices channels {start}:{end} inside one layer's output (its parts end at {bounds[1:]})")
    sp.rewrites.append((node.name, "slice", 2))
    return Val(tuple(d for d, b in zip(x.lay, bounds) if start <= b < end), len(src), None, x.cdim)


def _select(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if isinstance(x, Stacked) and node.args[1] % len(_shape(node.args[0])) == x.pdim:
        return _taken(x, x.pdim, len(_shape(node.args[0])))[node.args[2]]
    if not _hidden(sp, x):
        return _constant(node)
    dim = node.args[1] % len(_shape(node.args[0]))
    if dim == x.cdim:
        refuse(node.name, "selects one channel of a feature tensor")
    return _at(node, x, x.cdim - (1 if dim < x.cdim else 0))


def _roll(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if not _hidden(sp, x):
        return _constant(node)
    dims = node.args[2] if len(node.args) > 2 else []
    if not dims or x.cdim in [d % len(_shape(node)) for d in dims]:
        refuse(node.name, "rolls the channels of a feature tensor")
    return x


def _pad(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if not _hidden(sp, x):
        return _constant(node)
    pads, nd = list(node.args[1]), len(_shape(node))
    padded = {nd - 1 - i // 2 for i, p in enumerate(pads) if p}
    if x.cdim in padded:
        refuse(node.name, "pads the channels of a feature tensor")
    return _at(node, x, x.cdim)


def _cat(node, gm, env, sp, layers, nonlinear):
    """Tokens joined along positions: hidden parts share their channels, a parameter part (a class token) follows them."""
    parts = list(node.args[0])
    vals = [env.get(p) for p in parts]
    hidden = [(p, v) for p, v in zip(parts, vals) if _hidden(sp, v)]
    if not hidden:
        return MINE if any(_trainable(gm, v) for v in vals) else _constant(node)
    nd = len(_shape(node))
    dim = (node.args[1] if len(node.args) > 1 else 0) % nd
    x = hidden[0][1]
    if dim == x.cdim:
        return MINE if len(hidden) == len(parts) else refuse(
            node.name, "concatenates hidden channels with a parameter or the input's channels")
    for p, v in zip(parts, vals):
        if _hidden(sp, v):
            if v.cdim != x.cdim:
                refuse(node.name, "concatenates feature tensors whose channels lie in different dimensions")
            sp.union_layouts(x.lay, v.lay, node.name)
        elif _trainable(gm, v):
            _with_param(node, x, v, _shape(p), x.cdim, gm, sp, layers)
        else:
            refuse(node.name, "concatenates hidden features with a tensor computed from the input alone")
    return _at(node, x, x.cdim)


def _unbind(node, gm, env, sp, layers, nonlinear):
    x = env.get(node.args[0])
    if isinstance(x, Stacked) and (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node.args[0])) == x.pdim:
        return Tup(tuple(_taken(x, x.pdim, len(_shape(node.args[0])))))
    if not _hidden(sp, x):
        return None
    src = _shape(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(src)
    if dim == x.cdim:
        refuse(node.name, "unbinds the channels of a feature tensor")
    return Tup(tuple(Val(x.lay, len(src) - 1, None, x.cdim - (1 if dim < x.cdim else 0)) for _ in range(src[dim])))


