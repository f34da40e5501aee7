"""State files record whose they are: --resume refuses one of another run, member, dtype or position.

Each test writes a real state file with a tiny training run, then copies or alters it the way a user's
mistake or a forged file would, and resumes.
Run: .venv/bin/python -m pytest tests/unit/test_state_owner.py
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ntdist.preempt as preempt
import ntdist.stages.members as members
from helpers import make_run
from ntdist.errors import Preempted, UserError
from ntdist.models import ModelSpec
from ntdist.stages.context import member_part
from ntdist.models.statedict import EXTRA_PREFIX, META_KEY
from ntdist.training.config import member_seed
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.state import StateOwner, load_state, save_state

ARGS = ["model.kwargs.width=8", "train.epochs=2", "data.batch_size=16", "data.train_fraction=0.2"]


def _trained(path, monkeypatch, *overrides):
    """A run directory whose members 0 (and 1, with fusion.k=2) stopped after epoch 1 of 2, their states on disk."""
    run = make_run(path, *ARGS, *overrides)
    with monkeypatch.context() as patch:   # as if SIGTERM had arrived: each member stops after epoch 1
        patch.setattr(preempt, "_requested", True)
        for index in range(run.cfg.fusion.k):
            with pytest.raises(Preempted, match="after epoch 1"):
                members.train_member(run, index)
    run.rundir.release()
    return run


def _rewrite(path, info=None, tensors=None):
    """Rewrite a state file with its metadata's info changed by `info(dict)` and its tensors by `tensors(dict)`."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if info is not None:
        info(meta["info"])
    if tensors is not None:
        tensors(stored)
    save_file(stored, path, metadata={META_KEY: json.dumps(meta)})


def _resume(path, index=0, *overrides):
    run = make_run(path, *ARGS, *overrides, resume=True)
    try:
        return members.train_member(run, index)
    finally:
        run.rundir.release()


def test_a_state_of_another_seed_is_refused(tmp_path, monkeypatch):
    other = _trained(tmp_path / "other", monkeypatch, "train.seed=0")
    mine = _trained(tmp_path / "mine", monkeypatch, "train.seed=1")
    shutil.copyfile(other.rundir.member_state(0), mine.rundir.member_state(0))
    with pytest.raises(UserError, match=r"member0\.state\.safetensors' does not belong to training of member 0 "
                                        r"of this run \(run '\w+' there, '\w+' here: the config's keys [^;)]*; "
                                        r"seed 0 there, 1000 here\)"):
        _resume(tmp_path / "mine", 0, "train.seed=1")


def test_member_0s_state_copied_over_member_1s_is_refused(tmp_path, monkeypatch):
    run = _trained(tmp_path, monkeypatch, "fusion.k=2")
    shutil.copyfile(run.rundir.member_state(0), run.rundir.member_state(1))
    with pytest.raises(UserError, match="member1.state.*part 'training of member 0' there, 'training of member 1' "
                                        "here; seed 0 there, 1 here"):
        _resume(tmp_path, 1, "fusion.k=2")
    _resume(tmp_path, 0, "fusion.k=2")   # member 0's own state still resumes


def test_half_precision_weights_in_a_float32_run_are_refused(tmp_path, monkeypatch):
    run = _trained(tmp_path, monkeypatch)

    def halve(stored):
        for key in [k for k in stored if not k.startswith(EXTRA_PREFIX)]:
            stored[key] = stored[key].half()
    _rewrite(run.rundir.member_state(0), tensors=halve)
    with pytest.raises(UserError, match=r"member0\.state\.safetensors' stores '.*' as torch.float16, but the model "
                                        "holds torch.float32"):
        _resume(tmp_path)


def test_a_momentum_buffer_of_the_wrong_shape_is_refused(tmp_path, monkeypatch):
    run = _trained(tmp_path, monkeypatch)
    key = f"{EXTRA_PREFIX}opt.0.momentum_buffer"

    def transpose(stored):
        assert stored[key].dim() == 2 and stored[key].shape[0] != stored[key].shape[1]
        stored[key] = stored[key].t().contiguous()
    _rewrite(run.rundir.member_state(0), tensors=transpose)
    with pytest.raises(UserError, match="optimizer buffer 'momentum_buffer' of shape .* for parameter 0 of shape"):
        _resume(tmp_path)   # epoch 2 would meet the buffer at its first step


def test_a_forged_step_inside_an_epoch_is_refused(tmp_path, monkeypatch):
    steps = ["train.checkpoint_every_steps=2"]
    run = make_run(tmp_path, *ARGS, *steps)
    with monkeypatch.context() as patch:   # as if SIGTERM had arrived: the state is written at batch 2
        patch.setattr(preempt, "_requested", True)
        with pytest.raises(Preempted, match="at batch 2 of epoch 1"):
            members.train_member(run, 0)
    run.rundir.release()
    _rewrite(run.rundir.member_state(0), info=lambda info: info["position"].update(step=10 ** 6))
    with pytest.raises(UserError, match=r"member0\.state\.safetensors' stands at batch 1000000 of epoch 1"):
        _resume(tmp_path, 0, *steps)


def test_a_state_without_an_owner_is_refused(tmp_path):
    model = torch.nn.Linear(4, 3)
    run = make_run(tmp_path, *ARGS)
    optimizer = make_optimizer(model, run.cfg.train)
    scheduler = make_scheduler(optimizer, run.cfg.train)
    path = str(tmp_path / "s.safetensors")
    save_state(path, model, run.spec, optimizer, scheduler, 1, [{"epoch": 1}])
    owner = StateOwner.of(run.run_id, "training of member 0", 0, model, 2)
    with pytest.raises(UserError, match="it records no owner"):
        load_state(path, model, optimizer, scheduler, 2, owner=owner)
    save_state(path, model, run.spec, optimizer, scheduler, 1, [{"epoch": 1}], owner=owner)
    assert load_state(path, model, optimizer, scheduler, 2, owner=owner)[0] == 1
    run.rundir.release()


def test_the_runs_owners_build_no_model(tmp_path, monkeypatch):
    run = make_run(tmp_path, *ARGS, "fusion.k=2")
    run.rundir.release()
    parts = [(member_part(i), member_seed(run.cfg.train, i), 2) for i in range(2)] + [("fine-tuning (nt)", 7, 3)]
    expected = [StateOwner.of(run.run_id, part, seed, run.template(), epochs) for part, seed, epochs in parts]
    builds, build = [], ModelSpec.build
    monkeypatch.setattr(ModelSpec, "build", lambda spec: builds.append(spec.name) or build(spec))
    owners = [run.member_owner(0), run.member_owner(1), run.owner("fine-tuning (nt)", 7, 3)]
    assert builds == []   # the dtype is the one make_run read from member 0, which it built anyway
    assert owners == expected and expected[0].dtype == "torch.float32"
