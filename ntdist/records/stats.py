"""Statistics over seeds: mean ± sample std of every accuracy, and paired differences.

`aggregate` is what sweep.json and the report's tables are made of; `best_by_val`
picks a fine-tuning epoch by validation accuracy, never by test accuracy.

Every seed trains one set of members; NT, the other fusion methods and the control
(the best member fine-tuned for the same extra epochs) all start from that set, so
their accuracies pair up seed by seed. `paired` reduces the per-seed differences
a - b to mean ± sample std, a two-sided paired t-test p-value and a sign count;
`paired_block` does it for one method against its baselines at every checkpoint:
right after fusion (the control's value there is the best member itself), after
each fine-tuning epoch, and at the epoch chosen by validation accuracy ("best").
Every method is compared with the control, NT also with OT and Avg (`comparisons`).
The caller must pass one run per seed: two runs of the same seed are one sample.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ntdist.errors import UserError
from ntdist.records.results import RunResults, SyncResults

BASELINES = ("control", "ot", "avg")   # what NT is compared with, in the report's order
METHOD_ORDER = ("nt", "ot", "avg")      # the paired rows' order; other methods follow, sorted
PAPER_EPOCHS = 3                        # the paper's tables report accuracy after 3 fine-tuning epochs
# Accuracies are multiples of 1 / (test-set size), so a real spread of differences is at least
# ~1 / (2 x test-set size), 5e-7 for a million samples; a smaller std is rounding of equal differences.
NO_SPREAD = 1e-9


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
        out["kept_gain"] = kept_gain_stats(entries)
    return out


def kept_gain_stats(entries: list) -> Dict[str, dict]:
    """Mean ± std over seeds of each stage's kept gain (results.json's `kept_gain`, stages in the order recorded);
    a seed whose ensemble gained nothing has none and is not counted (`n` says how many are)."""
    gains = [e.kept_gain for e in entries if e.kept_gain]
    stages = list(dict.fromkeys(stage for g in gains for stage in g))
    return {stage: _stat([g.get(stage) for g in gains]) for stage in stages}


def checkpoint_epochs(epochs: int) -> List[int]:
    """The fine-tuning epochs (1-based) the tables show: the paper's 3 when there are more, and the last."""
    return sorted({min(PAPER_EPOCHS, epochs), epochs}) if epochs > 0 else []


def finetune_epochs(stats: dict) -> int:
    """The fine-tuning epochs (finetune.epochs) recorded in `aggregate`'s statistics: the longest curve."""
    curves = [b["finetune"] for b in stats["methods"].values()] + [(stats["control"] or {}).get("finetune") or []]
    return max(len(c) for c in curves)


def no_p_reason(differences: Sequence[float]) -> Optional[str]:
    """Why a paired t-test says nothing about `differences` (None when it can be computed).

    With one value there is no spread to test against; with no spread the statistic is
    0/0 or infinite, and an "infinitely significant" difference from, e.g., one run
    copied into two folders would be a lie.
    """
    if len(differences) < 2:
        return "1 seed" if differences else "no seeds"
    if mean_std(differences)[1] <= NO_SPREAD:
        return "no spread"
    return None


def t_test_p(differences: Sequence[float]) -> Optional[float]:
    """Two-sided p-value of a one-sample t-test of mean 0 on `differences` (a paired t-test).

    None when `no_p_reason` gives a reason: fewer than two values, or no spread.
    """
    if no_p_reason(differences):
        return None
    n = len(differences)
    mean, std = mean_std(differences)
    statistic = mean / (std / math.sqrt(n))
    from scipy.stats import t as student_t   # here: scipy.stats takes half a second to import
    return float(2.0 * student_t.sf(abs(statistic), n - 1))


def paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> Optional[dict]:
    """Statistics of a - b over the positions where both are known.

    {"mean", "std", "n", "p", "no_p", "wins", "losses", "ties", "diffs"}: wins counts a > b;
    `no_p` says why p is None; `diffs` keeps the per-seed differences for plots. None when
    no pair is complete.
    """
    if len(a) != len(b):
        raise ValueError(f"paired needs equally long sequences, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b) if x is not None and y is not None]
    if not diffs:
        return None
    mean, std = mean_std(diffs)
    return {"mean": mean, "std": std, "n": len(diffs), "p": t_test_p(diffs), "no_p": no_p_reason(diffs),
            "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs), "diffs": diffs}


def _epoch(curve: List[float], index: int) -> Optional[float]:
    return curve[index] if len(curve) > index else None


def _checkpoints(results: RunResults, name: str) -> Optional[Dict[str, Callable[[int], Optional[float]]]]:
    """Accessors of one method's (or the control's) accuracy at each checkpoint of one run."""
    if name == "control":
        entry = results.control
        if entry is None:
            return None
        first = results.best_member
    else:
        entry = results.fusion.get(name)
        if entry is None:
            return None
        first = entry.post_fusion
    return {"post_fusion": lambda _i: first,
            "finetune": lambda i: _epoch(entry.finetune, i),
            "best": lambda _i: best_by_val(entry.finetune, entry.finetune_val)}


def paired_block(results: List[RunResults], method: str = "nt",
                 baselines: Sequence[str] = BASELINES) -> Dict[str, dict]:
    """`method` minus each baseline, per checkpoint, over the runs of one sweep point.

    {baseline: {"post_fusion": stat, "finetune": [stat per epoch], "best": stat}}, each
    stat as returned by `paired` (None where no run holds both). Baselines that no run
    holds are left out; an empty dict when no run holds `method`.
    """
    out: Dict[str, dict] = {}
    mine = [_checkpoints(r, method) for r in results]
    if not any(mine):
        return out
    epochs = max((len(r.fusion[method].finetune) for r in results if method in r.fusion), default=0)
    for baseline in baselines:
        theirs = [_checkpoints(r, baseline) for r in results]
        pairs = [(m, t) for m, t in zip(mine, theirs) if m and t]
        if not pairs:
            continue

        def at(key, index=0):
            return paired([m[key](index) for m, _ in pairs], [t[key](index) for _, t in pairs])

        out[baseline] = {"post_fusion": at("post_fusion"),
                         "finetune": [at("finetune", i) for i in range(epochs)],
                         "best": at("best")}
    return out


def ordered_methods(methods: Sequence[str]) -> List[str]:
    """NT, OT and Avg first (those present), then the other method names, sorted."""
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def comparisons(methods: Sequence[str]) -> List[Tuple[str, str]]:
    """(method, baseline) pairs the report shows: every method against the control, then NT against the others."""
    ordered = ordered_methods(methods)
    pairs = [(m, "control") for m in ordered]
    if "nt" in ordered:
        pairs += [("nt", b) for b in BASELINES if b != "control" and b in ordered]
    return pairs


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
    out["paired"] = {}
    for method, baseline in comparisons(list(methods)):
        out["paired"].setdefault(method, {}).update(paired_block(results, method, (baseline,)))
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
