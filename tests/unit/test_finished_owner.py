"""Final checkpoints record whose they are: --resume refuses one copied in from another run, keeps its own.

Each test trains the tiniest members (or fine-tunes for one epoch) into real run directories, then copies
or alters a final checkpoint the way a user's mistake would, and resumes the stage.
Run: .venv/bin/python -m pytest tests/unit/test_finished_owner.py
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import ntdist.pipeline as pipeline
from helpers import make_run
from ntdist.errors import UserError
from ntdist.models.statedict import META_KEY
from ntdist.records.checkpoint import read_checkpoint
from ntdist.records.manifest import MANIFEST_FILE, read_manifest

ARGS = ["model.kwargs.width=8", "train.epochs=1", "finetune.epochs=1", "data.batch_size=32",
        "data.train_fraction=0.1"]


def _trained(path, *overrides):
    """A run directory whose two members finished training (their final checkpoints written)."""
    run = make_run(path, *ARGS, *overrides)
    try:
        pipeline.train_stage(run)
    finally:
        run.rundir.release()
    return run


def _resume_members(path, *overrides):
    run = make_run(path, *ARGS, *overrides, resume=True)
    try:
        return pipeline.train_stage(run)
    finally:
        run.rundir.release()


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_finished_member_copied_from_another_run_is_refused(tmp_path):
    other = _trained(tmp_path / "other", "train.seed=0")
    mine = _trained(tmp_path / "mine", "train.seed=1")
    shutil.copyfile(other.rundir.member_checkpoint(0), mine.rundir.member_checkpoint(0))
    before = {i: _digest(mine.rundir.member_checkpoint(i)) for i in (0, 1)}
    with pytest.raises(UserError, match=r"checkpoint '.*member0\.safetensors' is not the result of training of "
                                        r"member 0 of this run \(run '\w+' there, '\w+' here: the config's keys "
                                        r"[^;)]*; seed 0 there, 1000 "
                                        r"here\); delete it to redo that stage, or set output.dir to a new folder"
                       ) as refused:
        _resume_members(tmp_path / "mine", "train.seed=1")
    assert refused.value.exit_code == 2 and "\n" not in str(refused.value)
    assert {i: _digest(mine.rundir.member_checkpoint(i)) for i in (0, 1)} == before   # nothing deleted


def test_a_runs_own_finished_members_record_their_owner_and_resume(tmp_path, monkeypatch):
    run = _trained(tmp_path)
    for i in (0, 1):
        info = read_checkpoint(run.rundir.member_checkpoint(i))[0]["info"]
        assert info["owner"] == asdict(run.member_owner(i)) and info["owner"]["part"] == f"training of member {i}"
    trained = []
    monkeypatch.setattr(pipeline, "train_members", lambda r, indices, groups: trained.extend(indices) or {})
    held = _resume_members(tmp_path)
    assert trained == [] and sorted(held) == [0, 1]   # both loaded from their files, none trained again
    saved = read_checkpoint(run.rundir.member_checkpoint(1))[1]
    assert all((held[1].state_dict()[k] == v).all() for k, v in saved.items())


def _strip_owner(path):
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        stored = {k: f.get_tensor(k) for k in f.keys()}
    del meta["info"]["owner"]
    save_file(stored, path, metadata={META_KEY: json.dumps(meta)})


def test_a_finished_member_without_an_owner_passes_only_in_an_older_run_directory(tmp_path):
    run = _trained(tmp_path)
    _strip_owner(run.rundir.member_checkpoint(0))
    with pytest.raises(UserError, match=r"member0\.safetensors' is not the result of training of member 0 of this "
                                        r"run \(it records no owner"):
        _resume_members(tmp_path)
    names = read_manifest(str(tmp_path))   # the manifest as a version without owners wrote it: no format line
    (tmp_path / MANIFEST_FILE).write_text("".join(f"{n}\n" for n in sorted(names)))
    assert sorted(_resume_members(tmp_path)) == [0, 1]
    assert not (tmp_path / MANIFEST_FILE).read_text().startswith("#")   # still an older directory


def test_a_fine_tuned_checkpoint_copied_from_another_run_is_refused(tmp_path):
    finals = []
    for seed in (0, 1):
        run = make_run(tmp_path / str(seed), *ARGS, f"train.seed={seed}")
        try:
            pipeline.resumable_finetune(run, run.template(), "avg", 7, None)
        finally:
            run.rundir.release()
        finals.append(run.rundir.finetuned_checkpoint("avg"))
    shutil.copyfile(finals[0], finals[1])
    run = make_run(tmp_path / "1", *ARGS, "train.seed=1", resume=True)
    try:
        with pytest.raises(UserError, match=r"finetuned_avg\.safetensors' is not the result of fine-tuning \(avg\) "
                                            r"of this run \(run '\w+' there, '\w+' here: the config's keys [^;)]*\)"):
            pipeline.resumable_finetune(run, run.template(), "avg", 7, None)
    finally:
        run.rundir.release()
    assert os.path.isfile(finals[1])
