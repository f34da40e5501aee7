"""Experiment trackers: metrics.jsonl, metrics.csv with the same rows, TensorBoard event files, step-level loss.

Run: .venv/bin/python -m pytest tests/unit/test_trackers.py
"""

import json

import pytest

from ntdist.config import load_config
from ntdist.errors import UserError
from ntdist.records.trackers import read_csv
from helpers import ntdist


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trackers") / "run"
    proc = ntdist("run", "configs/quickstart.yaml", "train.epochs=2", "finetune.epochs=2", "fusion.methods=[nt]",
                  "output.trackers=[jsonl,csv,tensorboard]", "output.log_every_steps=10", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_epoch_and_step_records(run_dir):
    recs = records(run_dir)
    epochs = [r for r in recs if r["stage"] in ("member", "finetune") and "step" not in r]
    assert len(epochs) == 2 * 2 + 2 * 2   # 2 members x 2 epochs, control and nt x 2 fine-tuning epochs
    assert all(r["samples_per_s"] > 0 and r["lr"] > 0 for r in epochs)
    steps = [r for r in recs if "step" in r]
    steps_per_epoch = -(-1294 // 32)   # digits' training split in batches of 32
    member0 = [r["step"] for r in steps if r.get("member") == 0]
    assert member0 == list(range(10, 2 * steps_per_epoch + 1, 10))
    assert {r.get("method") for r in steps if r["stage"] == "finetune"} == {"nt", "best-member"}
    assert all(r["loss"] > 0 and r["lr"] == 0.05 for r in steps if r["stage"] == "member")


def test_csv_rows_match_metrics_jsonl(run_dir):
    recs, rows = records(run_dir), read_csv(str(run_dir / "metrics.csv"))
    assert len(rows) == len(recs) > 10
    for record, row in zip(recs, rows):
        assert {k for k, v in row.items() if v != ""} == set(record)
        for key, value in record.items():
            assert (row[key] == value) if isinstance(value, str) else float(row[key]) == value, (key, record)


def test_tensorboard_events_are_readable_with_tensorboards_reader(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"member0/epoch/val_accuracy", "member1/step/loss", "finetune/nt/epoch/test_accuracy",
            "fusion/nt/epoch/fuse_seconds"} <= tags
    recs = records(run_dir)
    expected = [(r["epoch"], r["test_accuracy"]) for r in recs if r["stage"] == "finetune" and r["method"] == "nt"
                and "step" not in r]
    read = [(e.step, e.value) for e in events.Scalars("finetune/nt/epoch/test_accuracy")]
    assert [s for s, _ in read] == [s for s, _ in expected]
    assert all(abs(v - w) < 1e-6 for (_, v), (_, w) in zip(read, expected))


def test_tracker_choices_are_checked():
    with pytest.raises(UserError, match="unknown tracker 'wandb'"):
        load_config(None, ["output.trackers=[jsonl,wandb]"])
    with pytest.raises(UserError, match="must include jsonl"):
        load_config(None, ["output.trackers=[csv]"])
    with pytest.raises(UserError, match="log_every_steps must be >= 0"):
        load_config(None, ["output.log_every_steps=-1"])
