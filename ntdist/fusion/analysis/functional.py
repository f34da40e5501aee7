"""Layers written as functions inside forward: `F.linear`, `F.conv*`, `F.batch_norm` on a module's own parameters.

A depthwise `F.conv*` (one filter per channel) keeps its input's channels.
Model libraries often write a layer as a module whose forward calls the
functional form on its own `weight`, `bias` and running statistics (fused
BatchNorm+activation modules, channels-first norms, custom linear layers). Such
a call is the layer itself: the analysis records it under the owning module,
exactly as if it were `nn.Linear`, `nn.Conv*d` or `nn.BatchNorm*d`, so the
module's tensors are widened and pruned like theirs. `record` is the one place
where a layer (module or functional) enters the plan.
"""

import torch.nn.functional as F

from ntdist.fusion.analysis.plan import Layer, Val
from ntdist.fusion.analysis.shapes import arg, refuse

LAYER_FUNCS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.batch_norm: "bn"}
NAMES = {"weight", "bias", "running_mean", "running_var"}


def record(layers, sp, name, kind, out, inp):
    """Add layer `name` to the plan; a layer seen again (called twice) must read the same layout."""
    if name in layers:
        old = layers[name]
        sp.union_layouts(old.inp, inp, name)
        return old.out
    if out is None:
        return None
    layers[name] = Layer(kind, out, inp)
    return out


def functional_layer(node, vals, params, fetch, sp, layers):
    """`F.linear` / `F.conv*` / `F.batch_norm` on the parameters of one module: that module is the layer."""
    name, kind = node.name, LAYER_FUNCS[node.target]
    owners = {p.name.rpartition(".")[0] for p in params}
    attrs = {p.name.rpartition(".")[2] for p in params}
    if len(owners) != 1 or len(vals) != 1 or not attrs <= NAMES:
        refuse(name, f"calls {node.target.__name__} on {sorted(p.name for p in params)}; the fusion follows it "
                     "only on one module's own weight, bias and running statistics")
    owner, x = owners.pop(), vals[0]
    if kind == "bn":
        if x.cdim != 1:
            refuse(name, f"(batch_norm) reads channels-first input but the channels are dimension {x.cdim}")
        record(layers, sp, owner, "bn", x.lay, x.lay)
        return x
    weight = fetch(f"{owner}.weight") if "weight" in attrs else refuse(name, "has no weight of its module")
    fresh = None if owner in layers or (kind == "conv" and arg(node, 6, "groups", 1) != 1) else \
        sp.open(owner, weight.shape[0])
    if kind == "linear":
        if x.ndim is not None and x.ndim > 2 and x.cdim != x.ndim - 1:
            refuse(name, f"(linear) reads dimension {x.ndim - 1} of a tensor whose channels are dimension {x.cdim}")
        out = record(layers, sp, owner, "linear", fresh, x.lay)
        nd = x.ndim if x.ndim and x.ndim > 2 else 2
        return Val(out, nd, None, nd - 1 if nd > 2 else 1)
    groups = arg(node, 6, "groups", 1)
    if x.cdim != 1 or any(d.factor != 1 for d in x.lay):
        refuse(name, "(conv) reads flattened or channels-last input")
    if groups != 1 and groups == weight.shape[0] and weight.shape[1] == 1:     # depthwise: keeps the channels
        record(layers, sp, owner, "dwconv", x.lay, x.lay)
        sp.rewrites.append((name, "arg", 6))      # the group count, k times in a concatenated exported graph
        return Val(x.lay, x.ndim or weight.dim(), None)
    if groups != 1:
        refuse(name, "is a grouped convolution written with F.conv; only groups=1 and depthwise are followed")
    out = record(layers, sp, owner, "conv", fresh, x.lay)
    return Val(out, x.ndim or weight.dim(), None)
