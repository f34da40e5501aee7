"""The schema of results.json: the one place its keys are defined.

`ntdist run` writes a `RunResults` (mode fuse) or a `SyncResults` (mode sync);
the sweep summary, the report and the tests read them back through
`read_results`, so a renamed key is renamed everywhere at once. Accuracies are
fractions in [0, 1]; `*_val` lists are the validation curves used to pick the
"best" epoch without looking at the test set.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

RESULTS_FILE = "results.json"


@dataclass(kw_only=True)
class MethodResult:
    """One fusion method: accuracy right after fusion, then after each fine-tuning epoch."""

    post_fusion: float
    post_fusion_val: Optional[float] = None
    finetune: List[float] = field(default_factory=list)
    finetune_val: List[float] = field(default_factory=list)
    fuse_seconds: Optional[float] = None
    sparsity: Optional[float] = None     # NT only: 1 - kept units / (k x member units) of the first hidden layer
    merged: Optional[Dict[str, int]] = None  # NT with fusion.dedup: units merged into a kept twin, per layer
    # (fused - best member) / (ensemble - best member), test accuracy: right after fusion ("post_fusion") and
    # after the last fine-tuning epoch ("finetune"); 1 keeps the whole gain of the ensemble, 0 none of it
    kept_gain: Optional[Dict[str, float]] = None


def kept_gain(fused: float, best_member: float, ensemble: float) -> Optional[float]:
    """The share of the ensemble's gain over its best member that `fused` keeps; None when there is no gain."""
    gain = ensemble - best_member
    return None if gain <= 0 else (fused - best_member) / gain


@dataclass(kw_only=True)
class ControlResult:
    """The fair baseline: the best member fine-tuned for the same epochs, with the same recipe (distilled from the
    members where the fused models are), as the fused models."""

    method: str = "best_member_extra_epochs"
    member: Optional[int] = None
    distilled: bool = False
    finetune: List[float] = field(default_factory=list)
    finetune_val: List[float] = field(default_factory=list)


@dataclass(kw_only=True)
class RunResults:
    """results.json of a run in mode fuse."""

    k: Optional[int] = None
    seed: Optional[int] = None
    members: List[float]                  # test accuracy of each member
    members_val: List[float] = field(default_factory=list)
    best_member: float                    # test accuracy of the member with the best validation accuracy
    best_member_index: Optional[int] = None
    ensemble: float                       # test accuracy of the members' output average
    ensemble_val: Optional[float] = None
    diversity: Optional[dict] = None      # see fusion.diversity.diversity_summary
    world: Optional[dict] = None          # who ran it: size, launcher, backend, device, ranks
    train_seconds: Optional[float] = None
    control: Optional[ControlResult] = None
    fusion: Dict[str, MethodResult] = field(default_factory=dict)
    wall_seconds: Optional[float] = None

    def add_kept_gains(self) -> None:
        """Fill each method's `kept_gain` from the test accuracies (nothing where the ensemble gains nothing)."""
        for method in self.fusion.values():
            stages = {"post_fusion": method.post_fusion, "finetune": method.finetune[-1] if method.finetune else None}
            gains = {stage: kept_gain(acc, self.best_member, self.ensemble) for stage, acc in stages.items()
                     if acc is not None}
            method.kept_gain = {stage: g for stage, g in gains.items() if g is not None} or None


@dataclass(kw_only=True)
class SyncMethodResult:
    """One sync method: replica 0's accuracy after each epoch."""

    test: List[float]
    val: List[float]
    final: Optional[float]
    merged: Optional[Dict[str, int]] = None  # nt with fusion.dedup: units merged per layer, summed over the syncs


@dataclass(kw_only=True)
class SyncResults:
    """results.json of a run in mode sync."""

    mode: str = "sync"
    k: int
    seed: int
    world: Optional[dict] = None
    sync: Dict[str, SyncMethodResult] = field(default_factory=dict)
    wall_seconds: Optional[float] = None


Results = Union[RunResults, SyncResults]
OPTIONAL_KEYS = ("diversity", "sparsity", "merged", "kept_gain")   # left out of the file when absent, not written as null


def to_dict(results: Results) -> dict:
    """The JSON form of `results` (keys in schema order)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not (k in OPTIONAL_KEYS and v is None)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(dataclasses.asdict(results))


def to_json(results: Results) -> str:
    return json.dumps(to_dict(results), indent=2) + "\n"


def from_dict(data: dict) -> Results:
    """Parse a results dict; ValueError or TypeError when it does not fit the schema."""
    if not isinstance(data, dict):
        raise ValueError("results must be a JSON object")
    data = dict(data)
    if data.get("mode") == "sync":
        data["sync"] = {m: SyncMethodResult(**entry) for m, entry in (data.get("sync") or {}).items()}
        return SyncResults(**data)
    if data.get("control") is not None:
        data["control"] = ControlResult(**data["control"])
    data["fusion"] = {m: MethodResult(**entry) for m, entry in (data.get("fusion") or {}).items()}
    return RunResults(**data)


def read_results(run_dir: str) -> Optional[Results]:
    """The results of a finished run, or None when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(run_dir, RESULTS_FILE)) as f:
            return from_dict(json.load(f))
    except (OSError, ValueError, TypeError):
        return None
