"""How different the ensemble members are, measured before fusing them.

Neuron Transplantation keeps the largest neurons of all members and drops the
rest. When members are near-copies of each other (same seed, same data order,
too little training) the kept neurons are duplicates and the fused model loses
what the dropped ones knew; the NT paper shows this as the failure of fusing a
model with itself. Two cheap checks flag that case:

- `prediction_disagreement`: how often two members predict different classes;
- `duplicate_units`: per layer, how many units have a near-copy (cosine
  similarity above a threshold) in another member. Only layers whose units have
  at least `MIN_FAN_IN` incoming weights are judged (`judged_layers`): a unit of
  5 weights (a 5-tap filter of one channel) has a near-copy among 32 others
  though the members were trained apart, since trained filters that short come
  in few shapes. Its cost per layer is
  k * s * (k - 1) * W * fan_in multiply-adds for k members of W units with
  `fan_in` inputs each, where s = min(W, max_units): with `max_units` each
  member's units are a seeded sample of s of them (every other member's units
  stay in the pool a near-copy is looked for in), so the fraction is an
  estimate from k * s units per layer.

Everything here is plain torch on one process, on the device the models are on; the
distributed pipeline runs `duplicate_units` across ranks with the same sample
(`sample_rows`) and the same test (`unit_rows`, `has_near_copy`), see
`distributed.diagnostics`.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

DISAGREEMENT_FLOOR = 0.01
DUPLICATE_CEILING = 0.5
# incoming weights below which alike units say nothing: two MNIST-1D CNNs trained from different seeds that
# disagree on 16 % of the test set have near-copies for 52 % of their 5-weight filters
MIN_FAN_IN = 16
_CHUNK_ELEMENTS = 1 << 22  # at most ~16 MB of float32 similarities at a time
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _predictions(logits) -> torch.Tensor:
    logits = torch.as_tensor(logits).detach()
    return logits.argmax(dim=-1) if logits.dim() > 1 else logits


def prediction_disagreement(logits_list: Sequence) -> Tuple[torch.Tensor, Optional[float]]:
    """Pairwise fraction of samples on which two members' argmax differ.

    `logits_list` holds one [N, C] tensor of logits (or [N] predicted labels) per
    member, all on the same N samples. Returns the symmetric [k, k] matrix and the
    mean over pairs i < j (None when there is only one member).
    """
    preds = [_predictions(x) for x in logits_list]
    if not preds:
        raise ValueError("prediction_disagreement needs the logits of at least one member")
    sizes = {p.shape[0] for p in preds}
    if len(sizes) != 1:
        raise ValueError(f"all members must be evaluated on the same samples, got sizes {sorted(sizes)}")
    k = len(preds)
    matrix = torch.zeros(k, k)
    for i in range(k):
        for j in range(i + 1, k):
            value = (preds[i] != preds[j]).float().mean().item() if preds[i].numel() else 0.0
            matrix[i, j] = matrix[j, i] = value
    if k < 2:
        return matrix, None
    mean = matrix.triu(diagonal=1).sum().item() / (k * (k - 1) / 2)
    return matrix, mean


def fusable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The Linear/Conv layers of a model in definition order, without the last (output) one."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
    return layers[:-1]


def judged_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The `fusable_layers` whose units have at least MIN_FAN_IN incoming weights: where a near-copy means
    something."""
    return [(name, m) for name, m in fusable_layers(model) if m.weight[0].numel() >= MIN_FAN_IN]


def unit_rows(layer: nn.Module) -> torch.Tensor:
    """One unit per row: the flattened incoming weights, with the bias appended; rows normalised."""
    weight = layer.weight.detach().float()
    rows = weight.reshape(weight.shape[0], -1)
    if getattr(layer, "bias", None) is not None:
        rows = torch.cat([rows, layer.bias.detach().float().reshape(-1, 1)], dim=1)
    return nn.functional.normalize(rows, dim=1)


def has_near_copy(rows: torch.Tensor, others: torch.Tensor, threshold: float) -> torch.Tensor:
    """For each row of `rows`, whether a row of `others` has cosine similarity above threshold."""
    found = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    if others.shape[0] == 0:
        return found
    step = max(1, _CHUNK_ELEMENTS // others.shape[0])
    for start in range(0, rows.shape[0], step):
        sims = rows[start:start + step] @ others.T
        found[start:start + step] = sims.max(dim=1).values > threshold
    return found


def sample_generator() -> torch.Generator:
    """The seeded generator of the unit sample (one per check, drawn from layer by layer, member by member)."""
    return torch.Generator().manual_seed(0)


def sample_rows(units: int, max_units: Optional[int], generator: torch.Generator) -> Optional[torch.Tensor]:
    """The sampled units of one member's layer of `units` (None: all of them). It draws only when it samples,
    so whoever walks the layers, and in each the members, in order gets the same sample."""
    if max_units is None or units <= max_units:
        return None
    return torch.randperm(units, generator=generator)[:max_units]


@torch.no_grad()
def duplicate_units(models: Sequence[nn.Module], threshold: float = 0.95,
                    max_units: Optional[int] = None) -> Dict[str, float]:
    """Per judged layer (`judged_layers`), the fraction of all members' units that have a near-copy in another
    member (estimated from a seeded sample of `max_units` units per member and layer when a layer is wider)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    sample = sample_generator()
    per_model = [judged_layers(m) for m in models]
    names = [[name for name, _ in layers] for layers in per_model]
    if any(n != names[0] for n in names[1:]):
        raise ValueError("all members must share one architecture to compare their units")
    out = {}
    for index, name in enumerate(names[0] if names else []):
        rows = [unit_rows(layers[index][1]) for layers in per_model]
        if len({r.shape[1] for r in rows}) != 1:
            raise ValueError(f"layer '{name}' has different shapes across members")
        total = dup = 0
        for i, mine in enumerate(rows):
            others = [r for j, r in enumerate(rows) if j != i]
            pool = torch.cat(others) if others else mine[:0]
            picked = sample_rows(mine.shape[0], max_units, sample)
            if picked is not None:
                mine = mine[picked.to(mine.device)]
            dup += int(has_near_copy(mine, pool, threshold).sum())
            total += mine.shape[0]
        out[name] = dup / total if total else 0.0
    return out


def diversity_summary(models: Sequence[nn.Module], logits_list: Sequence, threshold: float = 0.95,
                      max_units: Optional[int] = None) -> dict:
    """A JSON-serialisable summary of both checks, with a warning when members are near-identical."""
    return summarize(logits_list, duplicate_units(models, threshold, max_units), threshold)


def summarize(logits_list: Sequence, dup: Dict[str, float], threshold: float) -> dict:
    """`diversity_summary` from the members' logits and their `duplicate_units` (computed however)."""
    matrix, mean = prediction_disagreement(logits_list)
    dup_mean = sum(dup.values()) / len(dup) if dup else None
    warning = None
    if (mean is not None and mean < DISAGREEMENT_FLOOR) or (dup_mean is not None and dup_mean > DUPLICATE_CEILING):
        parts = []
        if mean is not None and mean < DISAGREEMENT_FLOOR:
            parts.append(f"members disagree on only {100 * mean:.2f}% of samples")
        if dup_mean is not None and dup_mean > DUPLICATE_CEILING:
            parts.append(f"{100 * dup_mean:.0f}% of units have a near-copy in another member")
        warning = ("members are near-identical (" + "; ".join(parts) + "), so Neuron Transplantation will "
                   "keep duplicated neurons and drop the rest, as when fusing a model with itself; make them "
                   "differ: leave train.identical_members off, train longer, or with model.weights re-initialise "
                   "more layers (model.reinit); docs/USAGE.md, 'The diversity check'")
    return {"disagreement_mean": mean, "disagreement": matrix.tolist(), "duplicate_fraction": dup,
            "duplicate_fraction_mean": dup_mean, "threshold": threshold, "warning": warning}
