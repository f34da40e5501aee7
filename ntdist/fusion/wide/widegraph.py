"""The concatenated model as a GraphModule, where the class's own forward cannot run at k times the width.

Two rewrites, both on the traced graph of the wide model (node names as the
analysis saw them): channel shuffles become gathers, and channel counts that a
forward writes into a `reshape`/`view` as constants (`x.reshape(n, hidden_dim,
-1)`) are multiplied by k. NT's fused model keeps the members' width there, so
it stays a plain instance of the class.

Channel shuffles: each becomes one gather with a fixed index.

A channel shuffle (`view` to [N, g, C/g, ...], `transpose`, `view` back, as in
ShuffleNet v2) is a fixed permutation of a member's channels. The analysis
routes the channels it moves one by one (each is a space of one unit), so in
the concatenated model the shuffle's input holds, for every channel, the k
members' copies side by side, and so must its output. The class's own shuffle,
run on k times the channels, would interleave the members instead, so `concat`
replaces it by `index_select` with the permutation that keeps every member's
copy with its channel. NT's fused model has the original width and the class's
own shuffle, which then moves exactly the channels the analysis followed.
"""

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torch.fx import GraphModule

from ntdist.fusion.analysis.attention import symbolic_trace


def wide_permutation(inputs: Sequence[int], outputs: Sequence[int], k: int, device=None) -> torch.Tensor:
    """Index into the wide input of each wide output channel: output channel j of member m reads its input."""
    where: Dict[int, int] = {space: i for i, space in enumerate(inputs)}
    return torch.tensor([where[space] * k + m for space in outputs for m in range(k)], dtype=torch.long,
                        device=device)


def widen_graph(wide: nn.Module, shuffles: Sequence[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]],
                widths: Sequence[Tuple[str, object]], k: int) -> GraphModule:
    """`wide` (k members concatenated) with every shuffle gathered and every constant channel count widened."""
    gm = symbolic_trace(wide)
    nodes = {node.name: node for node in gm.graph.nodes}
    for name, position in widths:
        if isinstance(position, str):
            nodes[name].kwargs = {**nodes[name].kwargs, position: nodes[name].kwargs[position] * k}
            continue
        args = list(nodes[name].args)
        args[position] = args[position] * k
        nodes[name].args = tuple(args)
    device = next((t.device for t in wide.state_dict().values()), None)   # the index beside the weights
    for i, (source, out, inputs, outputs) in enumerate(shuffles):
        gm.register_buffer(f"channel_shuffle_{i}", wide_permutation(inputs, outputs, k, device), persistent=False)
        with gm.graph.inserting_after(nodes[out]):
            index = gm.graph.get_attr(f"channel_shuffle_{i}")
        with gm.graph.inserting_after(index):
            gathered = gm.graph.call_function(torch.index_select, (nodes[source], 1, index))
        nodes[out].replace_all_uses_with(gathered)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return GraphModule(gm, gm.graph, class_name=f"Concatenated{type(wide).__name__}")
