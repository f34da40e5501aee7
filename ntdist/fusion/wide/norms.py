"""LayerNorm in the concatenated model: each member's block of channels is normalised on its own.

A LayerNorm over the concatenated channels would mix the members' statistics
(mean and variance over all k blocks), so it is not the members' LayerNorms
side by side. `group_layer_norms(wide, k)` returns the concatenated model as a
`torch.fx.GraphModule` (same parameters, same names) in which every LayerNorm,
module or `F.layer_norm` call, is `grouped_layer_norm(..., groups=k)`: the
channels are cut into k equal blocks, each normalised over itself, then the
widened affine parameters apply. Only `concat` needs this; NT's fused model is
a plain instance of the original class with ordinary LayerNorms.
"""

import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule

from ntdist.fusion.analysis.attention import symbolic_trace


def grouped_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, groups=1, parts=1):
    """`F.layer_norm` over the last dimension, computed separately on each of `groups` equal blocks.

    With `parts` > 1 the channels are `parts` concatenated parts, each holding
    every group's block in turn (the wide layout of a concatenation): group g is
    its block of every part, normalised together.
    """
    width = normalized_shape[-1]
    if parts == 1:
        blocks = input.unflatten(-1, (groups, width // groups))
        out = F.layer_norm(blocks, (width // groups,), None, None, eps).flatten(-2)
    else:
        blocks = input.unflatten(-1, (parts, groups, width // (groups * parts))).transpose(-3, -2)
        out = F.layer_norm(blocks, blocks.shape[-2:], None, None, eps).transpose(-3, -2).flatten(-3)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def group_layer_norms(wide: nn.Module, groups: int, parts=None) -> GraphModule:
    """`wide` with every LayerNorm normalising `groups` member blocks separately (a GraphModule).

    `parts` maps a LayerNorm (module name, or node name of an F.layer_norm call)
    whose input is a concatenation to its number of parts (`Plan.norm_parts`).
    """
    parts = parts or {}
    gm = symbolic_trace(wide)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.layer_norm:
            node.target = grouped_layer_norm
            node.kwargs = {**node.kwargs, "groups": groups, "parts": parts.get(node.name, 1)}
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.LayerNorm):
            mod = gm.get_submodule(node.target)
            with graph.inserting_before(node):
                affine = [graph.get_attr(f"{node.target}.{p}") if getattr(mod, p, None) is not None else None
                          for p in ("weight", "bias")]
                new = graph.call_function(grouped_layer_norm, (node.args[0], tuple(mod.normalized_shape), *affine),
                                          {"eps": mod.eps, "groups": groups, "parts": parts.get(node.target, 1)})
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.lint()
    return GraphModule(gm, graph, class_name=f"Concatenated{type(wide).__name__}")

