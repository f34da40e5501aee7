"""The data types of the channel-space analysis: what `graph.analyze` produces and everything else reads.

A `Plan` says, for every parameter and buffer of a model, which of its
dimensions lie in which hidden channel spaces, so concatenation, pruning and OT
alignment treat any architecture alike. A widened dimension is a `Layout`: the
ordered parts (`Dim`) a channel concatenation made it of, usually just one.
Each part is widened on its own (member-major), so the wide layout of
`cat([a, b])` is `[a of every member, b of every member]`. Spaces are
integers; `IN` and `OUT` are the model's input and output spaces, which are
never widened.
"""

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

IN, OUT = 0, 1


@dataclass(frozen=True)
class Dim:
    """A tensor dimension of size `size(space) * factor` laid out as unit * factor + j."""

    space: int
    factor: int = 1


Layout = Tuple[Dim, ...]


def part_sizes(layout: Layout, sizes: Dict[int, int]) -> List[int]:
    """The length of each part of `layout` along its dimension, given every space's size."""
    return [sizes[d.space] * d.factor for d in layout]


def concat_sizes(member_sizes: Sequence[Dict[int, int]]) -> Dict[int, int]:
    """Size of every hidden space in the concatenation of members with these sizes: the sum of theirs."""
    return {s: sum(sizes[s] for sizes in member_sizes) for s in member_sizes[0]}


def parts_of(t: torch.Tensor, d: int, layout: Layout, sizes: Dict[int, int]):
    """(Dim, slice of `t` along dimension d) for every part of `layout`."""
    return list(zip(layout, t.split(part_sizes(layout, sizes), d)))


@dataclass
class TensorSpec:
    """How one parameter or buffer is widened: `dims[d]` is a Layout or None (left alone)."""

    module: str
    attr: str
    dims: Tuple[Optional[Layout], ...] = ()
    role: str = "layer"   # layer | output (weighted by member) | counter (max) | shared (member 0)
    part: str = ""        # weight | bias | scale | stat: what importance scores look at


@dataclass
class Layer:
    """A module whose parameters or attributes change with the width."""

    kind: str             # linear | conv | dwconv | gconv | bn | ln | param | mha | heads (a head count)
    out: Layout
    inp: Layout
    axis: int = 0         # for a parameter read in forward (kind param): its dimension along the channels


@dataclass
class Plan:
    """The analysis result: hidden spaces, their member-0 sizes and every tensor's spec."""

    sizes: Dict[int, int]                  # hidden space -> size in the analysed model
    order: List[int]                       # hidden spaces in creation order
    layers: Dict[str, Layer]
    tensors: Dict[str, TensorSpec]
    first_space: Optional[int] = None      # the first hidden layer's space (what `width` refers to)
    probe: Dict[int, Tuple[str, int, int]] = field(default_factory=dict)  # space -> (tensor, dim, factor)
    rest: Dict[int, Tuple] = field(default_factory=dict)
    """space -> (tensor, dim, ((other space, factor), ...), factor): a space that only appears beside others."""
    coupled: List[Tuple[Tuple[int, ...], int, str]] = field(default_factory=list)
    """(spaces, groups, layer): spaces a grouped conv cuts into `groups` blocks per member, kept block by block."""
    inexact: str = ""      # why concatenation cannot be exact (a non-linearity after the output layer), or ""
    norms: int = 0         # LayerNorms: the concatenated model normalises each member's block on its own
    atoms: frozenset = frozenset()
    """Spaces of one channel each, made where a fixed permutation or split routes a layer's channels one by one."""
    shuffles: List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    """(input node, output node, input atoms, output atoms): channel shuffles, gathered in the concatenated model."""
    widths: List[Tuple[str, int]] = field(default_factory=list)
    """(node, argument index or keyword): a channel or head count written as a constant, k times when concatenating."""
    norm_parts: Dict[str, int] = field(default_factory=dict)
    """LayerNorm (module, or node of an F.layer_norm call) -> parts of its concatenated input, where more than one."""
    mixers: List[Tuple[str, str, Tuple, int]] = field(default_factory=list)
    """(node, Linear module, input layout, channel dimension): a Linear over positions (token mixing), each
    member's own applied to its block of the channels in the concatenated model; NT keeps member 0's."""
    captured: bool = False
    """Traced with shape branches decided on the example input (`capture`): symbolic_trace failed on it."""
    graph: object = None
    """The graph module of `torch.export` the plan was read from (`export.py`), or None for a torch.fx trace."""
    rewrites: List[Tuple[str, str, int]] = field(default_factory=list)
    """(node, what, where) in `graph`, what the concatenated graph changes: "shape" (a channel size at index
    `where` of an explicit shape), "arg" (a count at argument `where`: groups), "split" (a split size along the
    channels), "slice" (the ends of a slice of whole parts), "mean" (a statistic over each member's channels
    along dimension `where`), "tied" (an output reading the embedding table of space `where`)."""

    def space_sizes(self, tensors: Dict[str, torch.Tensor]) -> Dict[int, int]:
        """Size of every hidden space in a member given its tensors (members may differ in width).

        An atom (`atoms`) counts one channel, as in a member; a concatenation of k members holds k
        units of it, which its tensors do not tell: size it with `concat_sizes` of the members' sizes."""
        sizes = {s: tensors[n].shape[d] // f for s, (n, d, f) in self.probe.items()}
        sizes.update((s, 1) for s in self.atoms)
        for s, (n, d, others, f) in self.rest.items():
            sizes[s] = (tensors[n].shape[d] - sum(sizes[o] * of for o, of in others)) // f
        return sizes


class Val(NamedTuple):
    """What the analysis knows about a tensor: channel layout, rank, spatial size, channel dimension.

    `grid` is (a, b, swapped, source node) while a view holds the channels of
    `source` as an [a, b] grid in dimensions cdim and cdim + 1 (swapped: transposed
    to [b, a]), as a channel shuffle does.
    """

    lay: Layout
    ndim: Optional[int]
    hw: Optional[int]
    cdim: int = 1
    grid: Tuple = ()


class Param(NamedTuple):
    """A parameter or buffer that forward reads directly (a get_attr node), by its state-dict name.

    `shape` is that of a view of it (an exported graph's `unsqueeze` or `expand`), None for the tensor itself.
    """

    name: str
    shape: Optional[Tuple[int, ...]] = None


class Tup(NamedTuple):
    """The tensors a channel split returns, in order."""

    items: Tuple[Val, ...]
