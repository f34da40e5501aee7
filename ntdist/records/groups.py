"""Which finished runs belong together: find the run directories, read them, group them by config.

Runs whose configs are equal apart from train.seed (and the few keys of
`NON_SEMANTIC_KEYS`) form one group (a sweep point); a second run of a seed
already in its group is a duplicate, not a sample, and is left out. Groups are
labelled by the config keys that tell them apart. `records.report` writes the
report of the groups.
"""

import json
import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import List

import yaml

from ntdist.errors import UserError
from ntdist.options import format_value
from ntdist.records.results import RESULTS_FILE, RunResults, from_dict
from ntdist.records.rundir import CONFIG_FILE
from ntdist.records.stats import aggregate

# Keys that may differ within a group. train.seed is what a group varies. The others
# only say where results are written and what is logged about them (output.*: the run
# directory, trackers, the diversity measurement, which draws no random numbers the
# training sees) or how the ranks meet and how long they wait (distributed.port and the
# time-outs). Everything else, data.root included (broken and fixed images are two
# experiments), splits groups: a key that looks harmless (threads, vectorize, precision)
# may still change the numbers, and a split shows up in the Groups section.
SEED_KEY = "train.seed"
NON_SEMANTIC_KEYS = (SEED_KEY, "output.*", "distributed.port", "distributed.*timeout_s")   # fnmatch patterns


@dataclass
class Group:
    """Runs of one sweep point (equal configs apart from the seed) and their statistics."""

    config: dict
    dirs: List[str] = field(default_factory=list)         # one run per seed, in seed order
    results: List[RunResults] = field(default_factory=list)
    seeds: list = field(default_factory=list)
    duplicates: List[tuple] = field(default_factory=list)  # (left-out dir, seed, the dir kept for that seed)
    label: str = "all runs"
    settings: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def find_run_dirs(paths: List[str]) -> List[str]:
    """Every directory holding a results.json: each path itself, or its sub-directories (recursively)."""
    found: List[str] = []
    for path in paths:
        if not os.path.isdir(path):
            what = "is not a folder" if os.path.exists(path) else "does not exist"
            raise UserError(f"run directory '{path}' {what}; pass a directory written by 'ntdist run'")
        if os.path.exists(os.path.join(path, RESULTS_FILE)):
            found.append(path)
            continue
        inside = []
        for root, subdirs, files in os.walk(path):
            subdirs.sort()
            if RESULTS_FILE in files:
                inside.append(root)
                subdirs.clear()
        if not inside:
            raise UserError(f"no results.json in '{path}' or below; finish the run with 'ntdist run --resume' "
                            "or pass a directory written by 'ntdist run'")
        found += inside
    unique = {os.path.realpath(d): d for d in found}
    return list(unique.values())


def load_run(run_dir: str):
    """(flattened config, results) of one run directory; UserError naming the directory if broken."""
    path = os.path.join(run_dir, RESULTS_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no results.json in '{run_dir}'; finish the run with 'ntdist run --resume' "
                        "or leave it out") from None
    except (OSError, ValueError) as err:
        raise UserError(f"'{path}' is unreadable ({err}); rerun that run or leave '{run_dir}' out") from None
    try:
        results = from_dict(data)
    except (ValueError, TypeError) as err:
        raise UserError(f"'{path}' is not an ntdist results file ({err}); rerun that run or leave it out") from None
    if not isinstance(results, RunResults):
        raise UserError(f"'{path}' is from a run in mode sync, which has no fusion table; leave '{run_dir}' out")
    config = {}
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                config = yaml.safe_load(f) or {}
        except yaml.YAMLError:
            raise UserError(f"'{run_dir}/{CONFIG_FILE}' is not valid YAML; restore it or leave '{run_dir}' out") from None
    return _flatten(config), results


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def group_runs(run_dirs: List[str]) -> List[Group]:
    """Group runs whose configs differ in the seed (and `NON_SEMANTIC_KEYS`) alone, one run per seed.

    Of two runs of a group with the same seed the first one given is kept and the
    other is recorded in `Group.duplicates`. Groups are labelled by the keys that differ.
    """
    groups: dict = {}
    for run_dir in run_dirs:
        config, results = load_run(run_dir)
        seed = config.get(SEED_KEY, results.seed)
        config = {k: v for k, v in config.items() if not any(fnmatchcase(k, p) for p in NON_SEMANTIC_KEYS)}
        key = json.dumps(config, sort_keys=True, default=str)
        group = groups.setdefault(key, Group(config=config))
        if seed in group.seeds:
            group.duplicates.append((run_dir, seed, group.dirs[group.seeds.index(seed)]))
            continue
        group.seeds.append(seed)
        group.dirs.append(run_dir)
        group.results.append(results)
    out = list(groups.values())
    differing = differing_keys(out)
    for group in out:
        order = sorted(range(len(group.seeds)), key=lambda i: _sort_key(group.seeds[i]))
        group.seeds, group.dirs, group.results = ([items[i] for i in order]
                                                  for items in (group.seeds, group.dirs, group.results))
        group.settings = {k: format_value(group.config.get(k)) for k in differing}
        if differing:
            group.label = ", ".join(f"{k}={v}" for k, v in group.settings.items())
        group.stats = aggregate(group.results)
    out.sort(key=lambda g: [_sort_key(g.config.get(k)) for k in differing])
    return out


def differing_keys(groups: List[Group]) -> List[str]:
    """The config keys whose values are not the same in every group, sorted."""
    keys = sorted({k for g in groups for k in g.config})
    return [k for k in keys if len({json.dumps(g.config.get(k), sort_keys=True, default=str) for g in groups}) > 1]
