"""Capture with `torch.export`: the graph the channel analysis reads when torch.fx cannot trace a model.

Model libraries such as Hugging Face `transformers` build attention masks,
position ids and caches with Python that `symbolic_trace` cannot follow and
that `capture` refuses (shape reads of hidden tensors, branches on values).
`torch.export.export` runs such code on the example inputs and records an
ATen-level graph specialised to their shapes; its `module()` form keeps every
parameter and buffer under its state-dict name, read by `get_attr` nodes, so
the analysis sees each weight as the weight of its module whatever the code
around it looks like.

`export_graph` returns that module with the ATen operations that have a
torch-level twin of the same signature retargeted to it (`aten.linear` to
`F.linear`, `aten.layer_norm` to `F.layer_norm`, ...), so the rules of
`ops.py` and `functional.py` apply unchanged; the remaining ATen operations
(embedding, attention, views with explicit shapes, per-position statistics)
have their rules in `tokens.py`. Every node carries its output shape (the
graph is specialised), and the graph module is kept on the `Plan`: `concat`
runs that graph with the widened tensors.
"""

import contextlib
import io
import logging
import weakref
from types import SimpleNamespace

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

# ATen operations whose torch-level twin takes the same leading arguments: retargeted so one rule serves both.
TWINS = {
    aten.linear.default: F.linear, aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d,
    aten.conv3d.default: F.conv3d, aten.relu.default: F.relu, aten.silu.default: F.silu,
    aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh, aten.gelu.default: F.gelu,
    aten.hardtanh.default: F.hardtanh, aten.dropout.default: F.dropout, aten.transpose.int: torch.transpose,
    aten.permute.default: torch.permute, aten.flatten.using_ints: torch.flatten, aten.cat.default: torch.cat,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d, aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d, aten.neg.default: torch.neg,
}
# Operations that only check, copy or move a tensor: bypassed where they keep its dtype and device.
PASS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout,
        aten.alias.default, aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default}
QUIET = ("torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
         "torch._subclasses.fake_tensor")
CHECKS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}


def _shape(node):
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _empty(node) -> bool:
    shape = _shape(node) if isinstance(node, fx.Node) else None
    return shape is not None and 0 in shape


def _same_type(node) -> bool:
    """Whether a conversion leaves its input's dtype and device alone (a cast of ids or masks must stay)."""
    src, out = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None, node.meta.get("val")
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype and \
        src.device == out.device


def _key(model, inputs):
    """What an export depends on: the model object, its tensors (by identity), its modules with their plain
    attributes (flags, sizes, modes) and the inputs' shapes."""
    tensors = tuple((name, id(t), tuple(t.shape)) for name, t in model.state_dict(keep_vars=True).items())
    modules = tuple((type(m), tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, PLAIN))))
                    for m in model.modules())
    shapes = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in inputs)
    return id(model), tensors, modules, shapes


PLAIN = (bool, int, float, str, type(None))
_LAST = {}      # the last export: `concat`, `fuse` and their pairwise steps analyse one member again and again


def export_graph(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """`torch.export.export(model, example_inputs).module()`, rewritten for the channel analysis (module docstring).

    The graph shares the model's tensors; the last one is kept for the next call on the same model, tensors and
    input shapes (it is only read: the analysis walks it, `concat` copies it). Raises whatever `torch.export`
    raises; `graph.trace` turns it into one line for the user.
    """
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    device = next((t.device for t in model.state_dict().values()), None)   # inputs given on the CPU, weights maybe not
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) and device is not None else x for x in inputs)
    key = _key(model, inputs)
    if _LAST.get("key") == key and _LAST["model"]() is model:
        return _LAST["graph"]
    gm = _export(model, inputs)
    _LAST.update(key=key, model=weakref.ref(model), graph=gm)
    return gm


def drop_kept_export() -> None:
    """Forget the export `export_graph` keeps (and free its graph): the next call exports again, as the first
    call in a process does."""
    _LAST.clear()


def _export(model, inputs) -> fx.GraphModule:
    modes = {m: m.training for m in model.modules()}
    loggers = [logging.getLogger(name) for name in QUIET]
    levels = [log.level for log in loggers]
    try:
        model.eval()
        for log in loggers:         # a refused export logs the whole graph; the caller says it in one line
            log.setLevel(logging.CRITICAL)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            gm = torch.export.export(model, inputs, strict=False).module()
    finally:
        for m, training in modes.items():
            m.training = training
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users:        # the export's input guards
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in CHECKS:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if (node.target in PASS and _same_type(node)) or (node.target is aten.dropout.default and node.args[2] is False):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        if node.target is aten.cat.default:         # empty caches joined to keys and values
            parts = [p for p in node.args[0] if not _empty(p)]
            node.args = (parts,) + tuple(node.args[1:])
            if len(parts) == 1:
                node.replace_all_uses_with(parts[0])
                graph.erase_node(node)
                continue
        if node.target is aten.layer_norm.default:
            node.target, node.args = F.layer_norm, tuple(node.args[:5])
        elif node.target is aten.batch_norm.default:     # F.batch_norm takes the statistics first
            x, weight, bias, mean, var, training, momentum, eps = node.args[:8]
            node.target, node.args = F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps)
        elif node.target in TWINS:
            node.target = TWINS[node.target]
    graph.eliminate_dead_code()
    for node in graph.nodes:
        shape = _shape(node)
        if shape is not None:
            node.meta["tensor_meta"] = SimpleNamespace(shape=shape)
    graph.lint()
    gm.recompile()
    gm.ntdist_exported = True
    return gm


def is_exported(gm) -> bool:
    """Whether `gm` came from `export_graph`."""
    return bool(getattr(gm, "ntdist_exported", False))
