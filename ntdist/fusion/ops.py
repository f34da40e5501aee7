"""Per-operation rules of the channel-space analysis (used by `ntdist.fusion.graph`).

`propagate` looks at one torch.fx node and returns the channel layout of its
result: layers open spaces, element-wise operations and pooling keep them,
residual additions merge them, a channel concatenation joins its parts'
layouts and a channel split cuts one at part boundaries. Any computation on
the model input alone is the same in every member and stays unwidened.
Anything whose widened form would not compute exactly the members' average
(LayerNorm, attention, unknown functions or modules) is refused with a
`UserError` naming the node.
"""

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import Node, map_arg

from ntdist.errors import UserError
from ntdist.fusion.plan import IN, Dim, Layer, Tup, Val

SUPPORTED = ("supported: Linear, Conv (plain, depthwise, grouped), BatchNorm, element-wise activations, "
             "dropout, stochastic depth, pooling, flatten, residual additions, channel cat and split")


class NeedShapes(Exception):
    """Raised deep inside a walk when a spatial size is needed: `analyze` then measures shapes and walks again.

    Not a user error: `analyze` turns it into one only when no input to measure with can be had.
    """


def refuse(name, why):
    """Raise the UserError for a node or layer that cannot be fused exactly."""
    raise UserError(f"cannot fuse layer '{name}': it {why}; {SUPPORTED}")


LINEAR_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
                  nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
NONLINEAR_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                     nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
                     nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ADAPTIVE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
KEEP_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, operator.neg, torch.neg,
              F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
# Functions by qualified name (so no model library is imported): each scales whole samples, never channels apart.
KEEP_NAMES = {"torchvision.ops.stochastic_depth.stochastic_depth"}
NONLINEAR_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
                   F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid,
                   torch.tanh, F.sigmoid, F.tanh, F.max_pool1d, F.max_pool2d, F.max_pool3d}
ADAPTIVE_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                  F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
POOL_FUNCS = ADAPTIVE_FUNCS
ADD_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
MUL_FUNCS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
STACK_FUNCS = {torch.stack, torch.hstack, torch.vstack}
NONTENSOR_FUNCS = {getattr, len}
KEEP_METHODS = {"contiguous", "clone", "detach", "dropout"}
NONLINEAR_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
NONTENSOR_METHODS = {"size", "dim", "numel"}
ADD_METHODS = {"add", "add_", "sub", "sub_"}
MUL_METHODS = {"mul", "mul_", "div", "div_"}


def _arg(node, i, key, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def tensor_args(node, env):
    """What the analysis knows about each tensor argument of `node` (in argument order, splits unpacked)."""
    found = []
    map_arg((node.args, node.kwargs), lambda n: found.append(env.get(n)) or n)
    out = []
    for v in found:
        out.extend(v.items if isinstance(v, Tup) else [v] if v is not None else [])
    return out


def one(space, factor=1):
    """The layout of a tensor whose channels are one space."""
    return (Dim(space, factor),)


def is_input(sp, lay):
    """Whether a layout is the model input's (computed the same way in every member)."""
    return len(lay) == 1 and sp.find(lay[0].space) == IN


def _record(layers, sp, name, kind, out, inp):
    if name in layers:
        old = layers[name]
        sp.union_layouts(old.inp, inp, name)
        return old.out
    if out is None:
        return None
    layers[name] = Layer(kind, out, inp)
    return out


def _adaptive_hw(size, x):
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    if any(s is None for s in sizes):
        return None
    hw = 1
    for s in sizes:
        hw *= int(s)
    return hw


def _flatten(name, x, start, end, sp):
    if x.ndim is not None and x.ndim <= 2 and start in (1, -1) and end in (-1, 1):
        return x
    if start != 1 or end not in (-1, (x.ndim or 0) - 1):
        refuse(name, f"flattens dimensions {start}..{end}; only flattening from dimension 1 keeps channels apart")
    if is_input(sp, x.lay):
        return Val(one(x.lay[0].space), 2, None)
    if x.hw is None:
        raise NeedShapes(f"cannot fuse layer '{name}': it flattens a feature map of unknown spatial size; "
                        "pass example_inputs (one input batch) so the fusion can measure it")
    return Val(tuple(Dim(d.space, d.factor * x.hw) for d in x.lay), 2, None)


def _module(name, mod, x, sp, layers, nonlinear):
    if isinstance(mod, nn.Linear):
        if x.ndim is not None and x.ndim > 2:
            refuse(name, f"(Linear) is applied to a {x.ndim}-d tensor; only [batch, features] inputs are supported")
        out = _record(layers, sp, name, "linear", None if name in layers else one(sp.new(mod.out_features)), x.lay)
        return Val(out, 2, None)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if any(d.factor != 1 for d in x.lay):
            refuse(name, "(Conv) consumes flattened features")
        if mod.groups == 1:
            out = _record(layers, sp, name, "conv", None if name in layers else one(sp.new(mod.out_channels)), x.lay)
        elif mod.groups == mod.in_channels == mod.out_channels:
            out = _record(layers, sp, name, "dwconv", x.lay, x.lay)
        else:
            if len(x.lay) != 1:
                refuse(name, "is a grouped convolution over concatenated channels")
            out = _record(layers, sp, name, "gconv", None if name in layers else one(sp.new(mod.out_channels)), x.lay)
        return Val(out, x.ndim or mod.weight.dim(), None)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        _record(layers, sp, name, "bn", x.lay, x.lay)
        return x
    if isinstance(mod, nn.Flatten):
        return _flatten(name, x, mod.start_dim, mod.end_dim, sp)
    if isinstance(mod, LINEAR_MODULES):
        return x
    if isinstance(mod, NONLINEAR_MODULES):
        if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
            refuse(name, "(PReLU) has one slope per channel")
        nonlinear.append((name, x.lay))
        return x
    if isinstance(mod, ADAPTIVE_MODULES):
        if "Max" in type(mod).__name__:
            nonlinear.append((name, x.lay))
        return Val(x.lay, x.ndim, _adaptive_hw(mod.output_size, x))
    refuse(name, f"({type(mod).__name__}) cannot be widened exactly")


def _binary(name, vals, sp, nonlinear, mul):
    if len(vals) < 2:
        return vals[0]
    a, b = vals[0], vals[1]
    lay = sp.union_layouts(a.lay, b.lay, name)
    if mul:
        nonlinear.append((name, lay))
    ndim = max(a.ndim or 0, b.ndim or 0) or None
    return Val(lay, ndim, a.hw if a.hw is not None else b.hw)


def _mean(name, node, x, dims, keep):
    if dims is None:
        refuse(name, "averages over all dimensions")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    nd = x.ndim
    if nd is None or any(d % nd in (0, 1) for d in dims):
        refuse(name, "averages over the batch or channel dimension")
    if keep:
        return Val(x.lay, nd, 1)
    return Val(x.lay, nd - len(dims), None if nd - len(dims) <= 2 else 1)


def _channel_dim(name, x, dim):
    """Whether `dim` is the channel dimension (1) of `x`."""
    if not isinstance(dim, int):
        refuse(name, f"uses a dimension given as {dim!r}, which the fusion cannot read")
    if x.ndim is not None:
        return dim % x.ndim == 1
    if dim >= 0:
        return dim == 1
    refuse(name, f"works along dimension {dim} of a tensor of unknown rank")


def _cat(name, node, vals, sp):
    dim = _arg(node, 1, "dim", 0)
    if not _channel_dim(name, vals[0], dim):
        lay = vals[0].lay
        for v in vals[1:]:
            lay = sp.union_layouts(lay, v.lay, name)
        return Val(lay, vals[0].ndim, None)
    if any(sp.find(d.space) == IN for v in vals for d in v.lay):
        refuse(name, "concatenates the model input with hidden channels")
    if len({v.ndim for v in vals}) != 1:
        refuse(name, "concatenates tensors of different ranks")
    return Val(sum((v.lay for v in vals), ()), vals[0].ndim, vals[0].hw)


def _split(name, node, x, sp, how):
    dim = _arg(node, 2, "dim", 0)
    if not _channel_dim(name, x, dim):
        refuse(name, "splits a tensor along a non-channel dimension")
    sizes = [sp.size[d.space] * d.factor for d in x.lay]
    total = sum(sizes)
    arg = _arg(node, 1, "split_size_or_sections" if how == "split" else "chunks", None)
    if how == "chunk":
        step = -(-total // arg)
        cuts = list(range(0, total, step))[1:]
    elif isinstance(arg, int):
        cuts = list(range(arg, total, arg))
    else:
        cuts = [sum(arg[:i + 1]) for i in range(len(arg) - 1)]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if any(c not in bounds for c in cuts):
        refuse(name, f"splits channels at {cuts}, inside one layer's output (its parts end at {bounds[1:]}); "
                     "only splits between concatenated parts can be widened exactly")
    pieces, edges = [], [0] + cuts + [total]
    for lo, hi in zip(edges, edges[1:]):
        pieces.append(Val(tuple(d for d, b in zip(x.lay, bounds) if lo <= b < hi), x.ndim, x.hw))
    return Tup(tuple(pieces))


def _function(node, target, vals, sp, layers, nonlinear):
    name = node.name
    if target in CAT_FUNCS:
        return _cat(name, node, vals, sp)
    if target in (torch.split, torch.chunk):
        return _split(name, node, vals[0], sp, target.__name__)
    if target in KEEP_FUNCS or f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}" in KEEP_NAMES:
        return vals[0]
    if target in NONLINEAR_FUNCS:
        nonlinear.append((name, vals[0].lay))
        return vals[0]
    if target in ADAPTIVE_FUNCS:
        if "max" in target.__name__:
            nonlinear.append((name, vals[0].lay))
        return Val(vals[0].lay, vals[0].ndim, _adaptive_hw(_arg(node, 1, "output_size", None), vals[0]))
    if target is torch.flatten:
        return _flatten(name, vals[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), sp)
    if target in ADD_FUNCS:
        return _binary(name, vals, sp, nonlinear, False)
    if target in MUL_FUNCS:
        return _binary(name, vals, sp, nonlinear, True)
    if target is torch.mean:
        return _mean(name, node, vals[0], _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
    if target in STACK_FUNCS:
        refuse(name, f"stacks tensors ({target.__name__}), adding a dimension the fusion does not follow")
    refuse(name, f"calls {getattr(target, '__name__', target)}, which the fusion does not know")


def _reshape(node, first, sp, shape):
    name = node.name
    src = node.args[0].meta.get("tensor_meta")
    if shape is not None and src is not None:
        src = tuple(src.shape)
        if src == shape:
            return first
        if len(shape) == 2 and shape[0] == src[0]:
            return _flatten(name, first, 1, -1, sp)
        refuse(name, f"reshapes {list(src)} to {list(shape)}, mixing channels")
    if first.ndim == 2:
        return first
    raise NeedShapes(f"cannot fuse layer '{name}': it reshapes a feature map; pass example_inputs "
                     "(one input batch) so the fusion can check the reshape")


def _method(node, target, first, vals, sp, nonlinear, shape):
    name = node.name
    if target in KEEP_METHODS:
        return first
    if target in NONLINEAR_METHODS:
        nonlinear.append((name, first.lay))
        return first
    if target in ADD_METHODS:
        return _binary(name, vals, sp, nonlinear, False)
    if target in MUL_METHODS:
        return _binary(name, vals, sp, nonlinear, True)
    if target == "flatten":
        return _flatten(name, first, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), sp)
    if target == "mean":
        return _mean(name, node, first, _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
    if target in ("split", "chunk"):
        return _split(name, node, first, sp, target)
    if target in ("view", "reshape"):
        return _reshape(node, first, sp, shape)
    refuse(name, f"calls the tensor method .{target}(), which the fusion does not know")


def propagate(node: Node, gm, env, sp, layers, nonlinear, shape):
    """Channel-space value of `node`'s result, or None for non-tensor results (sizes, shapes)."""
    vals = tensor_args(node, env)
    first = env.get(node.args[0]) if node.args and isinstance(node.args[0], Node) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(first, Tup):
        return first.items[node.args[1]] if isinstance(node.args[1], int) else refuse(
            node.name, "slices the parts of a channel split")
    if node.op == "call_module":
        if not vals:
            return None
        mod = gm.get_submodule(node.target)
        if all(is_input(sp, v.lay) for v in vals) and not isinstance(mod, nn.Flatten) and not any(
                True for _ in mod.parameters()):      # a parameter-free module on the input: same in every member
            return Val(one(IN), len(shape) if shape else vals[0].ndim, None)
        return _module(node.target, mod, vals[0], sp, layers, nonlinear)
    if node.op == "call_function" and (node.target in NONTENSOR_FUNCS or (
            node.target is operator.getitem and first is None)):
        return None
    if node.op == "call_method" and (node.target in NONTENSOR_METHODS or first is None):
        return None
    if not vals:
        return None
    if all(is_input(sp, v.lay) for v in vals):       # computed from the input alone: identical in every member
        return Val(one(IN), len(shape) if shape else None, None)
    if node.op == "call_function":
        if node.target is operator.getitem:
            refuse(node.name, "indexes or slices a feature tensor")
        return _function(node, node.target, vals, sp, layers, nonlinear)
    if node.op == "call_method":
        return _method(node, node.target, first, vals, sp, nonlinear, shape)
    return None
