"""The concatenated model of a model analysed through `torch.export`: its exported graph, run at k times the width.

A class such as a `transformers` model stores head counts, widths and norms in
its configuration and modules, so an instance of it cannot compute the
members' concatenation. The exported graph (`Plan.graph`, specialised to the
example inputs' shapes) can: `concat_exported` installs the widened tensors
under their state-dict names and rewrites what the analysis recorded
(`Plan.rewrites`): every channel size written into a view, expansion or split,
and a depthwise convolution's group count, becomes k times larger, every mean over the channels (RMSNorm, a
channels-first LayerNorm) and every `F.layer_norm` is taken over each
member's block on its own. The result is a `torch.fx.GraphModule` taking the
inputs the model was exported with, of the same shapes. NT's fused model is an
instance of the original class (`assemble`), since it has the members' width.
"""

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule

from ntdist.fusion.analysis.plan import Plan
from ntdist.fusion.wide.assemble import assemble, clone_with, tensors_of
from ntdist.fusion.wide.norms import grouped_layer_norm


BIG = 2 ** 62       # ATen writes an open slice end as the largest int64


def grouped_mean(input: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """The mean over `dim` of each of `groups` equal blocks, repeated over its block (keeps the shape)."""
    width = input.shape[dim]
    means = input.unflatten(dim, (groups, width // groups)).mean(dim % input.dim() + 1)
    return means.repeat_interleave(width // groups, dim)


def _widen(shape, where: int, k: int):
    shape = list(shape)
    if shape[where] != -1:
        shape[where] *= k
    return shape


def concat_exported(models: Sequence[nn.Module], plan: Plan, weights: Sequence[float]) -> GraphModule:
    """The members side by side, run by the exported graph of member 0 (module docstring)."""
    k = len(models)
    wide = tensors_of(assemble(models, plan, weights))
    template: GraphModule = plan.graph
    out = clone_with(template, {name: wide.get(name, t) for name, t in tensors_of(template).items()})
    graph = out.graph
    nodes = {node.name: node for node in graph.nodes}
    for name, what, where in plan.rewrites:
        node = nodes[name]
        args = list(node.args)
        if what == "shape":
            args[1] = _widen(args[1], where, k)
        elif what == "arg":
            args[where] = args[where] * k
        elif what == "slice":       # whole parts of a concatenation: their ends move k times further
            args[2:4] = [a * k if isinstance(a, int) and 0 < a < BIG else a for a in args[2:4]]
        elif what == "split":
            args[1] = args[1] * k if isinstance(args[1], int) else [s * k for s in args[1]]
        elif what == "tied":        # the output reads the embedding table: each member's block weighted on the way in
            blocks = [torch.full((plan.space_sizes(tensors_of(m))[where],), float(w)) for m, w in zip(models, weights)]
            out.register_buffer(f"tied_weights_{name}", torch.cat(blocks).to(wide[plan.probe[where][0]].device),
                                persistent=False)
            with graph.inserting_before(node):
                scale = graph.get_attr(f"tied_weights_{name}")
                args[0] = graph.call_function(torch.mul, (args[0], scale))
        else:
            node.target = grouped_mean
            args, node.kwargs = [args[0], where, k], {}
        node.args = tuple(args)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is F.layer_norm:
            args = list(node.args) + [None] * (5 - len(node.args))
            shape = [s * k for s in args[1]]
            node.target = grouped_layer_norm
            node.args = (args[0], shape, args[2], args[3], 1e-5 if args[4] is None else args[4])
            node.kwargs = {"groups": k, "parts": plan.norm_parts.get(node.name, 1)}
    graph.lint()
    out.recompile()
    return out
