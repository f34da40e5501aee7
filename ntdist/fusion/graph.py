"""Channel-space analysis: trace a model with torch.fx and find which dimensions can be widened.

Every tensor's channel dimension belongs to a *channel space*. A Linear or Conv
output opens a new space; BatchNorm, element-wise activations and pooling keep
it; a residual `add` merges two spaces into one; a flatten maps a conv space to
features with a factor H*W (feature index c*HW + j). The model input space and
the final output space are fixed (never widened). The result, a `Plan`, says
for every parameter and buffer which of its dimensions lie in which space, so
concatenation, pruning and OT alignment can treat any architecture alike.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.fx import symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp

from ntdist.errors import UserError
from ntdist.fusion.ops import NeedShapes, propagate, refuse, tensor_args
from ntdist.fusion.plan import IN, OUT, Dim, Layer, Plan, TensorSpec, Val


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self):
        self.parent, self.size, self.born = [IN, OUT], [None, None], []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.born.append(len(self.parent) - 1)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb in (IN, OUT) or (ra not in (IN, OUT) and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra


def _batch_slice(x):
    if isinstance(x, torch.Tensor):
        return x[:1] if x.dim() > 0 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_batch_slice(v) for v in x)
    return x


def trace(model: nn.Module):
    """Symbolically trace `model` with torch.fx; UserError if its forward is not traceable."""
    try:
        return symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure is a model the user must adapt
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); fusion needs a traceable forward") from None


def _shape_prop(gm, model, example_inputs, given: bool) -> bool:
    """Record every node's output shape from a one-sample forward pass in eval mode."""
    args = _batch_slice(example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    flags = {name: m.training for name, m in gm.named_modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
        return True
    except Exception as err:  # noqa: BLE001
        if given:
            raise UserError(f"example_inputs do not fit {type(model).__name__}: {err}; "
                            "pass one input batch of the shape the model expects") from None
        return False
    finally:
        for name, m in gm.named_modules():
            m.training = flags[name]


def _dummy_input(gm):
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Linear):
                return torch.zeros(1, mod.in_features)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return None
    return None


def analyze(model: nn.Module, example_inputs=None) -> Plan:
    """Trace `model` and build its `Plan`; raise UserError for anything not widenable exactly.

    Shapes are propagated (one sample through the model) only when the plan
    needs a spatial size, e.g. at a flatten after a convolution.
    """
    gm = trace(model)
    first = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    in_ndim = first.dim() if isinstance(first, torch.Tensor) else None
    try:
        return _walk(model, gm, False, in_ndim)
    except NeedShapes as need:
        given = example_inputs is not None
        inputs = example_inputs if given else _dummy_input(gm)
        if inputs is None or not _shape_prop(gm, model, inputs, given):
            raise UserError(str(need)) from None
    return _walk(model, gm, True, in_ndim)


def _walk(model, gm, shaped: bool, in_ndim) -> Plan:
    sp = _Spaces()
    layers: Dict[str, Layer] = {}
    nonlinear: List[Tuple[str, int]] = []
    env: Dict[object, Optional[Val]] = {}
    out_val = None
    for node in gm.graph.nodes:
        shape = None
        if shaped and "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape"):
            shape = tuple(node.meta["tensor_meta"].shape)
        if node.op == "placeholder":
            val = Val(IN, 1, len(shape) if shape else in_ndim, None)
        elif node.op == "get_attr":
            refuse(node.target, "reads a parameter or buffer directly inside forward")
        elif node.op == "output":
            outs = [a for a in tensor_args(node, env)]
            if len(outs) != 1:
                refuse("output", f"returns {len(outs)} tensors; fusion needs a single output tensor")
            out_val = outs[0]
            continue
        else:
            val = propagate(node, gm, env, sp, layers, nonlinear, shape)
        if val is not None and shape is not None:
            val = Val(val.space, val.factor, len(shape), _prod(shape[2:]) if len(shape) > 2 else None)
        env[node] = val
    if out_val is None:
        refuse("output", "has no tensor output")
    sp.union(OUT, out_val.space)
    return _finish(model, sp, layers, nonlinear)


def _prod(xs):
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _finish(model, sp, layers, nonlinear) -> Plan:
    fin, fout = sp.find(IN), sp.find(OUT)
    fixed = {fin, fout}
    for name, space in nonlinear:
        if sp.find(space) == fout:
            refuse(name, "applies a non-linear operation to the model output; the average of members' "
                         "outputs cannot be computed by one widened model")
    if fin == fout:
        refuse("output", "is added to the model input; fusion needs hidden layers between input and output")
    sizes, order, probe, tensors = {}, [], {}, {}
    for s in sp.born:
        r = sp.find(s)
        if r not in fixed and r not in sizes:
            sizes[r] = sp.size[s]
            order.append(r)
    first = None
    for name, layer in layers.items():
        layer.out, layer.inp = sp.find(layer.out), sp.find(layer.inp)
        if first is None and layer.kind in ("linear", "conv", "gconv") and layer.inp == fin and layer.out not in fixed:
            first = layer.out
        if layer.out in fixed and layer.kind in ("dwconv", "gconv", "bn"):
            refuse(name, f"({layer.kind}) acts on the model input or output channels; only Linear/Conv "
                         "layers may touch them")
        if layer.kind == "gconv" and layer.inp in fixed:
            refuse(name, "is a grouped convolution on the model input; grouped layers must consume hidden channels")
        if layer.out == fin and layer.kind in ("linear", "conv"):
            refuse(name, "writes into the model input's channels (a residual on the input); cannot widen exactly")
        _layer_tensors(model, name, layer, fixed, fout, tensors)
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            key = f"{mname}.{attr}" if mname else attr
            if t is not None and key not in tensors:
                tensors[key] = TensorSpec(mname, attr, (None,) * t.dim(), role="shared")
    for key, spec in tensors.items():
        for d, dim in enumerate(spec.dims):
            if dim is not None and dim.space not in probe:
                probe[dim.space] = (key, d, dim.factor)
    return Plan(sizes, order, layers, tensors, first, probe)


def _layer_tensors(model, name, layer, fixed, fout, tensors):
    mod = model.get_submodule(name)

    def dim(space, factor=1):
        return None if space in fixed else Dim(space, factor)

    role = "output" if layer.out == fout else "layer"
    rest = (None,) * (mod.weight.dim() - 2) if getattr(mod, "weight", None) is not None else ()
    if layer.kind == "linear":
        specs = {"weight": ((dim(layer.out), dim(layer.inp, layer.factor)), "weight"),
                 "bias": ((dim(layer.out),), "bias")}
    elif layer.kind == "conv":
        specs = {"weight": ((dim(layer.out), dim(layer.inp)) + rest, "weight"), "bias": ((dim(layer.out),), "bias")}
    elif layer.kind in ("dwconv", "gconv"):
        specs = {"weight": ((dim(layer.out), None) + rest, "weight"), "bias": ((dim(layer.out),), "bias")}
    else:
        specs = {"weight": ((dim(layer.out),), "scale"), "bias": ((dim(layer.out),), "shift"),
                 "running_mean": ((dim(layer.out),), "stat"), "running_var": ((dim(layer.out),), "stat")}
    for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
        if t is None:
            continue
        key = f"{name}.{attr}"
        if attr in specs:
            dims, part = specs[attr]
            tensors[key] = TensorSpec(name, attr, dims, role=role, part=part)
        elif attr == "num_batches_tracked":
            tensors[key] = TensorSpec(name, attr, (), role="counter")
