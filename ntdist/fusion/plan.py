"""The data types of the channel-space analysis: what `graph.analyze` produces and everything else reads.

A `Plan` says, for every parameter and buffer of a model, which of its
dimensions lie in which hidden channel space (`Dim`), so concatenation,
pruning and OT alignment treat any architecture alike. Spaces are integers;
`IN` and `OUT` are the model's input and output spaces, which are never widened.
"""

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

IN, OUT = 0, 1


@dataclass(frozen=True)
class Dim:
    """A tensor dimension of size `size(space) * factor` laid out as unit * factor + j."""

    space: int
    factor: int = 1


@dataclass
class TensorSpec:
    """How one parameter or buffer is widened: `dims[d]` is a Dim or None (left alone)."""

    module: str
    attr: str
    dims: Tuple[Optional[Dim], ...] = ()
    role: str = "layer"   # layer | output (weighted by member) | counter (max) | shared (member 0)
    part: str = ""        # weight | bias | scale | stat: what importance scores look at


@dataclass
class Layer:
    """A module whose parameters or attributes change with the width."""

    kind: str             # linear | conv | dwconv | gconv | bn
    out: int
    inp: int
    factor: int = 1       # flatten factor on the input dimension (Linear after a conv)


@dataclass
class Plan:
    """The analysis result: hidden spaces, their member-0 sizes and every tensor's spec."""

    sizes: Dict[int, int]                  # hidden space -> size in the analysed model
    order: List[int]                       # hidden spaces in creation order
    layers: Dict[str, Layer]
    tensors: Dict[str, TensorSpec]
    first_space: Optional[int] = None      # the first hidden layer's space (what `width` refers to)
    probe: Dict[int, Tuple[str, int, int]] = field(default_factory=dict)  # space -> (tensor, dim, factor)

    def space_sizes(self, tensors: Dict[str, torch.Tensor]) -> Dict[int, int]:
        """Size of every hidden space in a model given its tensors (members may differ in width)."""
        return {s: tensors[n].shape[d] // f for s, (n, d, f) in self.probe.items()}


class Val(NamedTuple):
    """What the analysis knows about a tensor: channel space, flatten factor, rank, spatial size."""

    space: int
    factor: int
    ndim: Optional[int]
    hw: Optional[int]
