"""The kept gain of results.json in report.md: a row per method, a column per stage, mean ± std over seeds.

Run: .venv/bin/python -m pytest tests/unit/test_report_kept_gain.py
"""

import os
import statistics

import yaml

from ntdist.records.report import write_report
from ntdist.records.results import ControlResult, MethodResult, RunResults, to_json
from ntdist.records.stats import aggregate

# seed: (best member, ensemble, NT after fusion, NT after fine-tuning, Avg after fusion, Avg after fine-tuning)
RUNS = {0: (0.80, 0.90, 0.85, 0.88, 0.40, 0.79),
        1: (0.70, 0.80, 0.72, 0.81, 0.50, 0.70),
        2: (0.75, 0.75, 0.60, 0.76, 0.30, 0.74)}      # the ensemble gains nothing: no kept gain on this seed


def _results(seed: int) -> RunResults:
    best, ensemble, nt0, nt1, avg0, avg1 = RUNS[seed]
    results = RunResults(k=2, seed=seed, members=[best, best - 0.05], best_member=best, ensemble=ensemble,
                         control=ControlResult(finetune=[best + 0.01], finetune_val=[best]),
                         fusion={"nt": MethodResult(post_fusion=nt0, finetune=[nt1], finetune_val=[nt1]),
                                 "avg": MethodResult(post_fusion=avg0, finetune=[avg1], finetune_val=[avg1])})
    results.add_kept_gains()
    return results


def _tree(root) -> list:
    dirs = []
    for seed in RUNS:
        run = os.path.join(root, f"seed={seed}")
        os.makedirs(run)
        with open(os.path.join(run, "config.yaml"), "w") as f:
            yaml.safe_dump({"train": {"seed": seed}, "finetune": {"epochs": 1}, "output": {"dir": run}}, f)
        with open(os.path.join(run, "results.json"), "w") as f:
            f.write(to_json(_results(seed)))
        dirs.append(run)
    return dirs


def _by_hand(column: int) -> str:
    gains = [(RUNS[s][column] - RUNS[s][0]) / (RUNS[s][1] - RUNS[s][0]) for s in (0, 1)]
    return f"{statistics.mean(gains):+.2f} ± {statistics.stdev(gains):.2f} (2 of 3 seeds)"


def test_report_has_a_kept_gain_row_per_method_and_a_column_per_stage(tmp_path):
    path = write_report(_tree(str(tmp_path / "runs")), str(tmp_path / "report"))
    with open(path) as f:
        lines = f.read().splitlines()
    head = lines.index("| kept gain | after fusion | after fine-tuning (last epoch) |")
    assert lines[head + 2] == f"| NT | {_by_hand(2)} | {_by_hand(3)} |"
    assert lines[head + 3] == f"| Avg | {_by_hand(4)} | {_by_hand(5)} |"
    assert lines[head + 5].startswith("Kept gain: (fused − best member) / (ensemble − best member)")


def test_aggregate_pools_the_recorded_gains_and_leaves_out_seeds_without_one():
    stats = aggregate([_results(seed) for seed in RUNS])
    nt = stats["methods"]["nt"]["kept_gain"]
    assert list(nt) == ["post_fusion", "finetune"] and nt["post_fusion"]["n"] == 2
    assert abs(nt["post_fusion"]["mean"] - (0.5 + 0.2) / 2) < 1e-9
    assert abs(nt["finetune"]["mean"] - (0.8 + 1.1) / 2) < 1e-9
    old = _results(0)
    old.fusion["nt"].kept_gain = None                  # results.json written before kept_gain existed
    assert aggregate([old])["methods"]["nt"]["kept_gain"] == {}


def _no_gain(seed: int) -> RunResults:
    """A run whose ensemble equals its best member (the same member given twice)."""
    results = RunResults(k=2, seed=seed, members=[0.9, 0.9], best_member=0.9, ensemble=0.9,
                         control=ControlResult(finetune=[0.92], finetune_val=[0.9]),
                         fusion={"nt": MethodResult(post_fusion=0.9, finetune=[0.93], finetune_val=[0.9])})
    results.add_kept_gains()
    return results


def test_report_says_n_a_when_no_seed_has_a_gain_to_keep(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": 0}, "finetune": {"epochs": 1}}))
    (run / "results.json").write_text(to_json(_no_gain(0)))
    with open(write_report([str(run)], str(tmp_path / "report"))) as f:
        text = f.read()
    assert "Kept gain: n/a, on every seed the ensemble is not ahead of its best member" in text
    assert "| kept gain |" not in text


def test_summary_table_says_n_a_when_the_ensemble_gains_nothing():
    from ntdist.pipeline import summary_table
    row = next(line for line in summary_table(_no_gain(0), "run").splitlines() if line.startswith("nt "))
    assert row.split()[-1] == "n/a"
