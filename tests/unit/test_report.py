"""Tests for ntdist.records.report on a small fake tree of run directories (no training).

Run: .venv/bin/python -m pytest tests/unit/test_report.py
"""

import os
import random

import matplotlib
import pytest
import yaml

from helpers import ntdist
from ntdist.errors import UserError
from ntdist.records.results import ControlResult, MethodResult, RunResults, SyncMethodResult, SyncResults, \
    from_dict, to_dict, to_json
from ntdist.commands.report import report_command
from ntdist.records.paired import plot_paired
from ntdist.records.groups import find_run_dirs, group_runs
from ntdist.records.report import plot_against, plot_curves, text_tables, write_report
from ntdist.records.stats import aggregate

SEEDS = (0, 1, 2)


def _results(k: int, keep: float, seed: int, epochs: int = 4) -> RunResults:
    rng = random.Random(hash((k, keep, seed)))
    noise = lambda: rng.uniform(-0.01, 0.01)  # noqa: E731
    members = [0.90 + noise() for _ in range(k)]
    base = 0.93 + 0.005 * k
    curve = lambda start: [min(0.99, start + 0.02 * e + noise()) for e in range(1, epochs + 1)]  # noqa: E731
    fusion = {}
    for name, start in (("avg", 0.3), ("ot", 0.6), ("nt", 0.95 - keep * 0.4)):
        test = curve(start)
        fusion[name] = MethodResult(post_fusion=start + noise(), post_fusion_val=start, finetune=test,
                                    finetune_val=[t + noise() for t in test], fuse_seconds=0.01,
                                    sparsity=1 - keep if name == "nt" else None,
                                    merged={"net.1": 2 * seed, "net.3": 4} if name == "nt" and k == 4 else None)
    return RunResults(k=k, seed=seed, world={"size": 1, "launcher": "none", "ranks": []},
                      members=members, members_val=members, best_member=max(members),
                      best_member_index=members.index(max(members)), ensemble=base + noise(),
                      control=ControlResult(finetune=curve(max(members)), finetune_val=curve(max(members))),
                      diversity={"disagreement_mean": 0.05 + noise() / 10, "duplicate_fraction_mean": 0.1,
                                 "warning": None},
                      fusion=fusion, wall_seconds=1.0)


def make_tree(root) -> str:
    """root/sweep/k=K,keep=R/seed=S/{config.yaml,results.json} for two k and two keep ratios."""
    sweep = os.path.join(root, "sweep")
    for k in (2, 4):
        for keep in (0.5, 0.25):
            for seed in SEEDS:
                run = os.path.join(sweep, f"k={k},keep={keep}", f"seed={seed}")
                os.makedirs(os.path.join(run, "checkpoints"))
                config = {"model": {"name": "mlp", "kwargs": {"width": 32}}, "data": {"name": "mnist"},
                          "train": {"epochs": 2, "seed": seed}, "finetune": {"epochs": 4},
                          "fusion": {"k": k, "keep_ratio": keep, "methods": ["nt", "avg", "ot"]},
                          "output": {"dir": run}}
                with open(os.path.join(run, "config.yaml"), "w") as f:
                    yaml.safe_dump(config, f)
                with open(os.path.join(run, "results.json"), "w") as f:
                    f.write(to_json(_results(k, keep, seed)))
    return sweep


def test_find_and_group(tmp_path):
    sweep = make_tree(tmp_path)
    dirs = find_run_dirs([sweep])
    assert len(dirs) == 12
    groups = group_runs(dirs)
    assert len(groups) == 4
    assert [len(g.dirs) for g in groups] == [3, 3, 3, 3]
    assert groups[0].label == "fusion.k=2, fusion.keep_ratio=0.25"
    assert groups[0].settings == {"fusion.k": "2", "fusion.keep_ratio": "0.25"}


def test_report_renders_tables_and_plots(tmp_path):
    sweep = make_tree(tmp_path)
    path = report_command([sweep], out=str(tmp_path / "report"))
    assert path == str(tmp_path / "report" / "report.md")
    text = open(path).read()
    for row in ("| Ensemble |", "| Best member |", "| Best member + extra epochs |", "| Avg |", "| OT |", "| NT |"):
        assert row in text
    assert "±" in text and "(3 seeds)" in text
    assert "validation accuracy" in text and "Diversity over 3 seeds" in text
    assert text.count("NT dedup merged units per layer (mean over 3 runs): net.1 2, net.3 4.") == 2   # k=4 groups
    pngs = ["curves_1.png", "curves_4.png", "accuracy_vs_k.png", "accuracy_vs_sparsity.png"]
    for name in pngs:
        assert f"({name})" in text
        assert os.path.getsize(tmp_path / "report" / name) > 1000


def test_report_defaults_to_first_directory_and_single_run(tmp_path):
    sweep = make_tree(tmp_path)
    one = os.path.join(sweep, "k=2,keep=0.5", "seed=0")
    path = report_command(one)
    assert path == os.path.join(one, "report.md")
    text = open(path).read()
    assert "## all runs (1 seed)" in text
    assert not os.path.exists(os.path.join(one, "accuracy_vs_k.png"))  # one k value: no plot


def test_figures_have_titles_labels_and_legends(tmp_path):
    groups = group_runs(find_run_dirs([make_tree(tmp_path)]))
    fig = plot_curves(groups[0])
    ax = fig.axes[0]
    assert "Fine-tuning" in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"NT", "Avg", "OT", "Ensemble", "Best member"} <= set(labels)
    fig = plot_against(groups, lambda g: g.config["fusion.k"], ("fusion.k",), "k", "Accuracy against k", False)
    assert len(fig.axes) == 2  # one panel per keep ratio
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() == "k" and ax.get_legend() is not None
    fig = plot_against(groups, lambda g: g.stats["methods"]["nt"]["sparsity"]["mean"], ("fusion.keep_ratio",),
                       "sparsity", "Accuracy against sparsity", nt_only=True)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["Ensemble", "Best member", "NT (best)", "NT (after fusion)"]
    matplotlib.pyplot.close("all")
    only_k2 = [g for g in groups if g.config["fusion.k"] == 2]
    assert plot_against(only_k2, lambda g: g.config["fusion.k"], ("fusion.k",), "k", "t", False) is None


def test_missing_or_broken_results_name_the_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty"):
        report_command([str(empty)])
    with pytest.raises(UserError, match="does not exist"):
        report_command([str(tmp_path / "nope")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    with pytest.raises(UserError, match="broken"):
        report_command([str(broken)])
    (broken / "results.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not an ntdist results file"):
        write_report([str(broken)], str(tmp_path))
    with pytest.raises(UserError):
        write_report([], str(tmp_path))


def test_a_failed_plot_write_leaves_the_previous_report_intact(tmp_path, monkeypatch):
    one = os.path.join(make_tree(tmp_path), "k=2,keep=0.5", "seed=0")
    report_command(one)
    before = {name: open(os.path.join(one, name), "rb").read() for name in ("curves_1.png", "report.md")}

    def disk_full(fig, path, **kwargs):   # writes a little, then fails as a full disk or a size limit does
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    with pytest.raises(UserError, match="no space left on device while writing"):   # one line, exit 2
        report_command(one)
    assert {name: open(os.path.join(one, name), "rb").read() for name in before} == before
    assert not [n for n in os.listdir(one) if n.startswith(".tmp-")]


def test_merge_counts_round_trip_and_older_files_still_read():
    results = _results(4, 0.5, 1)
    data = to_dict(results)
    assert data["fusion"]["nt"]["merged"] == {"net.1": 2, "net.3": 4}
    assert "merged" not in data["fusion"]["avg"]              # absent, not null
    assert from_dict(data).fusion["nt"].merged == {"net.1": 2, "net.3": 4}
    del data["fusion"]["nt"]["merged"]                         # a file written before dedup existed
    assert from_dict(data).fusion["nt"].merged is None
    sync = SyncResults(k=4, seed=0, sync={"nt": SyncMethodResult(test=[0.9], val=[0.9], final=0.9, merged={"a": 3}),
                                          "avg": SyncMethodResult(test=[0.9], val=[0.9], final=0.9)})
    data = to_dict(sync)
    assert "merged" not in data["sync"]["avg"] and from_dict(data).sync["nt"].merged == {"a": 3}


def write_run(run_dir, seed: int, results: RunResults, **sections) -> str:
    """A run directory as `ntdist run` leaves it: config.yaml (`sections` merged in) and results.json."""
    config = {"model": {"name": "mlp", "kwargs": {"width": 32}}, "data": {"name": "digits", "root": "data"},
              "train": {"epochs": 2, "seed": seed}, "finetune": {"epochs": len(results.fusion["nt"].finetune)},
              "fusion": {"k": 2, "methods": sorted(results.fusion)}, "output": {"dir": str(run_dir)},
              "distributed": {"port": None, "timeout_s": 300.0}}
    for section, values in sections.items():
        config[section] = {**config[section], **values}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        f.write(to_json(results))
    return str(run_dir)


def test_the_same_seed_in_two_folders_is_one_sample(tmp_path):
    results = _results(2, 0.5, 0)
    run_a = write_run(tmp_path / "runA", 0, results)
    run_b = write_run(tmp_path / "runB", 0, results)    # the same run again, in another folder
    proc = ntdist("report", run_a, run_b, "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## all runs (1 seed)" in text and "2 seeds" not in text
    assert f"left out: `{run_b}`, seed 0 again (kept `{run_a}`)" in text
    assert "p < 0.001" not in text and "p = — (1 seed)" in text


def test_groups_differ_in_the_seed_alone(tmp_path):
    dirs = []
    for root in ("broken", "fixed"):          # two experiments: one on broken images, one on fixed ones
        for seed in (0, 1):
            dirs.append(write_run(tmp_path / root / f"seed={seed}", seed, _results(2, 0.5, seed),
                                  data={"root": f"data/{root}"}, distributed={"port": 29500 + seed}))
    dirs.append(write_run(tmp_path / "lr" / "seed=0", 0, _results(2, 0.5, 0), train={"lr": 0.1}))
    dirs.append(write_run(tmp_path / "again", 1, _results(2, 0.5, 1), data={"root": "data/fixed"}))
    groups = group_runs(dirs)
    assert [(g.label, g.dirs) for g in groups] == [
        ("data.root=data, train.lr=0.1", dirs[4:5]), ("data.root=data/broken, train.lr=null", dirs[0:2]),
        ("data.root=data/fixed, train.lr=null", dirs[2:4])]
    assert [g.seeds for g in groups] == [[0], [0, 1], [0, 1]]
    assert groups[2].duplicates == [(dirs[-1], 1, dirs[3])]
    text = open(write_report(dirs, str(tmp_path / "report"))).read()
    section = text[text.index("## Groups"):text.index("## data.root=data, ")]
    assert "Keys that differ between groups: `data.root`, `train.lr`." in section
    assert f"- data.root=data/broken, train.lr=null (2 seeds: 0, 1): `{dirs[0]}`, `{dirs[1]}`" in section
    assert f"  - left out: `{dirs[-1]}`, seed 1 again (kept `{dirs[3]}`)" in section
    assert "5 runs in 3 group(s) (1 more left out as repeats of a seed)" in text


def test_columns_follow_the_fine_tuning_epochs(tmp_path):
    two = [write_run(tmp_path / "two" / f"seed={s}", s, _results(2, 0.5, s, epochs=2)) for s in (0, 1)]
    text = open(write_report(two, str(tmp_path / "two"))).read()
    assert text.count("| | after fusion | after 2 epochs | best |") == 2          # the accuracy and paired tables
    nt_row = next(line for line in text.splitlines() if line.startswith("| NT |"))
    assert "—" not in nt_row
    five = [write_run(tmp_path / "five" / f"seed={s}", s, _results(2, 0.5, s, epochs=5)) for s in (0, 1)]
    text = open(write_report(five, str(tmp_path / "five"))).read()
    assert text.count("| | after fusion | after 3 epochs | after 5 epochs | best |") == 2
    assert "\nall runs (2 seeds)" in "\n" + text_tables(five)


def test_paired_plot_gives_each_panel_its_own_y_axis(tmp_path):
    runs = []
    for seed in range(4):   # up to 60 points apart right after fusion, within 2 points after fine-tuning
        run = _results(2, 0.5, seed, epochs=2)
        for i, entry in enumerate(run.fusion.values()):
            entry.finetune = [a + 0.01 * ((seed + i) % 3 - 1) for a in run.control.finetune]
            entry.finetune_val = list(run.control.finetune_val)
        runs.append(run)
    fig = plot_paired(aggregate(runs), "test")
    after_fusion, after_two, best = (ax.get_ylim() for ax in fig.axes)
    assert after_fusion[1] - after_fusion[0] > 60
    assert after_two[1] - after_two[0] < 10 and best[1] - best[0] < 10
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["NT − control", "OT − control", "Avg − control", "NT − OT", "NT − Avg"]
    fig.savefig(tmp_path / "paired.png")
    matplotlib.pyplot.close(fig)


def test_kept_gain_is_the_share_of_the_ensembles_gain():
    from ntdist.records.results import ControlResult, MethodResult, RunResults, from_dict, kept_gain, to_dict
    assert kept_gain(0.62, 0.60, 0.64) == pytest.approx(0.5)
    assert kept_gain(0.50, 0.60, 0.60) is None          # no gain to keep
    results = RunResults(members=[0.6, 0.58], best_member=0.60, ensemble=0.64, control=ControlResult(),
                         fusion={"nt": MethodResult(post_fusion=0.59, finetune=[0.63, 0.64]),
                                 "avg": MethodResult(post_fusion=0.2)})
    results.add_kept_gains()
    assert results.fusion["nt"].kept_gain == pytest.approx({"post_fusion": -0.25, "finetune": 1.0})
    assert results.fusion["avg"].kept_gain == pytest.approx({"post_fusion": -10.0})
    assert from_dict(to_dict(results)).fusion["nt"].kept_gain == results.fusion["nt"].kept_gain


def test_every_file_the_report_writes_is_known_to_the_run_directory(tmp_path):
    """`--overwrite` refuses to replace report files ntdist did not write: it must recognise every one by name."""
    from ntdist.records.rundir import REPORT_NAMES
    dirs = [write_run(tmp_path / f"k={k}" / f"seed={s}", s, _results(k, 0.5, s), fusion={"k": k})
            for k in (2, 3) for s in (0, 1)]
    out = tmp_path / "report"
    write_report(dirs, str(out))
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert any(name.startswith("paired_") for name in written) and len(written) > 3
    assert [name for name in written if not REPORT_NAMES.fullmatch(name)] == []
