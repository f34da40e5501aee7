"""Statistics over seeds: mean ± sample std of every accuracy in a list of results.

`aggregate` is what sweep.json and the report's tables are made of; `best_by_val`
picks a fine-tuning epoch by validation accuracy, never by test accuracy.
"""

import math
from typing import List, Optional, Sequence, Tuple

from ntdist.errors import UserError
from ntdist.records.results import RunResults, SyncResults


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def best_by_val(test: Sequence[float], val: Optional[Sequence[float]]) -> Optional[float]:
    """Test accuracy at the epoch of highest validation accuracy (ties: the earliest epoch).

    Without a usable validation curve the last epoch is taken, never the best test value.
    """
    if not test:
        return None
    if not val or len(val) != len(test):
        return test[-1]
    best = max(range(len(val)), key=lambda i: (val[i], -i))
    return test[best]


def _stat(values) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


def _curve_stats(curves: List[list]) -> List[dict]:
    length = max((len(c) for c in curves), default=0)
    return [_stat([c[i] for c in curves if len(c) > i]) for i in range(length)]


def _curve_block(entries: list, post_fusion: bool) -> dict:
    """Statistics of fine-tuning curves (of `MethodResult`s or `ControlResult`s)."""
    out = {"finetune": _curve_stats([e.finetune for e in entries]),
           "best": _stat([best_by_val(e.finetune, e.finetune_val) for e in entries])}
    if post_fusion:
        out["post_fusion"] = _stat([e.post_fusion for e in entries])
        out["sparsity"] = _stat([e.sparsity for e in entries])
    return out


def aggregate(results: List[RunResults]) -> dict:
    """Mean and std over seeds of every accuracy in a list of results.

    Each statistic is {"mean", "std", "n"} (None when no run reports it); a curve is a
    list of them, one per fine-tuning epoch.
    """
    if not results:
        raise UserError("nothing to aggregate: no finished runs; run 'ntdist run' first")
    out = {"runs": len(results), "members_mean": _stat([sum(r.members) / len(r.members) for r in results if r.members]),
           "best_member": _stat([r.best_member for r in results]),
           "ensemble": _stat([r.ensemble for r in results])}
    controls = [r.control for r in results if r.control is not None]
    out["control"] = _curve_block(controls, False) if controls else None
    methods: dict = {}
    for r in results:
        for name, entry in r.fusion.items():
            methods.setdefault(name, []).append(entry)
    out["methods"] = {name: _curve_block(entries, True) for name, entries in methods.items()}
    return out


def aggregate_sync(results: List[SyncResults]) -> dict:
    """Mean and std over seeds of each sync method's final test accuracy."""
    methods: dict = {}
    for r in results:
        for name, entry in r.sync.items():
            methods.setdefault(name, []).append(entry.final)
    return {"runs": len(results), "sync": {name: _stat(finals) for name, finals in methods.items()}}


def merged_summary(results: List[RunResults]) -> Optional[str]:
    """One line: the units NT dedup merged into a kept twin per layer, mean over the runs (None without dedup)."""
    counts = [r.fusion["nt"].merged for r in results if "nt" in r.fusion and r.fusion["nt"].merged is not None]
    if not counts:
        return None
    layers = sorted({layer for c in counts for layer in c}, key=lambda layer: list(counts[0]).index(layer)
                    if layer in counts[0] else len(counts[0]))
    means = ", ".join(f"{layer} {sum(c.get(layer, 0) for c in counts) / len(counts):g}" for layer in layers)
    return f"NT dedup merged units per layer (mean over {len(counts)} runs): {means}."
