"""From a finished walk of the graph to the `Plan`: the hidden spaces and every tensor's widened dimensions.

`graph` walks the model and records, per layer, which channel space each of its
dimensions reads and writes; `finish` turns that into the `Plan`: the hidden
spaces (the model input and output spaces stay fixed) with their sizes, every
layer's dimensions in root spaces, the spec of every parameter and buffer, the
coupling of grouped convolutions (whole groups are kept together), and the
probes that size each space from a member's tensors.
"""

from ntdist.fusion.analysis.ops import fetch
from ntdist.fusion.analysis.plan import IN, OUT, Dim, Plan, TensorSpec
from ntdist.fusion.analysis.shapes import refuse


def finish(model, sp, layers, nonlinear) -> Plan:
    """The `Plan` of a finished walk: the hidden spaces, every layer's widened dimensions, every tensor's spec."""
    fin, fout = sp.find(IN), sp.find(OUT)
    inexact = _inexact(sp, nonlinear, fout)
    if fin == fout:
        refuse("output", "is added to the model input; fusion needs hidden layers between input and output")
    fixed = {fin, fout}
    sizes, order = {}, []
    for s in sp.born:
        r = sp.find(s)
        if r not in fixed and r not in sizes:
            sizes[r] = sp.size[s]
            order.append(r)
    first, coupled, tensors = _widen_layers(model, sp, layers, fin, fout)
    _add_shared(model, tensors)
    probe = {}
    for key, spec in tensors.items():
        for d, lay in enumerate(spec.dims):
            if lay is not None and len(lay) == 1 and lay[0].space not in probe:
                probe[lay[0].space] = (key, d, lay[0].factor)
    atoms = frozenset(sp.find(a) for a in sp.atoms) & set(sizes)
    rest = _rest_probes(tensors, probe, set(sizes) - set(probe) - atoms)
    if any(s not in probe and s not in atoms and s not in rest for s in sizes):
        refuse("output", "has channels that only ever appear concatenated with others; cannot size them")
    shuffles = [(a, b, tuple(sp.find(d.space) for d in x), tuple(sp.find(d.space) for d in y))
                for a, b, x, y in sp.shuffles]
    mixers = [(n, m, tuple(Dim(sp.find(d.space), d.factor) for d in lay), c) for n, m, lay, c in sp.mixers]
    for _, module, lay, _ in mixers:
        if any(d.space in fixed for d in lay):
            refuse(module, "mixes the positions of the output channels; token mixing is followed on hidden "
                           "channels only")
    return Plan(sizes=sizes, order=order, layers=layers, tensors=tensors, first_space=first, probe=probe, rest=rest,
                coupled=coupled.sets(sizes), inexact=inexact,
                norms=sum(1 for layer in layers.values() if layer.kind in ("ln", "lnf")), atoms=atoms,
                shuffles=shuffles, widths=sp.widths, mixers=mixers, norm_parts=sp.norm_parts,
                rewrites=[(n, what, sp.find(at) if what == "tied" else at) for n, what, at in sp.rewrites])


def _rest_probes(tensors, probe, missing):
    """Spaces seen only beside others in one dimension (a layer opened as parts): sized by what the others leave."""
    rest = {}
    for key, spec in tensors.items():
        for d, lay in enumerate(spec.dims):
            if lay is None or len(lay) < 2:
                continue
            for part in lay:
                others = tuple((o.space, o.factor) for o in lay if o is not part)
                if part.space in missing and part.space not in rest and all(o in probe for o, _ in others):
                    rest[part.space] = (key, d, others, part.factor)
    return rest


def _inexact(sp, nonlinear, fout) -> str:
    """Why concatenation cannot be exact: the first layer whose non-linearity reads the output layer's result."""
    for name, lay in nonlinear:
        if any(sp.find(d.space) == fout for d in lay):
            return (f"cannot concatenate at layer '{name}': it applies a non-linear operation to the output "
                    "layer's result, so no widened model of this class computes the members' average output; "
                    "fuse(method='nt') still prunes it back to one model")
    return ""


def _widen_layers(model, sp, layers, fin, fout):
    """Every layer's dimensions in root spaces (None where fixed: the model input or output), in place, and the
    specs of their tensors; returns (the first hidden layer's space, the grouped convolutions' coupling, specs)."""
    fixed = {fin, fout}
    first, coupled, tensors = None, _Coupling(), {}

    def wide(lay, name):
        lay = tuple(Dim(sp.find(d.space), d.factor) for d in lay)
        if any(d.space in fixed for d in lay):
            if len(lay) > 1:
                refuse(name, "concatenates the model input or output channels with hidden ones")
            return None
        return lay

    for name, layer in layers.items():
        out, inp = wide(layer.out, name), wide(layer.inp, name)
        if first is None and layer.kind in ("linear", "conv", "gconv") and inp is None and out is not None \
                and sp.find(layer.inp[0].space) == fin:
            first = out[0].space
        if out is None and layer.kind in ("dwconv", "gconv", "bn", "ln", "lnf", "param"):
            refuse(name, f"({layer.kind}) acts on the model input or output channels; only Linear/Conv "
                         "layers may touch them")
        if layer.kind == "gconv":
            if inp is None:
                refuse(name, "is a grouped convolution on the model input; grouped layers must consume hidden channels")
            coupled.add(name, (inp[0].space, out[0].space), model.get_submodule(name).groups)
        if layer.kind in ("linear", "conv") and sp.find(layer.out[0].space) == fin:
            refuse(name, "writes into the model input's channels (a residual on the input); cannot widen exactly")
        role = "output" if out is None and sp.find(layer.out[0].space) == fout else "layer"
        layer.out, layer.inp = out, inp
        if layer.kind == "param":
            owner, _, attr = name.rpartition(".")
            dims = tuple(out if d == layer.axis else None for d in range(fetch(model, name).dim()))
            tensors[name] = TensorSpec(owner, attr, dims, role=role, part="param")
        elif layer.kind not in ("lnf", "heads"):
            _layer_tensors(model, name, layer, role, tensors)
    return first, coupled, tensors


def _add_shared(model, tensors) -> None:
    """Every parameter and buffer no layer widens: kept as member 0 has it; a tied name takes its tensor's spec."""
    specs = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            key = f"{mname}.{attr}" if mname else attr
            if t is not None and key in tensors:
                specs.setdefault(id(t), tensors[key])
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            key = f"{mname}.{attr}" if mname else attr
            if t is not None and key not in tensors:
                tied = specs.get(id(t))
                tensors[key] = TensorSpec(mname, attr, (None,) * t.dim(), role="shared") if tied is None else \
                    TensorSpec(mname, attr, tied.dims, tied.role, tied.part)


class _Coupling:
    """Spaces that grouped convolutions cut into blocks, merged into sets pruned block by block together."""

    def __init__(self):
        self.groups, self.layer, self.link = {}, {}, {}

    def add(self, name, spaces, groups):
        for s in spaces:
            if self.groups.setdefault(s, groups) != groups:
                refuse(name, f"cuts its channels into {groups} groups, but another grouped convolution cuts "
                             f"them into {self.groups[s]}; cannot prune both exactly")
            self.layer.setdefault(s, name)
        a, b = (self._root(s) for s in spaces)
        self.link[b] = a

    def _root(self, s):
        while self.link.get(s, s) != s:
            s = self.link[s]
        return s

    def sets(self, sizes):
        out = {}
        for s in self.groups:
            out.setdefault(self._root(s), []).append(s)
        result = []
        for members in out.values():
            g = self.groups[members[0]]
            for s in members:
                if sizes[s] % g:
                    refuse(self.layer[s], f"has {sizes[s]} channels, not a multiple of its {g} groups")
            result.append((tuple(sorted(members)), g, self.layer[members[0]]))
        return result


def _layer_tensors(model, name, layer, role, tensors):
    mod = model.get_submodule(name)
    out, inp = layer.out, layer.inp
    rest = (None,) * (mod.weight.dim() - 2) if getattr(mod, "weight", None) is not None else ()
    if layer.kind in ("linear", "conv"):
        specs = {"weight": ((out, inp) + rest, "weight"), "bias": ((out,), "bias")}
    elif layer.kind == "mha":
        specs = {"in_proj_weight": ((out, inp), "weight"), "in_proj_bias": ((out,), "bias")}
    elif layer.kind == "embed":        # a table [tokens, width]: the width is its output
        specs = {"weight": ((None, out), "weight")}
    elif layer.kind == "tlinear":      # a linear layer storing its weight as [in, out] (GPT-2's Conv1D)
        specs = {"weight": ((inp, out), "weight"), "bias": ((out,), "bias")}
    elif layer.kind in ("dwconv", "gconv"):
        specs = {"weight": ((out, None) + rest, "weight"), "bias": ((out,), "bias")}
    else:
        specs = {"weight": ((out,), "scale"), "bias": ((out,), "shift"),
                 "running_mean": ((out,), "stat"), "running_var": ((out,), "stat")}
    for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
        if t is None:
            continue
        key = f"{name}.{attr}"
        if attr in specs:
            dims, part = specs[attr]
            tensors[key] = TensorSpec(name, attr, dims, role=role, part=part)
        elif attr == "num_batches_tracked":
            tensors[key] = TensorSpec(name, attr, (), role="counter")
