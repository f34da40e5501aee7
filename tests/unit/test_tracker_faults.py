"""Trackers under faults: TensorBoard holds every event before a state write; a tracker path of the wrong kind.

TensorBoard's events are written by a thread of its own; a kill -9 loses what that thread has not written yet.
The test slows the thread down (a slow disk) instead of killing, and looks at the disk whenever a state is written.

Run: .venv/bin/python -m pytest tests/unit/test_tracker_faults.py
"""

import json
import time

import pytest

import ntdist.training.resume as resume
import ntdist.stages.members as members
from helpers import make_run
from ntdist.errors import UserError
from ntdist.records.rundir import RunDir
from ntdist.records.trackers import CsvTracker, JsonlTracker, TensorBoardTracker


def _tensorboard_steps(run_dir) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / TensorBoardTracker.DIR))
    events.Reload()
    return [e.step for e in events.Scalars("member0/step/loss")] if "member0/step/loss" in \
        events.Tags()["scalars"] else []


def test_tensorboard_events_are_on_disk_whenever_a_state_is_written(tmp_path, monkeypatch):
    run = make_run(tmp_path, "model.kwargs.width=8", "train.epochs=1", "data.batch_size=16",
                   "data.train_fraction=0.2", "train.checkpoint_every_steps=8", "output.log_every_steps=2",
                   "output.trackers=[jsonl,tensorboard]")
    from tensorboard.summary.writer.record_writer import RecordWriter
    write = RecordWriter.write
    # a slow disk: TensorBoard's writer thread falls behind the records it is handed
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: (time.sleep(0.005), write(self, data))[1])
    save, seen = resume.save_state, []

    def check_then_save(*args, **kwargs):   # what a kill -9 right after this write would leave on disk
        lines = (tmp_path / JsonlTracker.FILE).read_text().splitlines()
        logged = [r["step"] for r in map(json.loads, lines) if r.get("member") == 0 and "step" in r]
        seen.append((logged, _tensorboard_steps(tmp_path)))
        save(*args, **kwargs)
    monkeypatch.setattr(resume, "save_state", check_then_save)
    members.train_member(run, 0)
    run.rundir.release()
    assert len(seen) == 3 and seen[0][0] == [2, 4, 6, 8]   # written at batches 8 and 16 and at the epoch's end
    assert all(on_disk == logged for logged, on_disk in seen)


@pytest.mark.parametrize("kind", ["tensorboard", "csv"])
def test_a_tracker_path_of_the_wrong_kind_is_one_line_on_resume(tmp_path, kind):
    rd = RunDir(str(tmp_path), trackers=["jsonl", kind])
    rd.prepare(resume=False, overwrite=False)
    rd.write_config("model: {name: mlp}\noutput: {dir: x}\n")
    rd.release()
    if kind == "tensorboard":   # a file where the events folder belongs
        for name in (tmp_path / TensorBoardTracker.DIR).iterdir():
            name.unlink()
        (tmp_path / TensorBoardTracker.DIR).rmdir()
        (tmp_path / TensorBoardTracker.DIR).write_text("not a folder")
        words = "'tensorboard' is a file, not a folder"
    else:                       # a folder where metrics.csv belongs
        (tmp_path / CsvTracker.FILE).unlink(missing_ok=True)
        (tmp_path / CsvTracker.FILE).mkdir()
        words = "'metrics.csv' is a directory, not a file"
    resumed = RunDir(str(tmp_path), trackers=["jsonl", kind])
    with pytest.raises(UserError, match=words):
        resumed.check(resume=True, overwrite=False)
