"""Tests for ntdist.sweep and records.stats: grid expansion, spec validation, resumable runs, aggregation.

Run: .venv/bin/python -m pytest tests/unit/test_sweep.py
"""

import math
import os

import pytest
import yaml

from ntdist.errors import UserError
from ntdist.options import format_value
from ntdist.records.results import ControlResult, MethodResult, RunResults, SyncMethodResult, SyncResults, to_json
from ntdist.records.stats import aggregate, best_by_val, mean_std
from ntdist.sweep import expand, run_sweep


def test_expand_order_names_and_seeds_innermost():
    raw = {"seeds": [0, 1], "sweep": {"fusion.k": [2, 4], "fusion.schedule": ["flat", "iterative"]}}
    points = expand(raw)
    assert len(points) == 8
    assert [p.name for p in points[:3]] == [
        "fusion.k=2,fusion.schedule=flat/seed=0",
        "fusion.k=2,fusion.schedule=flat/seed=1",
        "fusion.k=2,fusion.schedule=iterative/seed=0",
    ]
    assert points[-1].name == "fusion.k=4,fusion.schedule=iterative/seed=1"
    assert points[0].overrides == ["fusion.k=2", "fusion.schedule=flat", "train.seed=0"]
    assert points[0].subdir == os.path.join("fusion.k=2,fusion.schedule=flat", "seed=0")


def test_expand_without_sweep_or_seeds():
    assert [p.name for p in expand({"seeds": [3, 5]})] == ["seed=3", "seed=5"]
    assert expand({"seeds": [3]})[0].overrides == ["train.seed=3"]
    only = expand({"model": {"name": "mlp"}})
    assert len(only) == 1 and only[0].overrides == [] and only[0].subdir == "."
    assert [p.overrides for p in expand({"sweep": {"model.kwargs.width": [16, 32]}})] == [
        ["model.kwargs.width=16"], ["model.kwargs.width=32"]]


def test_subdir_names_are_safe():
    points = expand({"sweep": {"fusion.methods": [["nt", "avg"]], "data.name": ["a b/c"]}})
    assert points[0].overrides == ["fusion.methods=[nt,avg]", "data.name=a b/c"]
    assert "/" not in points[0].subdir and " " not in points[0].subdir
    assert format_value(True) == "true" and format_value(None) == "null" and format_value(0.5) == "0.5"


@pytest.mark.parametrize("raw, words", [
    ({"sweep": [1, 2]}, "must map"),
    ({"sweep": {"fusion.k": []}}, "non-empty list"),
    ({"sweep": {"fusion.k": 4}}, "non-empty list"),
    ({"sweep": {"output.dir": ["a", "b"]}}, "cannot be swept"),
    ({"seeds": []}, "non-empty list"),
    ({"seeds": 3}, "non-empty list"),
    ({"seeds": [0, "one"]}, "integers"),
    ({"seeds": [0, 0]}, "twice"),
    ({"seeds": [0], "sweep": {"train.seed": [1, 2]}}, "train.seed"),
])
def test_bad_specs_raise_user_errors(raw, words):
    with pytest.raises(UserError, match=words):
        expand(raw)


def _fake_results(seed, acc=0.9):
    return RunResults(k=2, seed=seed, members=[acc, acc], best_member=acc, ensemble=acc,
                      fusion={"nt": MethodResult(post_fusion=acc, finetune=[acc], finetune_val=[acc])})


def _write_point(overrides, results_of=_fake_results):
    """What `ntdist run` leaves in a point's directory: config.yaml with the point's keys, results.json."""
    values = dict(o.split("=", 1) for o in overrides)
    out, seed = values["output.dir"], int(values["train.seed"])
    os.makedirs(out, exist_ok=True)
    config = {"fusion": {"k": int(values.get("fusion.k", 2))}, "train": {"seed": seed}, "output": {"dir": out}}
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    with open(os.path.join(out, "results.json"), "w") as f:
        f.write(to_json(results_of(seed)))


def test_run_sweep_skips_finished_points(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"seeds": [0, 1], "sweep": {"fusion.k": [2, 4]},
                                   "output": {"dir": str(tmp_path / "out")}}))
    calls = []

    def run_point(path, overrides):
        calls.append(overrides)
        _write_point(overrides)

    summary = run_sweep(str(cfg), ["train.epochs=1"], run_point)
    assert len(calls) == 4
    assert calls[0][:3] == ["train.epochs=1", "fusion.k=2", "train.seed=0"]
    assert calls[0][-1] == "output.dir=" + os.path.join(str(tmp_path / "out"), "fusion.k=2", "seed=0")
    assert set(summary["groups"]) == {"fusion.k=2", "fusion.k=4"}
    assert summary["groups"]["fusion.k=2"]["runs"] == 2
    assert (tmp_path / "out" / "sweep.json").exists()

    os.remove(tmp_path / "out" / "fusion.k=4" / "seed=1" / "results.json")
    calls.clear()
    run_sweep(str(cfg), ["train.epochs=1"], run_point)
    assert len(calls) == 1 and calls[0][-2] == "train.seed=1"


def test_run_sweep_prints_the_report_table(tmp_path, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"seeds": [0, 1], "sweep": {"fusion.k": [2, 4]},
                                   "output": {"dir": str(tmp_path / "out")}}))

    def results_of(seed):
        acc = 0.9 + 0.01 * seed
        return RunResults(k=2, seed=seed, members=[acc, acc - 0.1], best_member=acc, ensemble=acc + 0.02,
                          control=ControlResult(finetune=[acc, acc + 0.01], finetune_val=[0.5, 0.6]),
                          fusion={"nt": MethodResult(post_fusion=acc - 0.05, finetune=[acc, acc + 0.02],
                                                     finetune_val=[0.5, 0.6])})

    run_sweep(str(cfg), [], lambda path, overrides: _write_point(overrides, results_of))
    out = capsys.readouterr().out
    head = "fusion.k=2 (2 seeds), test accuracy (%), mean ± std over seeds"
    assert head in out and "fusion.k=4 (2 seeds)" in out
    table = out[out.index(head):].splitlines()[1:7]
    assert table[0].split() == ["after", "fusion", "after", "2", "epochs", "best"]
    assert table[-1].split() == ["NT", "85.50", "±", "0.71", "92.50", "±", "0.71", "92.50", "±", "0.71"]
    assert table[-2].split()[-3:] == ["91.50", "±", "0.71"]          # best member + extra epochs, best


def test_run_sweep_prints_sync_finals(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"seeds": [0, 1], "output": {"dir": str(tmp_path / "out")}}))

    def sync_results(seed):
        return SyncResults(k=2, seed=seed, sync={"nt": SyncMethodResult(test=[0.5], val=[0.5], final=0.5 + 0.1 * seed)})

    shown = []
    run_sweep(str(cfg), [], lambda path, overrides: _write_point(overrides, sync_results), show=shown.append)
    assert shown[0].splitlines()[1].split() == ["all", "runs", "(2", "seeds)", "nt", "55.00", "±", "7.07"]


def test_run_sweep_reports_point_without_results(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"seeds": [0]}))
    with pytest.raises(UserError, match="results.json"):
        run_sweep(str(cfg), [f"output.dir={tmp_path}"], lambda path, overrides: None)


def test_mean_std_hand_computed():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert math.isclose(std, math.sqrt(5.0 / 3.0))
    with pytest.raises(ValueError):
        mean_std([])


def test_best_uses_validation_epoch():
    assert best_by_val([0.5, 0.9, 0.7], [0.6, 0.5, 0.8]) == 0.7
    assert best_by_val([0.5, 0.9, 0.7], [0.8, 0.6, 0.8]) == 0.5  # tie -> earliest
    assert best_by_val([0.5, 0.9, 0.7], None) == 0.7
    assert best_by_val([], []) is None


def test_aggregate_hand_computed():
    a = RunResults(members=[0.8, 0.9], best_member=0.9, ensemble=0.92,
                   control=ControlResult(finetune=[0.90, 0.91], finetune_val=[0.89, 0.88]),
                   fusion={"nt": MethodResult(post_fusion=0.6, finetune=[0.8, 0.85, 0.83],
                                              finetune_val=[0.7, 0.75, 0.9], sparsity=0.5)})
    b = RunResults(members=[0.7, 0.9], best_member=0.9, ensemble=0.94,
                   control=ControlResult(finetune=[0.92, 0.93], finetune_val=[0.90, 0.95]),
                   fusion={"nt": MethodResult(post_fusion=0.4, finetune=[0.8, 0.87], finetune_val=[0.9, 0.7],
                                              sparsity=0.5)})
    agg = aggregate([a, b])
    assert agg["runs"] == 2
    assert math.isclose(agg["members_mean"]["mean"], 0.825)
    assert math.isclose(agg["members_mean"]["std"], math.sqrt(2 * 0.025 ** 2))
    assert agg["best_member"]["std"] == 0.0
    assert math.isclose(agg["ensemble"]["mean"], 0.93)
    nt = agg["methods"]["nt"]
    assert math.isclose(nt["post_fusion"]["mean"], 0.5)
    assert math.isclose(nt["post_fusion"]["std"], math.sqrt(0.02))
    assert [s["n"] for s in nt["finetune"]] == [2, 2, 1]
    assert math.isclose(nt["finetune"][1]["mean"], 0.86)
    # best: run a -> epoch 2 (val 0.9) -> 0.83; run b -> epoch 0 (val 0.9) -> 0.8
    assert math.isclose(nt["best"]["mean"], 0.815)
    assert math.isclose(agg["control"]["best"]["mean"], (0.90 + 0.93) / 2)
    assert nt["sparsity"]["mean"] == 0.5


def test_aggregate_without_optional_parts():
    agg = aggregate([RunResults(members=[0.5], best_member=0.5, ensemble=0.5)])
    assert agg["control"] is None and agg["methods"] == {}
    with pytest.raises(UserError):
        aggregate([])


def test_run_sweep_with_custom_done_and_no_summary(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"seeds": [0, 1, 2]}))
    calls = []
    result = run_sweep(str(cfg), [f"output.dir={tmp_path}", "seeds=[0,1,2]"], lambda p, o: calls.append(o),
                       done=lambda path: path.endswith("seed=1"), summarise=False)
    assert result is None
    assert [o[0] for o in calls] == ["train.seed=0", "train.seed=2"]
    assert not (tmp_path / "sweep.json").exists()


def test_a_seed_list_alone_is_one_group(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"seeds": [0, 1, 2], "output": {"dir": str(tmp_path / "out")}}))
    summary = run_sweep(str(cfg), [], lambda path, overrides: _write_point(overrides), show=lambda text: None)
    assert list(summary["groups"]) == ["all runs"] and summary["groups"]["all runs"]["runs"] == 3
    cfg.write_text(yaml.safe_dump({"sweep": {"data.split_seed": [1, 2]}, "output": {"dir": str(tmp_path / "grid")}}))
    summary = run_sweep(str(cfg), [], lambda path, overrides: _write_point(overrides + ["train.seed=0"]),
                        show=lambda text: None)
    assert list(summary["groups"]) == ["data.split_seed=1", "data.split_seed=2"]
