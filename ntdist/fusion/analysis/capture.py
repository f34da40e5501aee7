"""Capture a forward that `torch.fx.symbolic_trace` cannot trace because it branches on shapes.

`symbolic_trace` fails on `if x.dim() > 2:` or `if x.shape[1] == 1:`: a proxy has no
value to branch on. `capture(model, example_inputs)` traces with the same fx
machinery, so the graph keeps ntdist's module-level nodes (`call_module` on a
Linear, `torch.relu`, ...) that the channel analysis reads, but it also runs
every node on one sample of `example_inputs` as it is recorded. When forward
branches, the branch is decided by that value and only the path taken enters the
graph: the graph is specialised to the example's shapes, as `torch.export`
specialises a static shape with a guard.

Specialising is exact for fusion only if the wide model takes the same branch as
every member. The wide model has the members' input and spatial sizes but k times
their hidden channels, so a condition may read the shape of the model input (or of
anything computed from it alone, never widened) and any tensor's rank, and nothing
else: a branch on a hidden tensor's shape or on tensor values is refused, naming
the module whose forward branches.
"""

from typing import Dict, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_arg

from ntdist.errors import UserError
from ntdist.fusion.analysis.attention import LEAVES, class_name, symbolic_trace
from ntdist.fusion.analysis.export import export_graph

RANK_READS = ("dim", "ndim", "ndimension")     # a tensor's rank: the same in the wide model and each member
SHAPE_READS = ("shape", "size")


def _read(node: fx.Node):
    """('shape' | 'rank', tensor node) if `node` reads a tensor's shape or rank, else None."""
    attr = None
    if node.op == "call_function" and node.target is getattr:
        attr = node.args[1]
    elif node.op == "call_method":
        attr = node.target
    if attr in SHAPE_READS:
        return "shape", node.args[0]
    if attr in RANK_READS:
        return "rank", node.args[0]
    return None


class ShapeTracer(fx.Tracer):
    """An fx tracer that also runs every node on real inputs, so forward may branch on the input's shape."""

    def __init__(self, inputs):
        super().__init__()
        self.inputs = list(inputs)
        self.values: Dict[fx.Node, object] = {}
        self.running = False

    def is_leaf_module(self, m, qualified_name):   # the attention modules stay whole, as in `symbolic_trace`
        return class_name(m) in LEAVES or super().is_leaf_module(m, qualified_name)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.running = True
        try:
            self.values[node] = self._run(node)
        finally:
            self.running = False
        return node

    # While tracing, fx routes every module call and attribute read through these two; while a node
    # runs on real tensors they must behave as plain Python does.
    def call_module(self, m, forward, args, kwargs):
        return forward(*args, **kwargs) if self.running else super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self.running else super().getattr(attr, attr_val, parameter_proxy_cache)

    def _run(self, node: fx.Node):
        if node.op == "placeholder":
            if not self.inputs:
                raise UserError(f"example_inputs give fewer tensors than forward's arguments "
                                f"(no value for '{node.target}')")
            return self.inputs.pop(0)
        args = map_arg(node.args, lambda n: self.values[n])
        kwargs = map_arg(node.kwargs, lambda n: self.values[n])
        if node.op == "get_attr":
            return _fetch(self.root, node.target)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return None

    def where(self) -> str:
        """The module whose forward is being traced, for messages."""
        if self.module_stack:
            name, kind = next(reversed(self.module_stack.values()))
            return f"module '{name}' ({getattr(kind, '__name__', kind)})"
        return f"the forward of {type(self.root).__name__}"

    def _check(self, node: fx.Node) -> None:
        """Refuse a condition that reads anything but the model input's shape and tensors' ranks."""
        read = _read(node)
        if read is not None:
            kind, source = read
            if kind == "shape" and not self._input_only(source):
                raise UserError(f"{self.where()} branches on the shape of '{source.name}', a hidden tensor; the "
                                f"concatenated model's channel counts differ from the members', so the fusion "
                                f"cannot fix the branch (branch on the model input's shape instead)")
            return
        if isinstance(self.values[node], torch.Tensor):
            raise UserError(f"{self.where()} branches on tensor values (node '{node.name}'); the fusion follows "
                            f"branches on the model input's shape and tensors' ranks only")
        for arg in node.all_input_nodes:
            self._check(arg)

    def _input_only(self, node: fx.Node) -> bool:
        """Whether `node` is computed from the model input alone (no parameter or module): never widened."""
        if node.op == "placeholder":
            return True
        if node.op in ("get_attr", "call_module"):
            return False
        return all(self._input_only(arg) for arg in node.all_input_nodes)

    def to_bool(self, obj: fx.Proxy) -> bool:
        self._check(obj.node)
        return bool(self.values[obj.node])

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.values[obj.node]
        if isinstance(value, (tuple, list, torch.Size)):       # `n, c, h, w = x.shape`
            self._check(obj.node)       # the loop's length is a branch too
            return iter([obj[i] for i in range(len(value))])
        raise UserError(f"{self.where()} iterates over '{obj.node.name}', a {type(value).__name__}; the fusion "
                        f"follows loops over the model input's shape only")


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def capture(model: nn.Module, example_inputs) -> fx.GraphModule:
    """Trace `model` with shape branches decided on `example_inputs` (see the module docstring).

    The whole batch is used, not one sample: a branch on the batch size is decided at the
    example's batch size, which should be the one the model is used with.
    """
    inputs = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    modes = {m: m.training for m in model.modules()}
    tracer = ShapeTracer(inputs)
    try:
        model.eval()        # one sample through BatchNorm in train mode would fail, and must not move statistics
        with torch.no_grad():
            graph = tracer.trace(model)
    finally:
        for m, training in modes.items():
            m.training = training
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.graph.eliminate_dead_code()     # the shape reads of decided branches have no users left
    gm.recompile()
    return gm


def trace(model: nn.Module, example_inputs=None):
    """Trace `model` with torch.fx, else with its shape branches decided on `example_inputs` (`capture`).

    Returns (graph module, captured): `captured` says the graph is specialised to the example's shapes.
    """
    try:
        return symbolic_trace(model), False
    except Exception as err:  # noqa: BLE001 - any tracing failure is a model the user must adapt
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if example_inputs is None:
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx ({why}); if its forward branches on "
                        f"the input's shape, pass example_inputs so the branch can be decided") from None
    try:
        return capture(model, example_inputs), True
    except Exception as err:  # noqa: BLE001 - torch.export may still follow it
        refused = err
    try:
        return export_graph(model, example_inputs), False
    except Exception as err:  # noqa: BLE001
        if isinstance(refused, UserError):
            raise refused from None
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx ({why}), nor by running it on "
                        f"example_inputs ({_line(refused)}), nor with torch.export ({_line(err)}); fusion needs a "
                        "traceable forward") from None


def _line(err) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
