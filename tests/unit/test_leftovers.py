"""What a kill -9 during an atomic write leaves behind is ntdist's own: recognised, cleaned, never "foreign".

The leftovers are created directly, named as `records.files.replacing` names its temporaries.
Run: .venv/bin/python -m pytest tests/unit/test_leftovers.py
"""

import os

import pytest

from ntdist.errors import UserError
from ntdist.records.files import replacing, temporary_target
from ntdist.records.manifest import LOCK_FILE, MANIFEST_FILE, read_manifest
from ntdist.records.rundir import RunDir, checkpoint_file, member_name, member_state_name


def _first_write_killed(run_dir):
    """A directory as a run killed -9 while writing its manifest, its very first file, leaves it."""
    os.makedirs(run_dir / "checkpoints")
    (run_dir / LOCK_FILE).write_text('{"pid": 999999999, "host": "gone"}')
    (run_dir / f".tmp-k2x9_q0a{MANIFEST_FILE}").write_text("config.yaml\n")


def test_the_temporaries_of_atomic_writes_are_recognised(tmp_path):
    target = tmp_path / "member0.state.safetensors"
    with replacing(str(target)) as tmp:
        assert temporary_target(os.path.basename(tmp)) == target.name
    assert temporary_target(".tmp-notes.txt") is None and temporary_target("member0.safetensors") is None


@pytest.mark.parametrize("resume", [False, True])
def test_a_directory_holding_only_a_killed_first_write_starts_afresh(tmp_path, resume):
    _first_write_killed(tmp_path / "with_notes")
    (tmp_path / "with_notes" / "notes.txt").write_text("mine")   # a user's file beside them: not ntdist's alone
    with pytest.raises(UserError, match="is not empty" if not resume else "was not written by ntdist"):
        RunDir(str(tmp_path / "with_notes")).check(resume=resume, overwrite=False)
    tmp_path = tmp_path / "alone"
    _first_write_killed(tmp_path)
    rd = RunDir(str(tmp_path))
    rd.check(resume=resume, overwrite=False)   # neither "not empty" nor "no .ntdist-manifest"
    rd.prepare(resume=resume, overwrite=False, members=1)
    rd.release()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert os.path.isfile(tmp_path / MANIFEST_FILE)


def _with_killed_state_write(run_dir):
    """A run directory where a kill -9 interrupted the write of member 0's state."""
    rd = RunDir(str(run_dir))
    rd.prepare(resume=False, overwrite=False, members=1)
    rd.write_config("model: {name: mlp}\noutput: {dir: x}\n")
    rd.release()
    folder, name = os.path.split(checkpoint_file(member_state_name(0)))
    leftover = run_dir / folder / f".tmp-a1b2c3d4{name}"
    leftover.write_bytes(b"half a state")
    return leftover


def test_resume_clears_the_temporaries_of_killed_state_writes(tmp_path):
    leftover = _with_killed_state_write(tmp_path)
    rd = RunDir(str(tmp_path))
    rd.check(resume=True, overwrite=False)
    rd.prepare(resume=True, overwrite=False, members=1)
    rd.release()
    assert not leftover.exists()


def test_overwrite_keeps_no_temporary_as_a_foreign_file(tmp_path, capsys):
    leftover = _with_killed_state_write(tmp_path)
    (tmp_path / f".tmp-zz99yy88{MANIFEST_FILE}").write_text("torn")
    rd = RunDir(str(tmp_path))
    rd.check(resume=False, overwrite=True)
    rd.prepare(resume=False, overwrite=True, members=1)
    rd.release()
    assert not leftover.exists() and not (tmp_path / f".tmp-zz99yy88{MANIFEST_FILE}").exists()
    assert "did not write" not in capsys.readouterr().err


def _with_killed_unlisted_write(run_dir):
    """A run directory whose manifest does not list member 0's checkpoint yet (written before that file was
    planned), with the temporary a kill -9 left while that checkpoint was being written."""
    rd = RunDir(str(run_dir))
    rd.prepare(resume=False, overwrite=False, members=0)
    rd.write_config("model: {name: mlp}\noutput: {dir: x}\n")
    rd.release()
    assert checkpoint_file(member_name(0)) not in read_manifest(str(run_dir))
    folder, name = os.path.split(checkpoint_file(member_name(0)))
    leftover = run_dir / folder / f".tmp-e5f6g7h8{name}"
    leftover.write_bytes(b"half a member")
    return leftover


@pytest.mark.parametrize("resume", [False, True])
def test_a_temporary_of_a_planned_file_not_listed_yet_is_removed(tmp_path, capsys, resume):
    leftover = _with_killed_unlisted_write(tmp_path)
    rd = RunDir(str(tmp_path))
    rd.check(resume=resume, overwrite=not resume)
    rd.prepare(resume=resume, overwrite=not resume, members=1)
    rd.release()
    assert not leftover.exists()
    assert "did not write" not in capsys.readouterr().err   # --overwrite calls it no foreign file either
