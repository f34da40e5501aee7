"""Channel-space analysis: trace a model with torch.fx and find which dimensions can be widened.

Every tensor's channel dimension belongs to a *channel space*. A Linear or Conv
output opens a new space; BatchNorm, element-wise activations and pooling keep
it; a residual `add` merges two spaces into one; a flatten maps a conv space to
features with a factor H*W (feature index c*HW + j). The model input space and
the final output space are fixed (never widened). The result, a `Plan`, says
for every parameter and buffer which of its dimensions lie in which space, so
concatenation, pruning and OT alignment can treat any architecture alike.
"""

import contextlib
import io
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ntdist.errors import UserError
from ntdist.fusion.analysis.capture import trace
from ntdist.fusion.analysis.export import export_graph, is_exported
from ntdist.fusion.analysis.ops import fetch, propagate, tensor_args
from ntdist.fusion.analysis.shapes import NeedShapes, one, refuse
from ntdist.fusion.analysis.plan import IN, OUT, Dim, Layer, Param, Plan, TensorSpec, Val
from ntdist.fusion.analysis.spaces import Spaces
from ntdist.fusion.analysis.ties import check_ties


def _batch_slice(x):
    if isinstance(x, torch.Tensor):
        return x[:1] if x.dim() > 0 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_batch_slice(v) for v in x)
    return x


class _Propagation(ShapeProp):
    """torch.fx's ShapeProp, remembering the node it runs (to name the layer that fails)."""

    node = None

    def run_node(self, n):
        self.node = n
        return super().run_node(n)


def _shape_prop(gm, model, example_inputs, given: bool) -> bool:
    """Record every node's output shape from a one-sample forward pass in eval mode."""
    args = _batch_slice(example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    device = next((t.device for t in model.state_dict().values()), None)   # inputs given on the CPU, weights maybe not
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) and device is not None else a for a in args)
    flags = {name: m.training for name, m in gm.named_modules()}
    prop = _Propagation(gm)
    try:
        gm.eval()
        # ShapeProp prints the traceback of a failing node itself: the message below says it in one line
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*args)
        return True
    except Exception as err:  # noqa: BLE001
        if given:
            cause = err.__cause__ or err
            text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            node = prop.node
            where = f" at layer '{node.target}'" if node is not None and node.op == "call_module" else \
                f" at '{node.name}'" if node is not None else ""
            shape = f" of shape {list(args[0].shape[1:])} (one input)" if isinstance(args[0], torch.Tensor) else ""
            raise UserError(f"example_inputs{shape} do not fit {type(model).__name__}{where} "
                            f"({type(cause).__name__}: {text}); pass one input batch of the shape the model "
                            "expects") from None
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
    gm, captured = trace(model, example_inputs)
    first = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    in_ndim = first.dim() if isinstance(first, torch.Tensor) else None
    try:
        if not is_exported(gm):
            check_ties(model, gm)
        plan = _shaped_walk(model, gm, example_inputs, in_ndim)
    except UserError as refused:
        if example_inputs is None or is_exported(gm):
            raise
        try:        # the fx graph refused: the exported one may pass; if not, the fx refusal is the message
            gm = export_graph(model, example_inputs)
            plan, captured = _refined_walk(model, gm, True, in_ndim), False
        except Exception:  # noqa: BLE001
            raise refused from None
    plan.captured = captured
    plan.graph = gm if is_exported(gm) else None
    return plan


def _shaped_walk(model, gm, example_inputs, in_ndim) -> Plan:
    """The walk, measuring shapes and walking again when it needs a spatial size."""
    try:
        return _refined_walk(model, gm, is_exported(gm), in_ndim)
    except NeedShapes as need:
        given = example_inputs is not None
        inputs = example_inputs if given else _dummy_input(gm)
        if inputs is None or not _shape_prop(gm, model, inputs, given):
            raise UserError(str(need)) from None
        return _refined_walk(model, gm, True, in_ndim)


MAX_WALKS = 16     # walks that coarsen, cut or atomize layers until their units settle


def _refined_walk(model, gm, shaped: bool, in_ndim) -> Plan:
    """Walk until no permutation or split asks for more layers to route their channels one by one."""
    atomize, units, cuts = frozenset(), {}, {}
    for _ in range(MAX_WALKS):
        sp = Spaces(atomize, units, cuts)
        try:
            plan = _walk(model, gm, shaped, in_ndim, sp)
        except UserError:
            if not sp.asks():
                raise
            plan = None
        if not sp.asks():
            return plan
        atomize, units, cuts = atomize | sp.pending, {**units, **sp.asked_units}, {**cuts, **sp.asked_cuts}
    raise UserError(f"cannot fuse {type(model).__name__}: its layers' units could not be settled in {MAX_WALKS} "
                    "walks of the analysis (channels grouped in incompatible ways)")


def _walk(model, gm, shaped: bool, in_ndim, sp) -> Plan:
    layers: Dict[str, Layer] = {}
    nonlinear: List[Tuple[str, int]] = []
    env: Dict[object, Optional[Val]] = {}
    out_val = None
    for node in gm.graph.nodes:
        shape = None
        if shaped and "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape"):
            shape = tuple(node.meta["tensor_meta"].shape)
        if node.op == "placeholder":
            val = Val(one(IN), len(shape) if shape else in_ndim, None)
        elif node.op == "get_attr":
            val = Param(node.target)
        elif node.op == "output":
            outs = [a for a in tensor_args(node, env)]
            if len(outs) != 1:
                refuse("output", f"returns {len(outs)} tensors; fusion needs a single output tensor")
            out_val = outs[0]
            continue
        else:
            try:
                val = propagate(node, gm, env, sp, layers, nonlinear, shape)
            except (UserError, NeedShapes):
                raise
            except Exception as err:  # noqa: BLE001 - a rule that breaks on an unforeseen form: one line, naming it
                refuse(node.target if node.op == "call_module" else node.name,
                       f"could not be followed ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})")
        if isinstance(val, Val) and shape is not None:
            cdim = val.cdim % len(shape) if shape else 1
            hw = _prod(s for d, s in enumerate(shape) if d not in (0, cdim)) if len(shape) > 2 else None
            val = val._replace(ndim=len(shape), hw=hw, cdim=cdim)
        env[node] = val
    if out_val is None:
        refuse("output", "has no tensor output")
    if len(out_val.lay) != 1:
        refuse("output", "is a concatenation of layers' outputs; fusion needs one output layer to average")
    sp.union(OUT, out_val.lay[0].space)
    return _finish(model, sp, layers, nonlinear)


def _prod(xs):
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _finish(model, sp, layers, nonlinear) -> Plan:
    """The `Plan` of a finished walk: the hidden spaces, every layer's widened dimensions, every tensor's spec."""
    fin, fout = sp.find(IN), sp.find(OUT)
    inexact = _inexact(sp, nonlinear, fout)
    if fin == fout:
        refuse("output", "is added to the model input; fusion needs hidden layers between input and output")
    fixed = {fin, fout}
    sizes, order = {}, []
    for s in sp.born:
        r = sp.find(s)
        if r not in fixed and r not in sizes:
            sizes[r] = sp.size[s]
            order.append(r)
    first, coupled, tensors = _widen_layers(model, sp, layers, fin, fout)
    _add_shared(model, tensors)
    probe = {}
    for key, spec in tensors.items():
        for d, lay in enumerate(spec.dims):
            if lay is not None and len(lay) == 1 and lay[0].space not in probe:
                probe[lay[0].space] = (key, d, lay[0].factor)
    atoms = frozenset(sp.find(a) for a in sp.atoms) & set(sizes)
    rest = _rest_probes(tensors, probe, set(sizes) - set(probe) - atoms)
    if any(s not in probe and s not in atoms and s not in rest for s in sizes):
        refuse("output", "has channels that only ever appear concatenated with others; cannot size them")
    shuffles = [(a, b, tuple(sp.find(d.space) for d in x), tuple(sp.find(d.space) for d in y))
                for a, b, x, y in sp.shuffles]
    mixers = [(n, m, tuple(Dim(sp.find(d.space), d.factor) for d in lay), c) for n, m, lay, c in sp.mixers]
    for _, module, lay, _ in mixers:
        if any(d.space in fixed for d in lay):
            refuse(module, "mixes the positions of the output channels; token mixing is followed on hidden "
                           "channels only")
    return Plan(sizes=sizes, order=order, layers=layers, tensors=tensors, first_space=first, probe=probe, rest=rest,
                coupled=coupled.sets(sizes), inexact=inexact,
                norms=sum(1 for layer in layers.values() if layer.kind in ("ln", "lnf")), atoms=atoms,
                shuffles=shuffles, widths=sp.widths, mixers=mixers, norm_parts=sp.norm_parts,
                rewrites=[(n, what, sp.find(at) if what == "tied" else at) for n, what, at in sp.rewrites])


def _rest_probes(tensors, probe, missing):
    """Spaces seen only beside others in one dimension (a layer opened as parts): sized by what the others leave."""
    rest = {}
    for key, spec in tensors.items():
        for d, lay in enumerate(spec.dims):
            if lay is None or len(lay) < 2:
                continue
            for part in lay:
                others = tuple((o.space, o.factor) for o in lay if o is not part)
                if part.space in missing and part.space not in rest and all(o in probe for o, _ in others):
                    rest[part.space] = (key, d, others, part.factor)
    return rest


def _inexact(sp, nonlinear, fout) -> str:
    """Why concatenation cannot be exact: the first layer whose non-linearity reads the output layer's result."""
    for name, lay in nonlinear:
        if any(sp.find(d.space) == fout for d in lay):
            return (f"cannot concatenate at layer '{name}': it applies a non-linear operation to the output "
                    "layer's result, so no widened model of this class computes the members' average output; "
                    "fuse(method='nt') still prunes it back to one model")
    return ""


def _widen_layers(model, sp, layers, fin, fout):
    """Every layer's dimensions in root spaces (None where fixed: the model input or output), in place, and the
    specs of their tensors; returns (the first hidden layer's space, the grouped convolutions' coupling, specs)."""
    fixed = {fin, fout}
    first, coupled, tensors = None, _Coupling(), {}

    def wide(lay, name):
        lay = tuple(Dim(sp.find(d.space), d.factor) for d in lay)
        if any(d.space in fixed for d in lay):
            if len(lay) > 1:
                refuse(name, "concatenates the model input or output channels with hidden ones")
            return None
        return lay

    for name, layer in layers.items():
        out, inp = wide(layer.out, name), wide(layer.inp, name)
        if first is None and layer.kind in ("linear", "conv", "gconv") and inp is None and out is not None \
                and sp.find(layer.inp[0].space) == fin:
            first = out[0].space
        if out is None and layer.kind in ("dwconv", "gconv", "bn", "ln", "lnf", "param"):
            refuse(name, f"({layer.kind}) acts on the model input or output channels; only Linear/Conv "
                         "layers may touch them")
        if layer.kind == "gconv":
            if inp is None:
                refuse(name, "is a grouped convolution on the model input; grouped layers must consume hidden channels")
            coupled.add(name, (inp[0].space, out[0].space), model.get_submodule(name).groups)
        if layer.kind in ("linear", "conv") and sp.find(layer.out[0].space) == fin:
            refuse(name, "writes into the model input's channels (a residual on the input); cannot widen exactly")
        role = "output" if out is None and sp.find(layer.out[0].space) == fout else "layer"
        layer.out, layer.inp = out, inp
        if layer.kind == "param":
            owner, _, attr = name.rpartition(".")
            dims = tuple(out if d == layer.axis else None for d in range(fetch(model, name).dim()))
            tensors[name] = TensorSpec(owner, attr, dims, role=role, part="param")
        elif layer.kind not in ("lnf", "heads"):
            _layer_tensors(model, name, layer, role, tensors)
    return first, coupled, tensors


def _add_shared(model, tensors) -> None:
    """Every parameter and buffer no layer widens: kept as member 0 has it; a tied name takes its tensor's spec."""
    specs = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            key = f"{mname}.{attr}" if mname else attr
            if t is not None and key in tensors:
                specs.setdefault(id(t), tensors[key])
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            key = f"{mname}.{attr}" if mname else attr
            if t is not None and key not in tensors:
                tied = specs.get(id(t))
                tensors[key] = TensorSpec(mname, attr, (None,) * t.dim(), role="shared") if tied is None else \
                    TensorSpec(mname, attr, tied.dims, tied.role, tied.part)


class _Coupling:
    """Spaces that grouped convolutions cut into blocks, merged into sets pruned block by block together."""

    def __init__(self):
        self.groups, self.layer, self.link = {}, {}, {}

    def add(self, name, spaces, groups):
        for s in spaces:
            if self.groups.setdefault(s, groups) != groups:
                refuse(name, f"cuts its channels into {groups} groups, but another grouped convolution cuts "
                             f"them into {self.groups[s]}; cannot prune both exactly")
            self.layer.setdefault(s, name)
        a, b = (self._root(s) for s in spaces)
        self.link[b] = a

    def _root(self, s):
        while self.link.get(s, s) != s:
            s = self.link[s]
        return s

    def sets(self, sizes):
        out = {}
        for s in self.groups:
            out.setdefault(self._root(s), []).append(s)
        result = []
        for members in out.values():
            g = self.groups[members[0]]
            for s in members:
                if sizes[s] % g:
                    refuse(self.layer[s], f"has {sizes[s]} channels, not a multiple of its {g} groups")
            result.append((tuple(sorted(members)), g, self.layer[members[0]]))
        return result


def _layer_tensors(model, name, layer, role, tensors):
    mod = model.get_submodule(name)
    out, inp = layer.out, layer.inp
    rest = (None,) * (mod.weight.dim() - 2) if getattr(mod, "weight", None) is not None else ()
    if layer.kind in ("linear", "conv"):
        specs = {"weight": ((out, inp) + rest, "weight"), "bias": ((out,), "bias")}
    elif layer.kind == "mha":
        specs = {"in_proj_weight": ((out, inp), "weight"), "in_proj_bias": ((out,), "bias")}
    elif layer.kind == "embed":        # a table [tokens, width]: the width is its output
        specs = {"weight": ((None, out), "weight")}
    elif layer.kind == "tlinear":      # a linear layer storing its weight as [in, out] (GPT-2's Conv1D)
        specs = {"weight": ((inp, out), "weight"), "bias": ((out,), "bias")}
    elif layer.kind in ("dwconv", "gconv"):
        specs = {"weight": ((out, None) + rest, "weight"), "bias": ((out,), "bias")}
    else:
        specs = {"weight": ((out,), "scale"), "bias": ((out,), "shift"),
                 "running_mean": ((out,), "stat"), "running_var": ((out,), "stat")}
    for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
        if t is None:
            continue
        key = f"{name}.{attr}"
        if attr in specs:
            dims, part = specs[attr]
            tensors[key] = TensorSpec(name, attr, dims, role=role, part=part)
        elif attr == "num_batches_tracked":
            tensors[key] = TensorSpec(name, attr, (), role="counter")
