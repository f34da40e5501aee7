"""No path loses a user's files: the manifest, --overwrite, --resume provenance, the lock, torn metrics lines.

Every data-loss test puts foreign files into the target directory and compares their hashes before and after.
Run: .venv/bin/python -m pytest tests/unit/test_rundir_safety.py
"""

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import yaml

from helpers import ROOT
from ntdist.cli import main
from ntdist.errors import UserError
from ntdist.records.files import atomic_write_text
from ntdist.records.lock import RunLock
from ntdist.records.manifest import LOCK_FILE, MANIFEST_FILE, add_to_manifest, remove_written
from ntdist.records.rundir import METRICS_FILE, RunDir, checkpoint_names


def hashes(root):
    """sha256 of every file below `root`, by relative path (ntdist's bookkeeping files left out)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name not in (MANIFEST_FILE, LOCK_FILE):
                path = os.path.join(folder, name)
                out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def foreign_files(run_dir):
    """A user's files that ntdist must never remove: a checkpoint among ntdist's and a note."""
    os.makedirs(run_dir / "checkpoints", exist_ok=True)
    (run_dir / "checkpoints" / "my_pretrained.safetensors").write_bytes(b"user weights " * 100)
    (run_dir / "notes.txt").write_text("my notes\n")
    return {k: v for k, v in hashes(run_dir).items() if k in ("checkpoints/my_pretrained.safetensors", "notes.txt")}


def fresh_run(run_dir):
    """A run directory as an interrupted ntdist run leaves it (lock released)."""
    rd = RunDir(str(run_dir))
    rd.check(resume=False, overwrite=False)
    rd.prepare(resume=False, overwrite=False, members=2)
    rd.write_config("model: {name: mlp}\noutput: {dir: x}\n")
    rd.log({"stage": "member", "member": 0, "epoch": 1})
    (run_dir / "checkpoints" / "member0.safetensors").write_bytes(b"ntdist weights")
    rd.release()
    return rd


def test_the_checkpoint_names_on_disk():
    assert checkpoint_names(2, ["best-member", "nt"]) == [
        "member0", "member0.state", "member1", "member1.state",
        "finetuned_best-member", "finetune_best-member.state", "finetuned_nt", "finetune_nt.state"]
    rd = RunDir("run")
    assert rd.member_checkpoint(1) == os.path.join("run", "checkpoints", "member1.safetensors")
    assert rd.member_state(1) == os.path.join("run", "checkpoints", "member1.state.safetensors")
    assert rd.finetuned_checkpoint("nt") == os.path.join("run", "checkpoints", "finetuned_nt.safetensors")
    assert rd.finetune_state("nt") == os.path.join("run", "checkpoints", "finetune_nt.state.safetensors")


def test_overwrite_removes_only_what_ntdist_wrote_and_lists_the_rest(tmp_path, capsys):
    fresh_run(tmp_path)
    mine = foreign_files(tmp_path)
    rd = RunDir(str(tmp_path))
    rd.check(resume=False, overwrite=True)
    rd.prepare(resume=False, overwrite=True, members=2)
    rd.release()
    assert hashes(tmp_path) == mine               # ntdist's files are gone, the user's are untouched
    err = capsys.readouterr().err
    assert "kept 2 file(s)" in err and "my_pretrained.safetensors" in err and "notes.txt" in err


def test_a_crafted_manifest_cannot_reach_outside_the_directory(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    atomic_write_text(str(run_dir / MANIFEST_FILE), "../precious.txt\n" + str(outside) + "\n")
    assert remove_written(str(run_dir)) == []
    assert outside.read_text() == "keep"


def test_overwrite_clears_temporaries_of_listed_files_only(tmp_path):
    add_to_manifest(str(tmp_path), ["results.json"])
    (tmp_path / ".tmp-abcd1234results.json").write_text("torn")
    (tmp_path / ".tmp-abcd1234mine.txt").write_text("not ntdist's")
    assert remove_written(str(tmp_path)) == [".tmp-abcd1234mine.txt"]


@pytest.mark.parametrize("setup, flags, words", [
    ("foreign", dict(resume=True, overwrite=False), "was not written by ntdist"),
    ("no config", dict(resume=True, overwrite=False), "has no config.yaml"),
    ("foreign", dict(resume=True, overwrite=True), "contradict"),
    ("foreign", dict(resume=False, overwrite=False), "not empty"),
    ("file", dict(resume=False, overwrite=False), "is a file"),
])
def test_check_refuses_before_anything_is_written(tmp_path, setup, flags, words):
    run_dir = tmp_path / "run"
    if setup == "file":
        run_dir.write_text("x")
    else:
        run_dir.mkdir()
        if setup == "no config":
            fresh_run(run_dir)
            (run_dir / "config.yaml").unlink()
        foreign_files(run_dir)
    before = hashes(tmp_path)
    with pytest.raises(UserError, match=words):
        RunDir(str(run_dir)).check(**flags)
    assert hashes(tmp_path) == before


def test_resume_of_an_empty_or_missing_directory_starts_fresh(tmp_path):
    RunDir(str(tmp_path / "missing")).check(resume=True, overwrite=False)
    RunDir(str(tmp_path)).check(resume=True, overwrite=False)


def test_resume_refuses_a_damaged_config_in_one_line(tmp_path):
    fresh_run(tmp_path)
    (tmp_path / "config.yaml").write_bytes(b"model: [unclosed\n\x00\x01")
    rd = RunDir(str(tmp_path))
    with pytest.raises(UserError, match="is damaged") as err:
        rd.write_config("model: {name: mlp}\n", resume=True)
    assert "\n" not in str(err.value)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    fresh_run(tmp_path)
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"stage": "member", "member": 0, "epo')          # a kill during an append
    rd = RunDir(str(tmp_path))
    rd.check(resume=True, overwrite=False)
    rd.prepare(resume=True, overwrite=False, members=2)
    rd.log({"stage": "member", "member": 0, "epoch": 2})
    rd.release()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert "dropped a partial last line" in capsys.readouterr().err


def test_a_bad_metrics_line_in_the_middle_is_a_user_error(tmp_path):
    fresh_run(tmp_path)
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('garbage\n{"stage": "member", "member": 0, "epoch": 2}\n')
    rd = RunDir(str(tmp_path))
    with pytest.raises(UserError, match="line 2 is not JSON"):
        rd.prepare(resume=True, overwrite=False, members=2)
    rd.release()


def test_a_live_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path, capsys):
    fresh_run(tmp_path)
    holder = RunLock(str(tmp_path))
    holder.acquire()
    try:
        for flags in (dict(resume=True, overwrite=False), dict(resume=False, overwrite=True)):
            with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
                RunDir(str(tmp_path)).check(**flags)
        with pytest.raises(UserError, match="in use by pid"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # a run killed with SIGKILL leaves its lock file behind, but no process holds the lock any more
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 2 ** 22 + 7, "host": "gone", "slurm_job": ""}))
    rd = RunDir(str(tmp_path))
    rd.check(resume=True, overwrite=False)
    rd.prepare(resume=True, overwrite=False, members=2)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    rd.release()
    assert "took over the stale lock of pid 4194311 on host gone" in capsys.readouterr().err


def test_files_written_atomically_get_the_usual_mode(tmp_path):
    atomic_write_text(str(tmp_path / "a.txt"), "x")
    (tmp_path / "b.txt").write_text("x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode)


def test_an_empty_output_dir_is_refused_and_the_working_directory_untouched(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.yaml").write_text("my own config\n")
    (tmp_path / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = hashes(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", os.path.join(ROOT, "configs/quickstart.yaml"), "output.dir=", "train.epochs=1"]) == 2
    assert "output.dir is empty" in capsys.readouterr().err
    assert hashes(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["config.yaml", "metrics.jsonl"]


def test_a_sweep_never_overwrites_a_directory_without_a_flag(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": {}, "output": {"dir": str(tmp_path / "out")}}))
    (tmp_path / "out").mkdir()
    mine = foreign_files(tmp_path / "out")
    assert main(["run", str(config), "train.epochs=1", "finetune.epochs=0"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert hashes(tmp_path / "out") == mine


def test_an_interrupted_sweep_point_is_refused_without_a_flag_and_resumed_with_resume(tmp_path, capsys):
    config = tmp_path / "seeds.yaml"
    config.write_text(yaml.safe_dump({"seeds": [0, 1], "output": {"dir": str(tmp_path / "out")}}))
    args = ["run", str(config), "train.epochs=1", "finetune.epochs=0", "finetune.control=false",
            "output.diversity=false", "fusion.methods=[nt]", "distributed.threads_per_rank=1"]
    assert main(args) == 0                                   # in this process: seconds, not a new interpreter
    point = tmp_path / "out" / "seed=1"
    (point / "results.json").unlink()                        # as if killed before seed 1 finished
    mine = foreign_files(point)
    trained = hashes(point)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume" in err, err
    assert hashes(point) == trained
    assert main([*args, "--resume"]) == 0
    after = hashes(point)
    assert (point / "results.json").exists()
    for name in ("checkpoints/member0.safetensors", "checkpoints/member1.safetensors", *mine):
        assert after[name] == trained[name], name         # resumed from the members, not retrained


@pytest.mark.parametrize("sweep, words", [({"fusion.keep_ratio": [1.0, 0]}, "keep_ratio"),
                                          ({"model.kwargs.width": [8, 16]}, "not empty")])
def test_a_sweep_checks_every_point_before_training_any(tmp_path, capsys, sweep, words):
    out = tmp_path / "out"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": sweep, "output": {"dir": str(out)}}))
    (out / "model.kwargs.width=16").mkdir(parents=True)
    (out / "model.kwargs.width=16" / "notes.txt").write_text("mine")
    assert main(["run", str(config), "train.epochs=1", "finetune.epochs=0"]) == 2
    assert words in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["model.kwargs.width=16"]     # no point was started


def test_sigterm_while_starting_exits_3_and_writes_nothing(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ntdist", "run", "configs/quickstart.yaml",
                             f"output.dir={tmp_path / 'run'}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)                                     # still importing torch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err[-1000:]
    assert "preempted" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["config.yaml", "report.md", "checkpoints/member1.safetensors"])
def test_overwrite_refuses_to_replace_a_foreign_file_of_the_same_name(tmp_path, name):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / name).write_text("the user's own file\n")
    before = hashes(tmp_path)
    rd = RunDir(str(tmp_path))
    rd.check(resume=False, overwrite=True)
    with pytest.raises(UserError, match=f"would replace {name}"):
        rd.prepare(resume=False, overwrite=True, members=2)
    rd.release()
    assert hashes(tmp_path) == before
