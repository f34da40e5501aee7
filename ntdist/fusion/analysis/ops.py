"""Per-operation rules of the channel-space analysis (used by `ntdist.fusion.analysis.graph`).

`propagate` looks at one torch.fx node and returns the channel layout of its
result: layers open spaces, element-wise operations and pooling keep them,
residual additions merge them, a channel concatenation joins its parts'
layouts and a channel split cuts one at part boundaries. Any computation on
the model input alone is the same in every member and stays unwidened. An
nn.Linear over positions (token mixing) keeps the channels and is listed for
the concatenated graph, which applies it member by member.
Functions torch.fx keeps whole (Swin's) have rules keyed by their qualified
name (`windows.py`). Anything whose widened form would not compute exactly
the members' average is refused with a `UserError` naming the node.
"""

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import Node, map_arg

from ntdist.fusion.analysis.aten_rules import MINE, exported_rule
from ntdist.fusion.analysis.attention import RELATIVE_ATTENTION, class_name, index, multi_head_attention, relative_attention
from ntdist.fusion.analysis.export import is_exported
from ntdist.fusion.analysis.functional import LAYER_FUNCS, functional_layer, record
from ntdist.fusion.analysis.plan import IN, Layer, Param, Tup, Val
from ntdist.fusion.analysis.shapes import (adaptive_hw, arg, cat, channel_dim, flatten, is_input, mean,
                                  mixes_positions, one, permute, refuse, reshape, split, transpose)
from ntdist.fusion.analysis.windows import WRAPPED, constant_input, qualified

RESIZE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
RESIZE_FUNCS = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
LINEAR_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
                  nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
NONLINEAR_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                     nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
                     nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ADAPTIVE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.AvgPool1d, nn.AvgPool2d,
                  nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d) + ADAPTIVE_MODULES
KEEP_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, operator.neg, torch.neg,
              F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
# Functions by qualified name (so no model library is imported): each scales whole samples, never channels apart.
KEEP_NAMES = {"torchvision.ops.stochastic_depth.stochastic_depth"}
NONLINEAR_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
                   F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid,
                   torch.tanh, F.sigmoid, F.tanh, F.max_pool1d, F.max_pool2d, F.max_pool3d}
ADAPTIVE_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                  F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
ADD_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
MUL_FUNCS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
STACK_FUNCS = {torch.stack, torch.hstack, torch.vstack}
NONTENSOR_FUNCS = {getattr, len}
KEEP_METHODS = {"contiguous", "clone", "detach", "dropout"}
GRID_METHODS = {"contiguous", "transpose", "view", "reshape"}
NONLINEAR_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
NONTENSOR_METHODS = {"size", "dim", "numel"}
ADD_METHODS = {"add", "add_", "sub", "sub_"}
MUL_METHODS = {"mul", "mul_", "div", "div_"}


def tensor_args(node, env):
    """What the analysis knows about each tensor argument of `node` (in argument order, splits unpacked)."""
    found = []
    map_arg((node.args, node.kwargs), lambda n: found.append(env.get(n)) or n)
    out = []
    for v in found:
        out.extend([i for i in v.items if i is not None] if isinstance(v, Tup) else [v] if isinstance(v, Val) else [])
    return out


def _module(name, mod, x, sp, layers, nonlinear):
    if isinstance(mod, nn.Linear):
        out = record(layers, sp, name, "linear", None if name in layers else sp.open(name, mod.out_features), x.lay)
        nd = x.ndim if x.ndim and x.ndim > 2 else 2
        return Val(out, nd, None, nd - 1 if nd > 2 else 1)
    if isinstance(mod, nn.LayerNorm):
        return layer_norm(name, x, tuple(mod.normalized_shape), name, sp, layers, nonlinear)
    if x.cdim != 1 and isinstance(mod, CHANNELS_FIRST):
        refuse(name, f"({type(mod).__name__}) reads channels-first input but the channels are dimension {x.cdim}")
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if any(d.factor != 1 for d in x.lay):
            refuse(name, "(Conv) consumes flattened features")
        if mod.groups == 1:
            out = record(layers, sp, name, "conv", None if name in layers else sp.open(name, mod.out_channels), x.lay)
        elif mod.groups == mod.in_channels == mod.out_channels:
            out = record(layers, sp, name, "dwconv", x.lay, x.lay)
        else:
            if len(x.lay) != 1 or name in sp.atomize:
                refuse(name, "is a grouped convolution over concatenated or permuted channels")
            out = record(layers, sp, name, "gconv", None if name in layers else sp.open(name, mod.out_channels), x.lay)
        return Val(out, x.ndim or mod.weight.dim(), None)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        record(layers, sp, name, "bn", x.lay, x.lay)
        return x
    if isinstance(mod, nn.Flatten):
        return flatten(name, x, mod.start_dim, mod.end_dim, sp)
    if isinstance(mod, LINEAR_MODULES):
        return x
    if isinstance(mod, RESIZE_MODULES):    # resizes every channel on its own: the channels stay, positions change
        if x.cdim != 1:
            refuse(name, f"({type(mod).__name__}) resizes channels-first input but the channels are dimension {x.cdim}")
        return x._replace(hw=None)
    if isinstance(mod, NONLINEAR_MODULES):
        if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
            refuse(name, "(PReLU) has one slope per channel")
        nonlinear.append((name, x.lay))
        return x
    if isinstance(mod, ADAPTIVE_MODULES):
        if "Max" in type(mod).__name__:
            nonlinear.append((name, x.lay))
        return Val(x.lay, x.ndim, adaptive_hw(mod.output_size, x))
    refuse(name, f"({type(mod).__name__}) cannot be widened exactly")


def _binary(name, vals, sp, nonlinear, mul):
    if len(vals) < 2:
        return vals[0]
    a, b = vals[0], vals[1]
    lay = sp.union_layouts(a.lay, b.lay, name)
    if mul:
        nonlinear.append((name, lay))
    ndim = max(a.ndim or 0, b.ndim or 0) or None
    wider = a if (a.ndim or 0) >= (b.ndim or 0) else b
    return Val(lay, ndim, a.hw if a.hw is not None else b.hw, wider.cdim)


def channels(sp, x):
    """How many channels `x` has in one member."""
    return sum(sp.size[d.space] * d.factor for d in x.lay)


def layer_norm(name, x, shape, owner, sp, layers, nonlinear):
    """A LayerNorm over the channels: it keeps the layout; `owner` is the module holding its affine parameters."""
    if x.ndim is None or x.cdim != x.ndim - 1 or shape != (channels(sp, x),):
        refuse(name, f"normalises over {list(shape)}, not over the channels alone (dimension {x.cdim})")
    if is_input(sp, x.lay) or len({sp.size[d.space] * d.factor for d in x.lay}) != 1:
        refuse(name, "normalises input channels, or concatenated parts of different widths, together")
    record(layers, sp, owner or name, "ln" if owner else "lnf", x.lay, x.lay)
    if len(x.lay) > 1:     # each member's channels lie in every part: the wide model groups them part by part
        sp.norm_parts[name] = len(x.lay)
    nonlinear.append((name, x.lay))
    return x


def with_param(name, x, param, tensor, sp, layers):
    """An element-wise op between `x` and a parameter read in forward: it must carry x's channels."""
    p, n = tensor.dim(), x.ndim
    axis = None if n is None else x.cdim - (n - p)
    if axis is None or not 0 <= axis < p or tensor.shape[axis] != channels(sp, x) or tensor.shape[axis] == 1:
        refuse(name, f"combines a feature tensor with parameter '{param.name}', which does not follow its channels")
    if any(sp.find(d.space) == IN for d in x.lay):
        refuse(name, f"combines the model input with parameter '{param.name}'")
    old = layers.get(param.name)
    if old is not None:
        sp.union_layouts(old.inp, x.lay, name)
    else:
        layers[param.name] = Layer("param", x.lay, x.lay, axis)
    return Val(x.lay, max(n, p), x.hw, x.cdim + max(0, p - n))


def _function(node, target, vals, sp, layers, nonlinear):
    name = node.name
    if target is F.layer_norm:
        return layer_norm(name, vals[0], tuple(arg(node, 1, "normalized_shape", ())), None, sp, layers, nonlinear)
    if target is torch.permute:
        return permute(name, vals[0], node.args[1:] or [node.kwargs["dims"]])
    if target in (torch.transpose, torch.swapaxes, torch.swapdims):
        return transpose(name, vals[0], arg(node, 1, "dim0", None), arg(node, 2, "dim1", None))
    if target in CAT_FUNCS:
        return cat(name, node, vals, sp)
    if target in (torch.split, torch.chunk):
        return split(name, node, vals[0], sp, target.__name__)
    if target in RESIZE_FUNCS:
        if vals[0].cdim != 1:
            refuse(name, f"resizes channels-first input but the channels are dimension {vals[0].cdim}")
        return vals[0]._replace(hw=None)
    if target in KEEP_FUNCS or qualified(target) in KEEP_NAMES:
        return vals[0]
    if target in NONLINEAR_FUNCS:
        nonlinear.append((name, vals[0].lay))
        return vals[0]
    if target in ADAPTIVE_FUNCS:
        if "max" in target.__name__:
            nonlinear.append((name, vals[0].lay))
        return Val(vals[0].lay, vals[0].ndim, adaptive_hw(arg(node, 1, "output_size", None), vals[0]))
    if target is torch.flatten:
        return flatten(name, vals[0], arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1), sp)
    if target in ADD_FUNCS:
        return _binary(name, vals, sp, nonlinear, False)
    if target in MUL_FUNCS:
        return _binary(name, vals, sp, nonlinear, True)
    if target is torch.mean:
        return mean(name, node, vals[0], arg(node, 1, "dim", None), arg(node, 2, "keepdim", False))
    if target in STACK_FUNCS:
        refuse(name, f"stacks tensors ({target.__name__}), adding a dimension the fusion does not follow")
    refuse(name, f"calls {getattr(target, '__name__', target)}, which the fusion does not know")


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
        return flatten(name, first, arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1), sp)
    if target == "mean":
        return mean(name, node, first, arg(node, 1, "dim", None), arg(node, 2, "keepdim", False))
    if target in ("split", "chunk"):
        return split(name, node, first, sp, target)
    if target == "permute":
        return permute(name, first, node.args[1:] or [node.kwargs["dims"]])
    if target in ("transpose", "swapaxes", "swapdims"):
        return transpose(name, first, arg(node, 1, "dim0", None), arg(node, 2, "dim1", None))
    if target in ("view", "reshape"):
        return reshape(node, first, sp, shape)
    refuse(name, f"calls the tensor method .{target}(), which the fusion does not know")


def _params(node, vals, params, gm, sp, layers, nonlinear):
    """Nodes that read parameters directly: F.layer_norm, or an element-wise op with a per-channel parameter."""
    target, name = node.target, node.name
    if target is F.layer_norm and vals:
        owners = {p.name.rpartition(".")[0] for p in params}
        return layer_norm(name, vals[0], tuple(arg(node, 1, "normalized_shape", ())), owners.pop()
                          if len(owners) == 1 else refuse(name, "normalises with parameters of two modules"),
                          sp, layers, nonlinear)
    if target in LAYER_FUNCS:
        return functional_layer(node, vals, params, lambda p: fetch(gm, p), sp, layers)
    if target in CAT_FUNCS and len(vals) == 1 and len(params) == 1:     # a class token joins the tokens
        if channel_dim(name, vals[0], arg(node, 1, "dim", 0)):
            refuse(name, f"concatenates parameter '{params[0].name}' to the channels")
        return with_param(name, vals[0], params[0], fetch(gm, params[0].name), sp, layers)
    binary = target in ADD_FUNCS | MUL_FUNCS or (node.op == "call_method" and target in ADD_METHODS | MUL_METHODS)
    if binary and len(vals) == 1 and len(params) == 1:
        return with_param(name, vals[0], params[0], fetch(gm, params[0].name), sp, layers)
    refuse(params[0].name, "reads a parameter or buffer directly inside forward in a way the fusion does not "
                           "know (only F.linear, F.conv*, F.batch_norm, F.layer_norm on a module's own parameters, "
                           "and element-wise ops with per-channel parameters)")


def token_mixer(node, x, sp):
    """An nn.Linear over positions (token mixing): it keeps x's channels; the concatenated model applies each
    member's layer to that member's block of them (`wide/widegraph.py`), NT's fused model keeps member 0's."""
    if x.ndim is None or any(d.factor != 1 for d in x.lay):
        refuse(node.target, "(Linear) mixes the last dimension of a tensor whose channels are not last, of unknown "
                            "rank or spread over several dimensions")
    sp.mixers.append((node.name, node.target, x.lay, x.cdim))
    return Val(x.lay, x.ndim, None, x.cdim)


def fetch(gm, name):
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def propagate(node: Node, gm, env, sp, layers, nonlinear, shape):
    """Channel-space value of `node`'s result, or None for non-tensor results (sizes, shapes)."""
    vals = tensor_args(node, env)
    first = env.get(node.args[0]) if node.args and isinstance(node.args[0], Node) else None
    if any(v.grid for v in vals) and not (node.op == "call_method" and node.target in GRID_METHODS or
                                          node.target is torch.transpose):
        refuse(node.name, "works on channels held as a grid by a view (only transpose and a view back, "
                          "as in a channel shuffle, are followed)")
    if node.op == "call_function" and node.target is operator.getitem and isinstance(first, Tup):
        return first.items[node.args[1]] if isinstance(node.args[1], int) else refuse(
            node.name, "slices the parts of a channel split")
    if node.op == "call_function" and is_exported(gm):
        out = exported_rule(node, gm, env, sp, layers, nonlinear)
        if out is not MINE:
            return out
    if node.op == "call_module":
        vals = vals or constant_input(node, gm, env, lambda p: fetch(gm, p))
        if not vals:
            return None
        mod = gm.get_submodule(node.target)
        if all(is_input(sp, v.lay) for v in vals) and not isinstance(mod, nn.Flatten) and not any(
                True for _ in mod.parameters()):      # a parameter-free module on the input: same in every member
            return Val(one(IN), len(shape) if shape else vals[0].ndim, None)
        if isinstance(mod, nn.MultiheadAttention):
            return multi_head_attention(node.target, mod, vals, sp, layers)
        if class_name(mod) == RELATIVE_ATTENTION:
            return relative_attention(node.target, mod, vals[0], sp, layers)
        if isinstance(mod, nn.Linear) and mixes_positions(vals[0], sp):
            return token_mixer(node, vals[0], sp)
        return _module(node.target, mod, vals[0], sp, layers, nonlinear)
    if node.op == "call_function" and (node.target in NONTENSOR_FUNCS or (
            node.target is operator.getitem and first is None)):
        return None
    if node.op == "call_method" and node.target == "expand" and isinstance(first, Param):
        return first                # broadcasting a parameter (a class token to the batch) keeps its channels
    if node.op == "call_function" and qualified(node.target) in WRAPPED:
        return WRAPPED[qualified(node.target)](node, env, lambda p: fetch(gm, p), sp, layers, nonlinear)
    params = [v for v in (env.get(a) for a in node.all_input_nodes) if isinstance(v, Param)]
    if params:
        return _params(node, vals, params, gm, sp, layers, nonlinear)
    if node.op == "call_method" and (node.target in NONTENSOR_METHODS or first is None):
        return None
    if not vals:
        return None
    if all(is_input(sp, v.lay) for v in vals):       # computed from the input alone: identical in every member
        return Val(one(IN), len(shape) if shape else None, None)
    if node.op == "call_function":
        if node.target is operator.getitem:
            return index(node.name, first, node.args[1])
        return _function(node, node.target, vals, sp, layers, nonlinear)
    if node.op == "call_method":
        return _method(node, node.target, first, vals, sp, nonlinear, shape)
    return None
