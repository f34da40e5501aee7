"""The concatenated model as a GraphModule, where the class's own forward cannot run at k times the width.

Three rewrites, all on the traced graph of the wide model (node names as the
analysis saw them): channel shuffles become gathers, channel counts that a
forward writes into a `reshape`/`view` as constants (`x.reshape(n, hidden_dim,
-1)`) are multiplied by k, and a Linear over positions (token mixing) becomes
each member's Linear applied to that member's channels. NT's fused model keeps
the members' width there, so it stays a plain instance of the class.

Token mixing: one Linear applies the same weights to every channel, so a wide
model of the class would mix every member's channels with one member's weights.
The rewrite picks each member's channels out of the wide layout, applies that
member's own layer (its weights as parameters of the GraphModule) and puts the
results back in place: exactly the members' token mixing, side by side.

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

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule

from ntdist.fusion.analysis.attention import symbolic_trace


def wide_permutation(inputs: Sequence[int], outputs: Sequence[int], k: int, device=None) -> torch.Tensor:
    """Index into the wide input of each wide output channel: output channel j of member m reads its input."""
    where: Dict[int, int] = {space: i for i, space in enumerate(inputs)}
    return torch.tensor([where[space] * k + m for space in outputs for m in range(k)], dtype=torch.long,
                        device=device)


def member_channels(layout, sizes: Sequence[Dict[int, int]], device=None) -> List[torch.Tensor]:
    """Each member's channels in the wide layout: every part holds the members' blocks in turn."""
    picks, offset = [[] for _ in sizes], 0
    for d in layout:
        for m, size in enumerate(sizes):
            n = size[d.space] * d.factor
            picks[m].append(torch.arange(offset, offset + n, device=device))
            offset += n
    return [torch.cat(p) for p in picks]


def _mix_per_member(gm: GraphModule, node, i: int, mixer, members: Sequence[nn.Module], sizes, device):
    """Replace the call of a token-mixing Linear by each member's Linear on its own channels."""
    _, module, layout, cdim = mixer
    picks = member_channels(layout, sizes, device)
    order = torch.cat(picks)
    outs = []
    for m, (member, pick) in enumerate(zip(members, picks)):
        layer = member.get_submodule(module)
        gm.register_buffer(f"token_mix_{i}_channels_{m}", pick, persistent=False)
        gm.register_parameter(f"token_mix_{i}_weight_{m}", nn.Parameter(layer.weight.detach().clone()))
        if layer.bias is not None:
            gm.register_parameter(f"token_mix_{i}_bias_{m}", nn.Parameter(layer.bias.detach().clone()))
        with gm.graph.inserting_before(node):
            own = gm.graph.call_function(torch.index_select, (node.args[0], cdim,
                                                              gm.graph.get_attr(f"token_mix_{i}_channels_{m}")))
            bias = gm.graph.get_attr(f"token_mix_{i}_bias_{m}") if layer.bias is not None else None
            outs.append(gm.graph.call_function(F.linear, (own, gm.graph.get_attr(f"token_mix_{i}_weight_{m}"), bias)))
    with gm.graph.inserting_before(node):
        result = gm.graph.call_function(torch.cat, (outs, cdim))
        if not torch.equal(order, torch.arange(len(order), device=device)):    # parts interleave the members
            gm.register_buffer(f"token_mix_{i}_order", torch.argsort(order), persistent=False)
            back = gm.graph.get_attr(f"token_mix_{i}_order")
            result = gm.graph.call_function(torch.index_select, (result, cdim, back))
    node.replace_all_uses_with(result)


def widen_graph(wide: nn.Module, shuffles: Sequence[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]],
                widths: Sequence[Tuple[str, object]], k: int, mixers: Sequence[Tuple] = (),
                members: Sequence[nn.Module] = (), sizes: Sequence[Dict[int, int]] = ()) -> GraphModule:
    """`wide` (k members concatenated) with every shuffle gathered, every constant channel count widened and
    every token-mixing Linear applied member by member (`mixers`, read from `members` of space `sizes`)."""
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
    for i, mixer in enumerate(mixers):
        _mix_per_member(gm, nodes[mixer[0]], i, mixer, members, sizes, device)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return GraphModule(gm, gm.graph, class_name=f"Concatenated{type(wide).__name__}")
