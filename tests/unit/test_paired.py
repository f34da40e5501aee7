"""Paired statistics (NT minus control / OT / Avg per seed) against values computed by hand.

Run: .venv/bin/python -m pytest tests/unit/test_paired.py
"""

import json
import math
import os

import pytest
import yaml

from ntdist.records.paired import format_paired, paired_table
from ntdist.records.report import write_report
from ntdist.records.results import ControlResult, MethodResult, RunResults, to_json
from ntdist.records.stats import aggregate, paired, paired_block, t_test_p


def _t3_two_sided(t: float) -> float:
    """Two-sided p of Student's t with 3 degrees of freedom, from its closed-form CDF."""
    u = abs(t) / math.sqrt(3)
    cdf = 0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi
    return 2 * (1 - cdf)


def test_paired_hand_computed():
    # differences 0.25, -0.0625, 0.25, 0.125: mean 0.140625
    a, b = [0.75, 0.5, 0.875, 0.625], [0.5, 0.5625, 0.625, 0.5]
    stat = paired(a, b)
    squares = (0.109375 ** 2 + 0.203125 ** 2 + 0.109375 ** 2 + 0.015625 ** 2)
    std = math.sqrt(squares / 3)
    assert stat["mean"] == pytest.approx(0.140625)
    assert stat["std"] == pytest.approx(std)
    assert (stat["n"], stat["wins"], stat["losses"], stat["ties"]) == (4, 3, 1, 0)
    assert stat["diffs"] == [0.25, -0.0625, 0.25, 0.125]
    t = 0.140625 / (std / 2)
    assert stat["p"] == pytest.approx(_t3_two_sided(t), rel=1e-9)
    assert 0.05 < stat["p"] < 0.2    # t = 2.05 on 3 degrees of freedom: not significant


def test_t_test_one_degree_of_freedom_is_cauchy():
    # two differences 1 and 3: mean 2, std sqrt(2), t = 2 / (sqrt(2) / sqrt(2)) = 2
    assert t_test_p([1.0, 3.0]) == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, rel=1e-9)


def test_degenerate_cases():
    assert t_test_p([0.3]) is None
    stat = paired([0.5, None, 0.7], [0.5, 0.6, None])   # only the first seed has both
    assert (stat["n"], stat["ties"], stat["mean"], stat["p"], stat["no_p"]) == (1, 1, 0.0, None, "1 seed")
    assert paired([None], [0.5]) is None
    with pytest.raises(ValueError):
        paired([0.1, 0.2], [0.1])


def test_no_spread_gives_no_p_value():
    # the same difference on every seed (as from one run copied into two folders): no test, not p < 0.001
    assert t_test_p([0.0, 0.0, 0.0]) is None
    assert t_test_p([0.1, 0.1]) is None
    assert t_test_p([0.6 - 0.5, 0.5 - 0.4]) is None          # equal up to floating-point rounding
    stat = paired([0.9236, 0.9236], [0.9306, 0.9306])
    assert (stat["p"], stat["no_p"], stat["n"], stat["wins"]) == (None, "no spread", 2, 0)
    assert format_paired(stat) == "-0.70 ± 0.00 (p = — (no spread), 0/2 ahead)"
    assert format_paired(paired([0.8], [0.7])) == "+10.00 ± 0.00 (p = — (1 seed), 1/1 ahead)"
    assert t_test_p([0.0, 1e-6]) is not None                   # one sample of a test set of 10^6 differs


def _run(seed, nt, ot, best_member, control):
    """One run: NT and OT as (post_fusion, finetune, finetune_val), control as (finetune, finetune_val)."""
    fusion = {name: MethodResult(post_fusion=v[0], finetune=v[1], finetune_val=v[2])
              for name, v in (("nt", nt), ("ot", ot))}
    return RunResults(seed=seed, members=[best_member], best_member=best_member, ensemble=0.9,
                      control=ControlResult(finetune=control[0], finetune_val=control[1]), fusion=fusion)


RUNS = [
    _run(0, (0.50, [0.70, 0.80, 0.85], [0.1, 0.3, 0.2]), (0.60, [0.70, 0.75, 0.80], [0.1, 0.2, 0.3]),
         0.75, ([0.76, 0.77, 0.78], [0.3, 0.2, 0.1])),
    _run(1, (0.40, [0.72, 0.82, 0.80], [0.1, 0.2, 0.3]), (0.50, [0.72, 0.78, 0.79], [0.3, 0.2, 0.1]),
         0.70, ([0.74, 0.80, 0.81], [0.1, 0.2, 0.3])),
]


def test_paired_block_checkpoints_by_hand():
    block = paired_block(RUNS)
    assert set(block) == {"control", "ot"}              # no run has avg: left out
    control = block["control"]
    # after fusion the control is the best member: 0.50 - 0.75, 0.40 - 0.70
    assert control["post_fusion"]["diffs"] == pytest.approx([-0.25, -0.30])
    assert control["post_fusion"]["losses"] == 2
    # epoch 3: 0.85 - 0.78, 0.80 - 0.81
    assert control["finetune"][2]["diffs"] == pytest.approx([0.07, -0.01])
    assert (control["finetune"][2]["wins"], control["finetune"][2]["losses"]) == (1, 1)
    # best by validation: NT epoch 2 (0.80) / epoch 3 (0.80); control epoch 1 (0.76) / epoch 3 (0.81)
    assert control["best"]["diffs"] == pytest.approx([0.04, -0.01])
    # OT best: epoch 3 (0.80) / epoch 1 (0.72)
    assert block["ot"]["best"]["diffs"] == pytest.approx([0.0, 0.08])
    assert block["ot"]["best"]["ties"] == 1
    assert block["ot"]["finetune"][0]["mean"] == pytest.approx(0.0)
    assert len(control["finetune"]) == 3
    assert paired_block(RUNS, method="avg") == {}


def test_aggregate_carries_the_paired_block():
    stats = aggregate(RUNS)
    assert stats["paired"]["nt"]["ot"]["post_fusion"]["diffs"] == pytest.approx([-0.10, -0.10])
    assert stats["paired"]["nt"]["ot"]["post_fusion"]["p"] is None     # no spread, mean -0.1
    assert stats["paired"]["nt"]["ot"]["post_fusion"]["no_p"] == "no spread"
    json.dumps(stats)   # sweep.json must be able to hold it


def test_table_and_formatting():
    assert format_paired(None) == "—"
    text = format_paired({"mean": 0.0123, "std": 0.0045, "n": 10, "p": 0.0123, "wins": 7})
    assert text == "+1.23 ± 0.45 (p = 0.012, 7/10 ahead)"
    assert "p < 0.001" in format_paired({"mean": -0.02, "std": 0.001, "n": 5, "p": 1e-5, "wins": 0})
    table = paired_table(aggregate(RUNS))
    lines = table.splitlines()
    assert lines[0] == "| | after fusion | after 3 epochs | best |"
    assert lines[2].startswith("| NT − control | -27.50 ± 3.54 (p = ")
    assert lines[4].startswith("| NT − OT | -10.00 ± 0.00 (p = — (no spread), 0/2 ahead) | +3.00 ± 2.83")
    short = [_run(s, (0.5, [0.6], [0.1]), (0.4, [0.5], [0.1]), 0.7, ([0.65], [0.1])) for s in (0, 1)]
    assert "| after fusion | after 1 epoch | best |" in paired_table(aggregate(short))


def test_every_method_is_compared_with_the_control():
    stats = aggregate(RUNS)
    assert set(stats["paired"]) == {"nt", "ot"} and set(stats["paired"]["ot"]) == {"control"}
    # OT after fusion minus the best member: 0.60 - 0.75, 0.50 - 0.70
    assert stats["paired"]["ot"]["control"]["post_fusion"]["diffs"] == pytest.approx([-0.15, -0.20])
    names = [line.split(" | ")[0] for line in paired_table(stats).splitlines()[2:]]
    assert names == ["| NT − control", "| OT − control", "| NT − OT"]
    no_nt = [_run(s, (0.5, [0.6], [0.1]), (0.4, [0.5], [0.1]), 0.7, ([0.65], [0.1])) for s in (0, 1)]
    for run in no_nt:
        run.fusion = {"ot": run.fusion["ot"], "avg": run.fusion["nt"]}
    names = [line.split(" | ")[0] for line in paired_table(aggregate(no_nt)).splitlines()[2:]]
    assert names == ["| OT − control", "| Avg − control"]


def test_report_shows_paired_table_and_plot(tmp_path):
    for seed, run in enumerate(RUNS):
        run_dir = tmp_path / f"seed={seed}"
        os.makedirs(run_dir)
        (run_dir / "results.json").write_text(to_json(run))
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}}))
    path = write_report([str(tmp_path / "seed=0"), str(tmp_path / "seed=1")], str(tmp_path))
    text = open(path).read()
    assert "| NT − OT | -10.00 ± 0.00" in text and "| OT − control | " in text
    assert "![paired differences per seed](paired_1.png)" in text
    assert os.path.getsize(tmp_path / "paired_1.png") > 1000
