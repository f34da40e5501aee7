"""A full disk: the write that fails says so in one line naming the file (exit 2), and nothing is corrupted.

The disk is "filled" by patching the write to raise OSError(ENOSPC), as a full file system does.
Run: .venv/bin/python -m pytest tests/unit/test_full_disk.py
"""

import errno
import json
import os

import pytest

import ntdist.records.checkpoint as checkpoint
import ntdist.records.files as files
import ntdist.records.trackers as trackers
from helpers import ROOT
from ntdist.cli import main
from ntdist.errors import UserError
from ntdist.records.results import read_results

QUICK = [os.path.join(ROOT, "configs", "quickstart.yaml"), "model.kwargs.width=8", "train.epochs=1",
         "finetune.epochs=1", "finetune.control=false", "fusion.methods=[avg]", "data.train_fraction=0.3"]


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_an_atomic_write_on_a_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    files.atomic_write_text(str(path), "old")
    monkeypatch.setattr(files.os, "fsync", _full)
    with pytest.raises(UserError, match=f"no space left on device while writing '{path}' \\(left as it was\\)"):
        files.atomic_write_text(str(path), "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]   # no temporary left


def test_an_append_to_metrics_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    tracker = trackers.JsonlTracker(str(tmp_path))
    tracker.log({"stage": "member", "epoch": 1})

    class FullFile:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        write = flush = _full
    monkeypatch.setattr(trackers, "open", FullFile, raising=False)
    with pytest.raises(UserError, match="no space left on device while writing '.*metrics.jsonl'"):
        tracker.log({"stage": "member", "epoch": 2})


def test_a_run_that_fills_the_disk_exits_2_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:   # the first checkpoint ntdist writes (member 0's state) fills the disk
        patch.setattr(checkpoint, "save_file", _full)
        assert main(["run", *QUICK, f"output.dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ntdist: error: no space left on device while writing '") and \
        "member0.state.safetensors' (left as it was)" in err[0], err
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")]
    assert main(["run", *QUICK, f"output.dir={out}", "--resume"]) == 0   # what was written is intact
    assert set(read_results(str(out)).fusion) == {"avg"}
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
