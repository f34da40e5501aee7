"""Seed and hyper-parameter sweeps: expand a config into a grid of runs, run them, aggregate.

A config may carry two top-level keys besides the usual sections:

    seeds: [0, 1, 2, 3, 4]
    sweep:
      fusion.k: [2, 4, 8]
      fusion.schedule: [flat, iterative]

`expand` turns them into one `Point` per combination (the cartesian product in the
order the keys are written, seeds innermost). `run_sweep` runs every point that has
no results.json yet, each in its own sub-directory of output.dir, and `aggregate`
reduces the results of several seeds to mean and sample standard deviation.
"""

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import yaml

from ntdist.checkpoint import atomic_write_text
from ntdist.config import read_yaml
from ntdist.errors import UserError

SWEEP_KEYS = ("seeds", "sweep")
SUMMARY_FILE = "sweep.json"


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its readable name, its dotted overrides and its sub-directory."""

    name: str
    overrides: List[str] = field(default_factory=list)
    subdir: str = "."


def format_value(value) -> str:
    """Write a value the way a dotted override (parsed as YAML) reads it back."""
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def sanitise(name: str) -> str:
    """Make one path component safe: keep letters, digits and . , = + -; replace the rest by '_'."""
    safe = re.sub(r"[^A-Za-z0-9.,=+-]+", "_", name).strip("._") or "run"
    return safe[:200]


def _check_spec(raw: dict) -> Tuple[dict, Optional[list]]:
    if not isinstance(raw, dict):
        raise UserError(f"a sweep config must be a mapping of keys, got {type(raw).__name__}")
    sweep = raw.get("sweep") or {}
    seeds = raw.get("seeds")
    if not isinstance(sweep, dict):
        raise UserError("'sweep' must map dotted keys to lists of values, e.g. sweep: {fusion.k: [2, 4]}")
    for key, values in sweep.items():
        if not isinstance(key, str) or not key.strip() or " " in key:
            raise UserError(f"sweep key {key!r} is not a dotted config key; write e.g. 'fusion.k: [2, 4]'")
        if key in SWEEP_KEYS or key == "output.dir" or key.startswith("output.dir."):
            raise UserError(f"'{key}' cannot be swept; each point gets its own output.dir under the sweep's output.dir")
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep key '{key}' needs a non-empty list of values, e.g. '{key}: [a, b]'; got {values!r}")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            raise UserError(f"'seeds' must be a non-empty list of integers, e.g. seeds: [0, 1, 2]; got {seeds!r}")
        bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool)]
        if bad:
            raise UserError(f"'seeds' must hold integers only; {bad[0]!r} is not one")
        if len(set(seeds)) != len(seeds):
            raise UserError(f"'seeds' lists a seed twice ({seeds}); give each seed once")
        if "train.seed" in sweep:
            raise UserError("sweep both 'seeds' and 'train.seed' at once; keep only 'seeds'")
    return sweep, seeds


def expand(raw: dict) -> List[Point]:
    """All points of the grid described by `raw` (a parsed YAML config) in run order."""
    sweep, seeds = _check_spec(raw)
    combos = list(itertools.product(*[[(k, v) for v in vals] for k, vals in sweep.items()]))
    points = []
    for combo in combos:
        overrides = [f"{k}={format_value(v)}" for k, v in combo]
        head = ",".join(overrides)
        for seed in (seeds if seeds is not None else [None]):
            extra = [] if seed is None else [f"train.seed={seed}"]
            parts = [p for p in (head, None if seed is None else f"seed={seed}") if p]
            name = "/".join(parts) or "run"
            subdir = os.path.join(*[sanitise(p) for p in parts]) if parts else "."
            points.append(Point(name=name, overrides=overrides + extra, subdir=subdir))
    subdirs = [p.subdir for p in points]
    if len(set(subdirs)) != len(subdirs):
        raise UserError("two sweep points map to the same directory after removing odd characters; "
                        "use sweep values that differ in letters or digits")
    return points


def read_results(run_dir: str) -> Optional[dict]:
    """The results.json of a finished run, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _base_dir(raw: dict, overrides: Sequence[str]) -> str:
    base = (raw.get("output") or {}).get("dir", "runs/default")
    for item in overrides:
        if item.startswith("output.dir="):
            base = item.split("=", 1)[1]
    return base


def run_sweep(config_path: str, overrides: Sequence[str], run_point: Callable[[str, List[str]], object],
              done: Optional[Callable[[str], bool]] = None, summarise: bool = True) -> Optional[dict]:
    """Run every unfinished point of the sweep in `config_path`, then write and return the summary.

    `run_point(config_path, overrides)` runs one experiment; it receives the caller's
    overrides, the point's overrides and `output.dir=<point dir>`. An override
    `seeds=[...]` replaces the file's seed list. `done(point_dir)` says whether a point
    can be skipped (default: it has a results.json); with several processes, pass one
    that gives every process the same answer. Processes other than the one writing
    files pass `summarise=False`: they only run points, and None is returned.
    """
    raw = read_yaml(config_path)
    rest = []
    for item in overrides:
        if item.startswith("seeds="):
            raw["seeds"] = yaml.safe_load(item.split("=", 1)[1])
        elif item.startswith("sweep."):
            raise UserError(f"override '{item}' cannot change a sweep; edit the 'sweep:' section of {config_path}")
        else:
            rest.append(item)
    base = _base_dir(raw, rest)
    rest = [o for o in rest if not o.startswith("output.dir=")]
    points = expand(raw)
    done = done or (lambda path: read_results(path) is not None)
    dirs = [os.path.normpath(os.path.join(base, point.subdir)) for point in points]
    for point, point_dir in zip(points, dirs):
        if not done(point_dir):
            run_point(config_path, rest + point.overrides + [f"output.dir={point_dir}"])
    if not summarise:
        return None
    groups: dict = {}
    for point, point_dir in zip(points, dirs):
        results = read_results(point_dir)
        if results is None:
            raise UserError(f"run '{point.name}' finished without writing {point_dir}/results.json; "
                            "check its metrics.jsonl and rerun the sweep to resume")
        groups.setdefault(point.name.rsplit("/seed=", 1)[0], []).append(results)
    summary = {"points": len(points), "groups": {name: aggregate(res) for name, res in groups.items()}}
    os.makedirs(base, exist_ok=True)
    atomic_write_text(os.path.join(base, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    return summary


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


def _curve_block(entries: List[dict], first: Optional[str]) -> dict:
    curves = [e.get("finetune") or [] for e in entries]
    out = {"finetune": _curve_stats(curves),
           "best": _stat([best_by_val(e.get("finetune") or [], e.get("finetune_val")) for e in entries])}
    if first:
        out[first] = _stat([e.get(first) for e in entries])
    return out


def aggregate(results: List[dict]) -> dict:
    """Mean and std over seeds of every accuracy in a list of results.json dicts.

    Each statistic is {"mean", "std", "n"} (None when no run reports it); a curve is a
    list of them, one per fine-tuning epoch.
    """
    if not results:
        raise UserError("nothing to aggregate: no finished runs; run 'ntdist run' first")
    members = [sum(r["members"]) / len(r["members"]) for r in results if r.get("members")]
    out = {"runs": len(results), "members_mean": _stat(members),
           "best_member": _stat([r.get("best_member") for r in results]),
           "ensemble": _stat([r.get("ensemble") for r in results])}
    controls = [r["control"] for r in results if isinstance(r.get("control"), dict)]
    out["control"] = _curve_block(controls, None) if controls else None
    methods: dict = {}
    for r in results:
        for name, entry in (r.get("fusion") or {}).items():
            methods.setdefault(name, []).append(entry)
    out["methods"] = {}
    for name, entries in methods.items():
        block = _curve_block(entries, "post_fusion")
        block["sparsity"] = _stat([e.get("sparsity") for e in entries])
        out["methods"][name] = block
    return out
