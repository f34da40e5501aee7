"""Baselines and helpers around fusion: weight averaging, output ensembles, distillation loss, BN re-estimation.

A fused model keeps running BatchNorm statistics that belong to no network: averaging
and OT mix the members' statistics, NT keeps each kept channel's own although its
inputs changed. `fusion.bn_reestimate` (`BN_REESTIMATES`) says when they are recomputed
on training inputs: `reestimates_bn` holds the rule, `reestimate_bn` does it.
"""

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ntdist.errors import UserError
from ntdist.fusion.wide.assemble import clone_with, tensors_of
from ntdist.fusion.checks import check_models, check_weights, normalized

# auto: wherever data is at hand, except after a repair, which fits each layer to the statistics the fused model
# has (NT: the kept channels' own; avg and ot: the averaged ones) and is closer to the ensemble with them
# (docs/RESULTS.md, "Repair"); on: always; off: never
BN_REESTIMATES = ("auto", "on", "off")
_SPELLINGS = {"true": "on", "false": "off", "yes": "on", "no": "off"}   # YAML reads on/off as booleans


def average(models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None) -> nn.Module:
    """Vanilla (weighted) averaging of every parameter and float buffer; counters take the maximum."""
    models = check_models(models, min_count=1)
    w = normalized(check_weights(weights, len(models)))
    all_ts = [tensors_of(m) for m in models]
    with torch.no_grad():
        new = {name: averaged_tensor(name, [t[name] for t in all_ts], w) for name in all_ts[0]}
    return clone_with(models[0], new)


def averaged_tensor(name: str, ts: Sequence[torch.Tensor], w: Sequence[float]) -> torch.Tensor:
    """One tensor of `average`'s result from the members' tensors `ts` of that name (weights `w`, normalised).

    `ts` is read member by member (the first one twice), as `wide.assemble.assembled_tensor` reads it."""
    first = ts[0]
    if first.is_floating_point():
        acc = first * w[0]
        del first   # a sequence that loads on access then holds one member's tensor at a time
        for t, wm in zip(ts[1:], w[1:]):
            acc.add_(t, alpha=wm)
        return acc
    if name.endswith("num_batches_tracked"):
        return torch.stack(list(ts)).max(0).values
    return first.clone()


class Ensemble(nn.Module):
    """The members' outputs averaged (with `weights`, default uniform): the target NT's concat reproduces."""

    def __init__(self, models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.weights = normalized(check_weights(weights, len(self.members)))

    def forward(self, *args, **kwargs):
        out = None
        for w, model in zip(self.weights, self.members):
            y = model(*args, **kwargs) * w
            out = y if out is None else out + y
        return out


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 2.0, soft_weight: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened outputs, times T^2 * soft_weight, plus cross-entropy."""
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits.detach() / t, dim=-1),
                    reduction="batchmean", log_target=True)
    return soft * (t * t) * soft_weight + F.cross_entropy(student_logits, targets)


def bn_reestimate_setting(value, key: str = "fusion.bn_reestimate") -> str:
    """`value` as one of BN_REESTIMATES (booleans and true/false accepted), else a UserError naming `key`."""
    word = str(value).strip().lower()
    word = _SPELLINGS.get(word, word)
    if word not in BN_REESTIMATES:
        raise UserError(f"{key} must be one of {' | '.join(BN_REESTIMATES)}, got {value!r}")
    return word


def batch_norms(model: nn.Module) -> list:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def reestimates_bn(setting: str, model: nn.Module, repaired: bool = False) -> bool:
    """Whether a fused `model` gets its BatchNorm statistics recomputed, given data to do it on: never without
    BatchNorm layers; `setting` on: yes; off: no; auto: unless a repair fitted it to the statistics it has."""
    if not batch_norms(model) or setting == "off":
        return False
    return setting == "on" or not repaired


def reestimate_bn(model: nn.Module, loader, batches: int = 10) -> nn.Module:
    """Recompute BatchNorm running statistics from `batches` batches of `loader` (in place, returned).

    Running stats are reset and accumulated as a plain average (momentum=None)
    in train mode without gradients; momentum and train/eval modes are restored.
    Batches are moved to the device of the model's statistics (a DataLoader yields CPU batches).
    """
    norms = batch_norms(model)
    if not norms or batches < 1:
        return model
    device = norms[0].running_mean.device
    momenta = [m.momentum for m in norms]
    modes = {m: m.training for m in model.modules()}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    return model
