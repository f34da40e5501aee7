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
from ntdist.fusion.analysis.finish import finish
from ntdist.fusion.analysis.ops import propagate, tensor_args
from ntdist.fusion.analysis.shapes import NeedShapes, one, refuse
from ntdist.fusion.analysis.plan import IN, OUT, Layer, Param, Plan, Val
from ntdist.fusion.analysis.spaces import Spaces
from ntdist.fusion.analysis.ties import check_ties


def _batch_slice(x):
    if isinstance(x, torch.Tensor):
        return x[:1] if x.dim() > 0 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_batch_slice(v) for v in x)
    return x


def constant_default(node) -> bool:
    """Whether placeholder `node` is an argument with a number, bool or string default (`scale=1.0`): the
    fusion calls the model with its input alone, so it is the same constant in every member."""
    return bool(node.args) and isinstance(node.args[0], (bool, int, float, str))


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
            exported = export_graph(model, example_inputs)
            plan, captured, gm = _refined_walk(model, exported, True, in_ndim), False, exported
        except Exception:  # noqa: BLE001
            plan = _measured_walk(model, gm, example_inputs, in_ndim)
            if plan is None:
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


def _measured_walk(model, gm, example_inputs, in_ndim) -> Optional[Plan]:
    """The walk with every tensor's shape measured on `example_inputs` (a rank the unmeasured walk guessed, as
    of tokens [N, T, C] reshaped from the input, is then known); None where that refuses too."""
    try:
        check_ties(model, gm)
        if not _shape_prop(gm, model, example_inputs, False):
            return None
        return _refined_walk(model, gm, True, in_ndim)
    except (UserError, NeedShapes):
        return None


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
        if node.op == "placeholder":     # an argument left at a number's default (`scale=1.0`) is a constant
            val = None if constant_default(node) else Val(one(IN), len(shape) if shape else in_ndim, None)
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
    return finish(model, sp, layers, nonlinear)


def _prod(xs):
    p = 1
    for x in xs:
        p *= int(x)
    return p
