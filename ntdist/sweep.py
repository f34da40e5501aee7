"""Seed and hyper-parameter sweeps: expand a config into a grid of runs, run them, aggregate.

A config may carry two top-level keys besides the usual sections:

    seeds: [0, 1, 2, 3, 4]
    sweep:
      fusion.k: [2, 4, 8]
      fusion.schedule: [flat, iterative]

`expand` turns them into one `Point` per combination (the cartesian product in the
order the keys are written, seeds innermost). `run_sweep` runs every point that has
no results.json yet, each in its own sub-directory of output.dir, writes
sweep.json: the results of each point's seeds reduced to mean and sample
standard deviation by `records.stats.aggregate`, and prints each point's table
(the one report.md shows, as plain text).
"""

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from ntdist.config import read_yaml, yaml_load
from ntdist.options import format_value
from ntdist.errors import UserError
from ntdist.records.files import atomic_write_text
from ntdist.records.manifest import add_to_manifest
from ntdist.records.report import plain_table, text_tables
from ntdist.records.results import SyncResults, read_results
from ntdist.records.stats import aggregate, aggregate_sync

SWEEP_KEYS = ("seeds", "sweep")
SUMMARY_FILE = "sweep.json"


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its readable name, its dotted overrides and its sub-directory."""

    name: str
    overrides: List[str] = field(default_factory=list)
    subdir: str = "."


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


def _base_dir(raw: dict, overrides: Sequence[str]) -> str:
    base = (raw.get("output") or {}).get("dir", "runs/default")
    for item in overrides:
        if item.startswith("output.dir="):
            base = item.split("=", 1)[1]
    return base


@dataclass(frozen=True)
class Sweep:
    """The points of a sweep file with its command-line overrides applied."""

    points: List[Point]
    dirs: List[str]          # each point's output.dir
    base: str                # the sweep's output.dir (sweep.json goes here)
    overrides: List[str]     # what every point gets, before its own overrides


def load_sweep(config_path: str, overrides: Sequence[str]) -> Sweep:
    """Expand the sweep in `config_path`; an override `seeds=[...]` replaces the file's seed list."""
    raw = read_yaml(config_path)
    rest = []
    for item in overrides:
        if item.startswith("seeds="):
            raw["seeds"] = yaml_load(item.split("=", 1)[1])
        elif item.startswith("sweep."):
            raise UserError(f"override '{item}' cannot change a sweep; edit the 'sweep:' section of {config_path}")
        else:
            rest.append(item)
    base = _base_dir(raw, rest)
    points = expand(raw)
    return Sweep(points, [os.path.normpath(os.path.join(base, point.subdir)) for point in points], base,
                     [o for o in rest if not o.startswith("output.dir=")])


def run_sweep(config_path: str, overrides: Sequence[str], run_point: Callable[[str, List[str]], object],
              done: Optional[Callable[[str], bool]] = None, summarise: bool = True,
              show: Callable[[str], object] = print) -> Optional[dict]:
    """Run every unfinished point of the sweep in `config_path`, then write and return the summary.

    `run_point(config_path, overrides)` runs one experiment; it receives the caller's
    overrides, the point's overrides and `output.dir=<point dir>`. An override
    `seeds=[...]` replaces the file's seed list. `done(point_dir)` says whether a point
    can be skipped (default: it has a results.json); with several processes, pass one
    that gives every process the same answer. Processes other than the one writing
    files pass `summarise=False`: they only run points, and None is returned. The
    writing process passes the tables of the summary to `show`.
    """
    sweep = load_sweep(config_path, overrides)
    done = done or (lambda path: read_results(path) is not None)
    for point, point_dir in zip(sweep.points, sweep.dirs):
        if not done(point_dir):
            run_point(config_path, sweep.overrides + point.overrides + [f"output.dir={point_dir}"])
    if not summarise:
        return None
    groups: dict = {}
    for point, point_dir in zip(sweep.points, sweep.dirs):
        results = read_results(point_dir)
        if results is None:
            raise UserError(f"run '{point.name}' finished without writing {point_dir}/results.json; "
                            "check its metrics.jsonl and rerun the sweep to resume")
        swept = [o for o in point.overrides if not o.startswith("train.seed=")]   # the point's name less its seed
        groups.setdefault(",".join(swept) or "all runs", []).append(results)
    summary = {"points": len(sweep.points), "groups": {name: aggregate_sync(res) if isinstance(res[0], SyncResults)
                                                      else aggregate(res) for name, res in groups.items()}}
    os.makedirs(sweep.base, exist_ok=True)
    add_to_manifest(sweep.base, [SUMMARY_FILE])
    atomic_write_text(os.path.join(sweep.base, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    show(_sync_tables(summary) if any("sync" in g for g in summary["groups"].values()) else text_tables(sweep.dirs))
    return summary


def _sync_tables(summary: dict) -> str:
    """Each point's final test accuracy per sync method (mode sync has no report.md to mirror)."""
    rows = [["", "sync method", "final test accuracy (%)"]]
    for name, group in summary["groups"].items():
        for method, stat in group["sync"].items():
            cell = f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}" if stat else "—"
            rows.append([f"{name} ({group['runs']} seeds)", method, cell])
    return plain_table(rows)
