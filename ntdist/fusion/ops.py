"""Per-operation rules of the channel-space analysis (used by `ntdist.fusion.graph`).

`propagate` looks at one torch.fx node and returns the channel space of its
result: layers open spaces, element-wise operations and pooling keep them,
residual additions merge them. Anything whose widened form would not compute
exactly the members' average (LayerNorm, attention, channel concatenation,
unknown functions or modules) is refused with a `UserError` naming the node.
"""

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import Node, map_arg

from ntdist.errors import UserError
from ntdist.fusion.plan import IN, Layer, Val

SUPPORTED = ("supported: Linear, Conv (plain, depthwise, grouped), BatchNorm, element-wise activations, "
             "dropout, pooling, flatten and residual additions")


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
NONLINEAR_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
                   F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid,
                   torch.tanh, F.sigmoid, F.tanh, F.max_pool1d, F.max_pool2d, F.max_pool3d}
ADAPTIVE_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                  F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
POOL_FUNCS = ADAPTIVE_FUNCS
ADD_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
MUL_FUNCS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
CAT_FUNCS = {torch.cat, torch.concat, torch.stack, torch.hstack, torch.vstack}
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
    """What the analysis knows about each tensor argument of `node` (in argument order)."""
    found = []
    map_arg((node.args, node.kwargs), lambda n: found.append(env.get(n)) or n)
    return [v for v in found if v is not None]


def _record(layers, sp, name, kind, out, inp, factor=1):
    if name in layers:
        old = layers[name]
        if old.factor != factor:
            refuse(name, "is called on inputs of different spatial sizes")
        sp.union(old.inp, inp)
        return old.out
    if out is None:
        return None
    layers[name] = Layer(kind, out, inp, factor)
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
    if sp.find(x.space) == IN:
        return Val(x.space, 1, 2, None)
    if x.hw is None:
        raise NeedShapes(f"cannot fuse layer '{name}': it flattens a feature map of unknown spatial size; "
                        "pass example_inputs (one input batch) so the fusion can measure it")
    return Val(x.space, x.factor * x.hw, 2, None)


def _module(name, mod, x, sp, layers, nonlinear):
    if isinstance(mod, nn.Linear):
        if x.ndim is not None and x.ndim > 2:
            refuse(name, f"(Linear) is applied to a {x.ndim}-d tensor; only [batch, features] inputs are supported")
        out = _record(layers, sp, name, "linear", None if name in layers else sp.new(mod.out_features),
                      x.space, x.factor)
        return Val(out, 1, 2, None)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if x.factor != 1:
            refuse(name, "(Conv) consumes flattened features")
        if mod.groups == 1:
            out = _record(layers, sp, name, "conv", None if name in layers else sp.new(mod.out_channels), x.space)
        elif mod.groups == mod.in_channels == mod.out_channels:
            out = _record(layers, sp, name, "dwconv", x.space, x.space)
        else:
            out = _record(layers, sp, name, "gconv", None if name in layers else sp.new(mod.out_channels), x.space)
        return Val(out, 1, x.ndim or mod.weight.dim(), None)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        _record(layers, sp, name, "bn", x.space, x.space)
        return x
    if isinstance(mod, nn.Flatten):
        return _flatten(name, x, mod.start_dim, mod.end_dim, sp)
    if isinstance(mod, LINEAR_MODULES):
        return x
    if isinstance(mod, NONLINEAR_MODULES):
        if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
            refuse(name, "(PReLU) has one slope per channel")
        nonlinear.append((name, x.space))
        return x
    if isinstance(mod, ADAPTIVE_MODULES):
        if "Max" in type(mod).__name__:
            nonlinear.append((name, x.space))
        return Val(x.space, x.factor, x.ndim, _adaptive_hw(mod.output_size, x))
    refuse(name, f"({type(mod).__name__}) cannot be widened exactly")


def _binary(name, vals, sp, nonlinear, mul):
    if len(vals) < 2:
        return vals[0]
    a, b = vals[0], vals[1]
    if a.factor != b.factor:
        refuse(name, "combines tensors with different feature layouts")
    ra, rb = sp.find(a.space), sp.find(b.space)
    if ra != rb and IN in (ra, rb):
        refuse(name, "adds hidden channels to the model input; cannot widen exactly")
    space = sp.union(a.space, b.space)
    if mul:
        nonlinear.append((name, space))
    ndim = max(a.ndim or 0, b.ndim or 0) or None
    return Val(space, a.factor, ndim, a.hw if a.hw is not None else b.hw)


def _mean(name, node, x, dims, keep):
    if dims is None:
        refuse(name, "averages over all dimensions")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    nd = x.ndim
    if nd is None or any(d % nd in (0, 1) for d in dims):
        refuse(name, "averages over the batch or channel dimension")
    if keep:
        return Val(x.space, x.factor, nd, 1)
    return Val(x.space, x.factor, nd - len(dims), None if nd - len(dims) <= 2 else 1)


def propagate(node: Node, gm, env, sp, layers, nonlinear, shape):
    """Channel-space value of `node`'s result, or None for non-tensor results (sizes, shapes)."""
    vals = tensor_args(node, env)
    if node.op == "call_module":
        if not vals:
            return None
        return _module(node.target, gm.get_submodule(node.target), vals[0], sp, layers, nonlinear)
    name, target = node.name, node.target
    first = env.get(node.args[0]) if node.args and isinstance(node.args[0], Node) else None
    if node.op == "call_function":
        if target in NONTENSOR_FUNCS or (target is operator.getitem and first is None):
            return None
        if not vals:
            return None
        if target in CAT_FUNCS:
            refuse(name, f"concatenates tensors ({getattr(target, '__name__', target)}) along channels")
        if target is operator.getitem:
            refuse(name, "indexes or slices a feature tensor")
        if target in KEEP_FUNCS:
            return vals[0]
        if target in NONLINEAR_FUNCS:
            nonlinear.append((name, vals[0].space))
            return vals[0]
        if target in ADAPTIVE_FUNCS:
            if "max" in target.__name__:
                nonlinear.append((name, vals[0].space))
            return Val(vals[0].space, vals[0].factor, vals[0].ndim,
                       _adaptive_hw(_arg(node, 1, "output_size", None), vals[0]))
        if target is torch.flatten:
            return _flatten(name, vals[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), sp)
        if target in ADD_FUNCS:
            return _binary(name, vals, sp, nonlinear, False)
        if target in MUL_FUNCS:
            return _binary(name, vals, sp, nonlinear, True)
        if target is torch.mean:
            return _mean(name, node, vals[0], _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
        refuse(name, f"calls {getattr(target, '__name__', target)}, which the fusion does not know")
    if node.op == "call_method":
        if target in NONTENSOR_METHODS or first is None:
            return None
        if target in KEEP_METHODS:
            return first
        if target in NONLINEAR_METHODS:
            nonlinear.append((name, first.space))
            return first
        if target in ADD_METHODS:
            return _binary(name, vals, sp, nonlinear, False)
        if target in MUL_METHODS:
            return _binary(name, vals, sp, nonlinear, True)
        if target == "flatten":
            return _flatten(name, first, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), sp)
        if target == "mean":
            return _mean(name, node, first, _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
        if target in ("view", "reshape"):
            src = node.args[0].meta.get("tensor_meta")
            if shape is not None and src is not None:
                src = tuple(src.shape)
                if src == shape:
                    return first
                if len(shape) == 2 and shape[0] == src[0]:
                    return _flatten(name, first, 1, -1, sp)
                refuse(name, f"reshapes {list(src)} to {list(shape)}, mixing channels")
            if first.ndim == 2 or sp.find(first.space) == IN:
                return first if first.ndim == 2 else Val(first.space, 1, 2, None)
            raise NeedShapes(f"cannot fuse layer '{name}': it reshapes a feature map; pass example_inputs "
                            "(one input batch) so the fusion can check the reshape")
        refuse(name, f"calls the tensor method .{target}(), which the fusion does not know")
    return None
