"""What the refit reads from the models: a layer's input or output on a batch, the layer order, the targets.

`reach(model, name, x, "input"|"output")` runs `model` on `x` only as far as module
`name` and returns what that module received or produced (a forward hook stops the
forward there; `reach_call` returns the call's arguments and output); `reach_all`
reads the outputs (or calls) of several modules in one forward. `trace` runs the pruned model
once and lists its analysed layers in the order forward calls them, which ones it calls more than once and which
BatchNorm reads a layer's output directly. `waves` cuts those to be refitted into runs of consecutive layers
whose targets one pass of the members reads and holds together (`stored_bytes`: what each of them holds).

The concatenated model is never built: its hidden layers are block-diagonal, so
the wide output of a hidden layer is the members' outputs side by side (member-major
within every part of the layer's layout), and its output layer computes the weighted
sum of the members' outputs. `wide_output` assembles that from the members, and
`kept_index` says which of its entries the pruned layer's outputs are. After averaging
and OT the targets are the aligned members' averaged outputs instead; `unnormalized`
takes an averaged BatchNorm output back through the fused model's BatchNorm.
"""

from typing import Collection, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from ntdist.fusion.analysis.plan import Layout, Plan, part_sizes


class _Reached(BaseException):
    """Raised by a hook to stop a forward at the module whose tensor was wanted (a BaseException, so that a
    forward catching Exception does not swallow it)."""


def reach_call(model: nn.Module, name: str, x: torch.Tensor) -> Optional[Tuple[tuple, dict, object]]:
    """(positional arguments, keyword arguments, output) of the first call of module `name` when `model` runs on
    `x`, or None when forward never calls it. Only the part of forward up to that call runs."""
    box = []

    def hook(module, args, kwargs, output):
        box.append((args, kwargs, output))
        raise _Reached

    handle = model.get_submodule(name).register_forward_hook(hook, with_kwargs=True)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return box[0] if box else None


def reach(model: nn.Module, name: str, x: torch.Tensor, what: str) -> Optional[torch.Tensor]:
    """The input (first positional argument) or output of module `name` when `model` runs on `x`, or None
    when forward never calls it. Only the part of forward before that module runs."""
    call = reach_call(model, name, x)
    if call is None:
        return None
    return call[0][0] if what == "input" else call[2]


def reach_all(model: nn.Module, names: Sequence[str], x: torch.Tensor, calls: Collection[str] = ()
              ) -> Dict[str, object]:
    """The outputs of the modules `names` (of their first call) when `model` runs on `x`, in one forward that
    stops once the last of them has run; of those also in `calls`, the whole call, as `reach_call` returns it."""
    box: Dict[str, object] = {}

    def hook(name):
        def save(module, args, kwargs, output):
            box.setdefault(name, (args, kwargs, output) if name in calls else output)
            if len(box) == len(names):
                raise _Reached
        return save

    handles = [model.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True) for name in names]
    try:
        model(x)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return box


def trace(model: nn.Module, plan: Plan, x: torch.Tensor
          ) -> Tuple[List[str], Set[str], Dict[str, str], Dict[str, int]]:
    """(layers of `plan` in the order forward first calls them, those it calls more than once,
    layer -> the BatchNorm whose input is exactly that layer's output, layer -> bytes of its output per input; of
    the first item of a tuple output, as a MultiheadAttention's)."""
    calls: Dict[str, int] = {}
    outputs: Dict[str, torch.Tensor] = {}      # held until the end, so ids stay unique
    order: List[str] = []
    feeds: Dict[str, str] = {}
    handles = []

    def after(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                outputs[name] = output
        return hook

    def before(name):
        def hook(module, args):
            for layer, out in outputs.items():
                if args and args[0] is out:
                    feeds.setdefault(layer, name)
        return hook

    for name, layer in plan.layers.items():
        if layer.kind in ("param", "lnf"):     # a parameter or a functional call, not a module
            continue
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(after(name)))
        if layer.kind == "bn":
            handles.append(module.register_forward_pre_hook(before(name)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    firsts = {n: out[0] if isinstance(out, tuple) and out else out for n, out in outputs.items()}
    sizes = {n: out.numel() * out.element_size() // max(1, x.shape[0]) for n, out in firsts.items()
             if isinstance(out, torch.Tensor)}
    return order, {n for n, c in calls.items() if c > 1}, feeds, sizes


def stored_bytes(plan: Plan, output_bytes: Dict[str, int]) -> Dict[str, int]:
    """Bytes per input that a wave holds for each layer (`output_bytes`: those of its output): its target, of the
    shape of its output; for a MultiheadAttention, the target of its `out_proj` and, unless it reads the model
    input (its q/k/v are then left as they are), those of its q/k/v (three outputs' worth) and the pruned model's
    query, kept for the second fit."""
    held = dict(output_bytes)
    for name, size in output_bytes.items():
        if plan.layers[name].kind == "mha":
            held[name] = size * (1 if plan.layers[name].inp is None else 5)
    return held


def waves(names: List[str], bytes_per_input: Dict[str, int], inputs: int, budget: int) -> List[List[str]]:
    """`names` cut into runs of consecutive layers whose targets on `inputs` inputs fit in `budget` bytes
    together; a layer that alone exceeds it is a run of its own, fitted without stored targets."""
    out: List[List[str]] = []
    held = budget + 1
    for name in names:
        need = bytes_per_input.get(name, budget + 1) * inputs
        if held + need > budget or need > budget:
            out.append([])
            held = 0
        out[-1].append(name)
        held += need
    return out


def kept_index(layout: Layout, keep: Dict[int, Optional[torch.Tensor]], sizes: Sequence[Dict[int, int]],
               device) -> Optional[torch.Tensor]:
    """Indices into the wide layer's channel dimension of the pruned layer's channels, in their order, or
    None when every channel is kept. `sizes` are each member's space sizes (`Plan.space_sizes`)."""
    pieces, offset, whole = [], 0, True
    for d in layout:
        total = sum(s[d.space] for s in sizes)
        chosen = keep.get(d.space)
        units = torch.arange(total, device=device) if chosen is None else chosen.to(device)
        whole = whole and chosen is None
        pieces.append(offset + (units[:, None] * d.factor + torch.arange(d.factor, device=device)).reshape(-1))
        offset += total * d.factor
    return None if whole else torch.cat(pieces)


def wide_output(outputs: Sequence[torch.Tensor], layout: Layout, sizes: Sequence[Dict[int, int]], dim: int
                ) -> torch.Tensor:
    """The concatenated model's output of a hidden layer, from each member's output of it."""
    if len(layout) == 1:
        return torch.cat(list(outputs), dim)
    split = [o.split(part_sizes(layout, s), dim) for o, s in zip(outputs, sizes)]
    return torch.cat([member[p] for p in range(len(layout)) for member in split], dim)


def averaged_output(outputs: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The concatenated model's output layer: the members' outputs of it, weighted."""
    total = None
    for o, w in zip(outputs, weights):
        total = o * w if total is None else total + o * w
    return total


def unnormalized(bn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The input that BatchNorm `bn`, normalising with its running statistics, maps to `y` (channels on dim 1).

    A channel whose scale is (nearly) zero outputs its shift whatever it reads; it gets its running mean."""
    shape = [1, -1] + [1] * (y.dim() - 2)
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight if bn.affine else torch.ones_like(std)
    shift = bn.bias if bn.affine else torch.zeros_like(std)
    tiny = scale.abs() < 1e-12
    gain = torch.where(tiny, torch.zeros_like(std), std / torch.where(tiny, torch.ones_like(scale), scale))
    return (y - shift.reshape(shape)) * gain.reshape(shape) + bn.running_mean.reshape(shape)
