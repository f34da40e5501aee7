"""Union-find over channel spaces, as the analysis walk builds them.

A space is born when a layer opens its output channels (`open`), normally as
one space, or one space per channel when a permutation or a split routes that
layer's channels apart (the layers named in `atomize`). Residual additions
merge spaces part by part (`union_layouts`). When a walk meets channels that
must be routed apart but were opened whole, `refine` records their layers in
`pending`, and the analysis walks again with them atomized. Two more requests
work the same way: `coarsen` (a layer's units are groups of channels, as an
attention head of `head_dim` features, or a key/value head with its group of
query heads) and `cut` (a layer's output is several parts, as a fused
query/key/value projection split in three).
"""

from ntdist.fusion.analysis.plan import IN, OUT, Dim
from ntdist.fusion.analysis.shapes import refuse


class Spaces:
    """Union-find over channel spaces."""

    def __init__(self, atomize=frozenset(), units=None, cuts=None):
        self.parent, self.size, self.born = [IN, OUT], [None, None], []
        self.creator, self.atomize, self.pending, self.atoms, self.shuffles = {}, atomize, set(), set(), []
        self.widths, self.norm_parts = [], {}
        self.units, self.cuts = dict(units or {}), dict(cuts or {})     # layer -> channels per unit, part edges
        self.asked_units, self.asked_cuts = {}, {}
        self.rewrites = []      # Plan.rewrites
        self.mixers = []        # Plan.mixers, layouts in this walk's spaces

    def asks(self) -> bool:
        """Whether this walk asked for another with different layers atomized, coarsened or cut."""
        return bool(self.pending - self.atomize) or any(
            self.units.get(k) != v for k, v in self.asked_units.items()) or any(
            self.cuts.get(k) != v for k, v in self.asked_cuts.items())

    def new(self, size: int, creator: str = "") -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.born.append(len(self.parent) - 1)
        self.creator[len(self.parent) - 1] = creator
        return len(self.parent) - 1

    def open(self, name: str, size: int):
        """The layout of layer `name`'s output: one new space, or one per channel if it must be routed apart."""
        if name not in self.atomize:
            unit, edges = self.units.get(name, 1), self.cuts.get(name, ())
            parts = [b - a for a, b in zip((0,) + edges, edges + (size,))]
            if any(p % unit for p in parts):
                refuse(name, f"has {size} output channels, which do not divide into units of {unit}")
            return tuple(Dim(self.new(p // unit, name), unit) for p in parts)
        spaces = tuple(Dim(self.new(1, name)) for _ in range(size))
        self.atoms.update(d.space for d in spaces)
        return spaces

    def refine(self, lay):
        """Ask for another walk in which the layers producing `lay`'s parts open one space per channel."""
        for d in lay:
            root = self.find(d.space)
            self.pending.update(self.creator[s] for s in self.born if self.find(s) == root and self.creator[s])

    def creators(self, space: int):
        root = self.find(space)
        return {self.creator[s] for s in self.born if self.find(s) == root and self.creator[s]}

    def coarsen(self, space: int, ratio: int) -> None:
        """Ask for another walk in which the layers opening `space` group `ratio` times more channels per unit."""
        for name in self.creators(space):
            self.asked_units[name] = self.units.get(name, 1) * ratio

    def cut(self, name: str, edges) -> None:
        """Ask for another walk in which layer `name` opens its output as parts ending at `edges`."""
        self.asked_cuts[name] = tuple(sorted(set(self.cuts.get(name, ())) | set(edges)))

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union_layouts(self, a, b, name):
        """Merge two layouts part by part (a residual addition); refuse if they are cut differently."""
        if len(a) != len(b) or any(x.factor != y.factor for x, y in zip(a, b)):
            if all(d.factor == 1 for d in a + b):
                self.refine(a + b)     # cut differently: both sides routed channel by channel may still match
            refuse(name, "combines tensors with different feature layouts (differently concatenated or flattened)")
        for x, y in zip(a, b):
            rx, ry = self.find(x.space), self.find(y.space)
            if rx != ry and IN in (rx, ry):
                refuse(name, "adds hidden channels to the model input; cannot widen exactly")
            self.union(x.space, y.space)
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb in (IN, OUT) or (ra not in (IN, OUT) and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra
