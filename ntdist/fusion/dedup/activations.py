"""The activation criterion of NT dedup: units compared by what they compute on example inputs.

With `dedup_criterion="activations"`, a unit's signature is its output over a
batch of inputs instead of its parameters: for every module producing the unit's
space (Linear and convolution layers, and the BatchNorm after them), the unit's
channel of the module's output, before any non-linearity, over every example
and position. Two units of different members are duplicates when the
correlation of those outputs (cosine similarity after removing each unit's mean
over the samples; the uncentred cosine of ReLU-fed units is high for almost any
pair) is above the threshold for every such module. Exact copies compute the
same outputs, so self-fusion stays exact; units that compute nearly the same
function with differently spread weights (which the weight criterion misses)
are merged too.

Each member is run on its own: the wide model's units compute exactly what they
computed in their member, so the signatures are those of the members'
channels, stacked member by member like the wide model's units.
"""

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from ntdist.errors import UserError
from ntdist.fusion.wide.assemble import tensors_of
from ntdist.fusion.analysis.plan import Plan, parts_of

CRITERIA = ("weights", "activations")
_PRODUCERS = ("linear", "conv", "gconv", "dwconv", "bn")


def _outputs(model: nn.Module, names: Sequence[str], inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every named module's output on `inputs`, channels first: [channels, everything else]."""
    seen, hooks = {}, []
    modules = dict(model.named_modules())

    def keep(name, channel_dim):
        def hook(_module, _args, out):
            out = out.detach().float().movedim(channel_dim, 0)
            seen[name] = out.reshape(out.shape[0], -1)
        return hook

    for name in names:
        module = modules.get(name)
        if module is not None:
            hooks.append(module.register_forward_hook(keep(name, -1 if isinstance(module, nn.Linear) else 1)))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def activation_signatures(models: Sequence[nn.Module], plan: Plan, inputs,
                          who: str = "dedup_criterion 'activations'") -> Dict[int, List[torch.Tensor]]:
    """space -> parts ([wide units, n] each) of every unit's output signature, units member by member (`who`
    names the option that compares them, in the error for missing inputs)."""
    if inputs is None or not isinstance(inputs, torch.Tensor) or len(inputs) < 2:
        raise UserError(f"{who} compares units' outputs on example inputs: pass "
                        "example_inputs, a batch of at least 2 training inputs (a few hundred work best)")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):   # NaN outputs: nothing correlates
        raise UserError("dedup_criterion 'activations' got example_inputs with NaN or infinite values, on which no "
                        "two units' outputs correlate (nothing would merge); pass finite training inputs")
    names = [n for n, layer in plan.layers.items() if layer.kind in _PRODUCERS and layer.out]
    per_member = []
    for model in models:
        sizes = plan.space_sizes(tensors_of(model))
        outs = _outputs(model, names, inputs.to(next(model.parameters()).device))
        parts: Dict[tuple, torch.Tensor] = {}
        for name, out in outs.items():
            for dim, piece in parts_of(out, 0, plan.layers[name].out, sizes):
                piece = piece.reshape(sizes[dim.space], -1).cpu()
                parts[(name, dim.space)] = piece - piece.mean(1, keepdim=True)
        per_member.append(parts)
    keys = [key for key in per_member[0] if all(key in p for p in per_member)]
    out: Dict[int, List[torch.Tensor]] = {}
    for name, space in keys:
        out.setdefault(space, []).append(torch.cat([p[(name, space)] for p in per_member]))
    return out
