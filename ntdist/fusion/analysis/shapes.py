"""Layout rules of the channel-space analysis: where a tensor's channels are and how they are laid out.

`flatten`, `reshape`, `permute`/`transpose`, `mean`, `cat` and `split` change
a tensor's rank, its channel dimension or the order of its channel parts,
never a value: each returns the `Val` of its result or refuses with a
`UserError` naming the node. A concatenation along channels joins its parts'
layouts; a split must cut between parts, since cutting one layer's output
would take different units from the wide model than from each member.
"""

from ntdist.errors import UserError
from ntdist.fusion.analysis.plan import IN, Dim, Tup, Val

SUPPORTED = ("supported: Linear, Conv (plain, depthwise, grouped), BatchNorm, LayerNorm (also as F.* on a module's "
             "own parameters), nn.MultiheadAttention, torchvision's Swin and MaxViT attention, element-wise "
             "activations, dropout, stochastic depth, pooling, resizing, flatten, residual additions, channel cat, "
             "split and shuffle")


class NeedShapes(Exception):
    """Raised deep inside a walk when a spatial size is needed: `analyze` then measures shapes and walks again.

    Not a user error: `analyze` turns it into one only when no input to measure with can be had.
    """


def refuse(name, why):
    """Raise the UserError for a node or layer that cannot be fused exactly."""
    raise UserError(f"cannot fuse layer '{name}': it {why}; {SUPPORTED}")


def mixes_positions(x, sp):
    """Whether a layer over the last dimension of `x` mixes positions of hidden channels (token mixing)."""
    return x.ndim is not None and x.ndim > 2 and x.cdim != x.ndim - 1 and not is_input(sp, x.lay)


def arg(node, i, key, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def one(space, factor=1):
    """The layout of a tensor whose channels are one space."""
    return (Dim(space, factor),)


def is_input(sp, lay):
    """Whether a layout is the model input's (computed the same way in every member)."""
    return len(lay) == 1 and sp.find(lay[0].space) == IN


def adaptive_hw(size, x):
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    if any(s is None for s in sizes):
        return None
    hw = 1
    for s in sizes:
        hw *= int(s)
    return hw


def flatten(name, x, start, end, sp):
    if x.ndim is not None and x.ndim <= 2 and start in (1, -1) and end in (-1, 1):
        return x
    if x.ndim is not None and x.cdim == 1 and start % x.ndim >= 2:     # merges positions only (patch tokens)
        merged = (end % x.ndim) - (start % x.ndim)
        return Val(x.lay, x.ndim - merged, x.hw, 1)
    last = x.ndim is not None and x.cdim == x.ndim - 1
    if start != 1 or end not in (-1, (x.ndim or 0) - 1) or not (x.cdim == 1 or last):
        refuse(name, f"flattens dimensions {start}..{end} with channels in dimension {x.cdim}; only flattening "
                     "from dimension 1 with the channels first or last keeps channels apart")
    if is_input(sp, x.lay):
        return Val(one(x.lay[0].space), 2, None)
    if x.hw is None:
        raise NeedShapes(f"cannot fuse layer '{name}': it flattens a feature map of unknown spatial size; "
                        "pass example_inputs (one input batch) so the fusion can measure it")
    if last:        # position-major features (pos * C + c): the whole channel layout once per position
        return Val(x.lay * x.hw, 2, None)
    return Val(tuple(Dim(d.space, d.factor * x.hw) for d in x.lay), 2, None)


def mean(name, node, x, dims, keep):
    if dims is None:
        refuse(name, "averages over all dimensions")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    nd = x.ndim
    if nd is None or any(d % nd in (0, x.cdim) for d in dims):
        refuse(name, "averages over the batch or channel dimension")
    if keep:
        return Val(x.lay, nd, 1, x.cdim)
    cdim = x.cdim - sum(1 for d in dims if d % nd < x.cdim)
    return Val(x.lay, nd - len(dims), None if nd - len(dims) <= 2 else 1, cdim)


def channel_dim(name, x, dim):
    """Whether `dim` is the channel dimension of `x`."""
    if not isinstance(dim, int):
        refuse(name, f"uses a dimension given as {dim!r}, which the fusion cannot read")
    if x.ndim is not None:
        return dim % x.ndim == x.cdim
    if dim >= 0:
        return dim == x.cdim
    refuse(name, f"works along dimension {dim} of a tensor of unknown rank")


def cat(name, node, vals, sp):
    dim = arg(node, 1, "dim", 0)
    if not channel_dim(name, vals[0], dim):
        lay = vals[0].lay
        for v in vals[1:]:
            lay = sp.union_layouts(lay, v.lay, name)
        return Val(lay, vals[0].ndim, None, vals[0].cdim)
    if any(sp.find(d.space) == IN for v in vals for d in v.lay):
        refuse(name, "concatenates the model input with hidden channels")
    if len({v.ndim for v in vals}) != 1:
        refuse(name, "concatenates tensors of different ranks")
    return Val(sum((v.lay for v in vals), ()), vals[0].ndim, vals[0].hw, vals[0].cdim)


def split(name, node, x, sp, how):
    dim = arg(node, 2, "dim", 0)
    if not channel_dim(name, x, dim):
        refuse(name, "splits a tensor along a non-channel dimension")
    sizes = [sp.size[d.space] * d.factor for d in x.lay]
    total = sum(sizes)
    count = arg(node, 1, "split_size_or_sections" if how == "split" else "chunks", None)
    if how == "chunk":
        step = -(-total // count)
        cuts = list(range(0, total, step))[1:]
    elif isinstance(count, int):
        cuts = list(range(count, total, count))
    else:
        cuts = [sum(count[:i + 1]) for i in range(len(count) - 1)]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if any(c not in bounds for c in cuts) and all(d.factor == 1 for d in x.lay) and not is_input(sp, x.lay):
        sp.refine([d for d, lo, hi in zip(x.lay, bounds, bounds[1:]) if any(lo < c < hi for c in cuts)])
    if any(c not in bounds for c in cuts):
        refuse(name, f"splits channels at {cuts}, inside one layer's output (its parts end at {bounds[1:]}); "
                     "only splits between concatenated parts can be widened exactly")
    pieces, edges = [], [0] + cuts + [total]
    for lo, hi in zip(edges, edges[1:]):
        pieces.append(Val(tuple(d for d, b in zip(x.lay, bounds) if lo <= b < hi), x.ndim, x.hw, x.cdim))
    return Tup(tuple(pieces))


def reshape(node, first, sp, shape):
    name = node.name
    src = node.args[0].meta.get("tensor_meta")
    if shape is not None and src is not None:
        src = tuple(src.shape)
        if src == shape:
            return first
        if first.grid:
            return _merge_grid(node, first, sp, src, shape)
        if first.cdim == len(src) - 1 and len(shape) > 1 and shape[-1] == src[-1]:   # regroups positions only
            if isinstance(node.args[-1], int) and node.args[-1] > 0 and len(node.args) > 2:
                sp.widths.append((name, len(node.args) - 1))    # the channel count as a constant
            return Val(first.lay, len(shape), None, len(shape) - 1)
        if len(shape) == 2 and shape[0] == src[0] and first.cdim == len(src) - 1:
            return flatten(name, first, 1, -1, sp)       # channels last: position-major features
        if first.cdim != 1:
            refuse(name, f"reshapes a tensor with channels in dimension {first.cdim}")
        if len(shape) == len(src) + 1 and shape[0] == src[0] and shape[3:] == src[2:] and shape[1] * shape[2] == src[1]:
            return Val(first.lay, len(shape), first.hw, 1, (shape[1], shape[2], False, node.args[0].name))
        if len(shape) == 2 and shape[0] == src[0]:
            return flatten(name, first, 1, -1, sp)
        if len(shape) > 2 and shape[:2] == src[:2]:          # regroups positions, channels untouched
            if len(node.args) > 2 and isinstance(node.args[2], int):
                sp.widths.append((name, 2))                # the channel count as a constant: k times when wide
            return Val(first.lay, len(shape), first.hw, 1)
        refuse(name, f"reshapes {list(src)} to {list(shape)}, mixing channels")
    if first.ndim == 2:
        return first
    raise NeedShapes(f"cannot fuse layer '{name}': it reshapes a feature map; pass example_inputs "
                     "(one input batch) so the fusion can check the reshape")


def permute(name, x, dims):
    """`x.permute(dims)`: the channels move to where dimension `cdim` lands."""
    dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        refuse(name, "permutes dimensions given as tensors, which the fusion cannot read")
    nd = len(dims)
    return Val(x.lay, nd, x.hw, [d % nd for d in dims].index(x.cdim % nd))


def transpose(name, x, a, b):
    """`x.transpose(a, b)`: the channels move if they are one of the two."""
    if not isinstance(a, int) or not isinstance(b, int) or x.ndim is None:
        refuse(name, "transposes dimensions the fusion cannot place")
    a, b = a % x.ndim, b % x.ndim
    if x.grid:
        if {a, b} != {x.cdim, x.cdim + 1}:
            refuse(name, "moves channels held as a grid by a view")
        return x._replace(grid=(x.grid[0], x.grid[1], not x.grid[2], x.grid[3]))
    cdim = b if x.cdim == a else a if x.cdim == b else x.cdim
    return Val(x.lay, x.ndim, x.hw, cdim)


def _merge_grid(node, x, sp, src, shape):
    """The view that flattens a channel grid back: a transposed grid is a fixed permutation of the channels.

    A permutation moves single channels, so every layer whose output it reads
    must open one space per channel (another walk is asked for if not yet).
    """
    a, b, swapped, source = x.grid
    if len(shape) != len(src) - 1 or shape[x.cdim] != a * b or tuple(shape[:x.cdim]) != tuple(src[:x.cdim]):
        refuse(node.name, f"reshapes a channel grid {list(src)} to {list(shape)}; only merging it back is followed")
    if not swapped:
        return Val(x.lay, len(shape), x.hw, x.cdim)
    coarse = [d for d in x.lay if d.factor != 1 or sp.size[d.space] != 1]
    if any(d.factor != 1 or is_input(sp, (d,)) for d in coarse):
        refuse(node.name, "permutes flattened or input channels")
    if coarse:
        sp.refine(coarse)
        return Val(x.lay, len(shape), x.hw, x.cdim)     # placeholder until the next walk
    lay = tuple(x.lay[i * b + j] for j in range(b) for i in range(a))
    sp.shuffles.append((source, node.name, x.lay, lay))
    return Val(lay, len(shape), x.hw, x.cdim)
