"""A SIGTERM inside an epoch: the state is written at the next checkpoint step, and the resumed run is bit-identical.

Run: .venv/bin/python -m pytest tests/unit/test_step_resume.py
"""

import json
import os
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ntdist.preempt as preempt
import ntdist.stages.members as members
from helpers import make_run
from ntdist.errors import Preempted, UserError
from ntdist.models.statedict import META_KEY
from ntdist.records.checkpoint import read_checkpoint
from ntdist.training.batches import LoaderBatches, TensorBatches, train_batches

ARGS = ["model.kwargs.width=16", "train.epochs=2", "data.batch_size=16", "data.train_fraction=0.2",
        "train.checkpoint_every_steps=4"]
TIMING = ("samples_per_s", "peak_device_mib")   # wall-clock figures differ between any two runs


def _without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def _sigterm_at_forward(monkeypatch, call: int) -> None:
    """Make member 0 send this process a real SIGTERM during its `call`-th training forward pass."""
    build = members.build_member
    calls = []

    def build_and_arm(*args, **kwargs):
        model = build(*args, **kwargs)

        def hook(module, inputs):
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signal.SIGTERM)
        model.register_forward_pre_hook(hook)
        return model
    monkeypatch.setattr(members, "build_member", build_and_arm)


def _state(run):
    meta, state, extra = read_checkpoint(run.rundir.member_state(0))
    return meta["info"], {**state, **{f"extra.{k}": v for k, v in extra.items()}}


def _preempted_in_epoch_1(run, monkeypatch, forward, batch):
    """Train member 0 of `run` with a real SIGTERM at the `forward`-th forward pass; it stops at `batch` of epoch 1."""
    with monkeypatch.context() as patch:
        _sigterm_at_forward(patch, forward)
        preempt.install_sigterm_handler()
        try:
            with pytest.raises(Preempted, match=f"at batch {batch} of epoch 1"):
                members.train_member(run, 0)
        finally:
            preempt.default_sigterm()
            preempt._requested = False


@pytest.mark.parametrize("resident", ["data.resident_max_mb=64", "data.resident_max_mb=0"])
def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path, monkeypatch, resident):
    whole_run = make_run(tmp_path / "whole", *ARGS, resident)
    whole, whole_history = members.train_member(whole_run, 0)
    steps = len(train_batches(whole_run.splits.train, 16, 0))
    assert steps > 12   # the SIGTERM below lands in the middle of epoch 1

    cut = make_run(tmp_path / "cut", *ARGS, resident)
    _preempted_in_epoch_1(cut, monkeypatch, forward=6, batch=8)
    info, _ = _state(cut)
    assert info["epoch"] == 0 and info["history"] == []
    assert {k: info["position"][k] for k in ("epoch", "step", "count", "batch_size")} == \
        {"epoch": 1, "step": 8, "count": 8 * 16, "batch_size": 16}
    cut.rundir.release()

    resumed_run = make_run(tmp_path / "cut", *ARGS, resident, resume=True)
    resumed, resumed_history = members.train_member(resumed_run, 0)
    assert [h["epoch"] for h in resumed_history] == [1, 2]
    assert _without_timing(resumed_history) == _without_timing(whole_history)   # loss of epoch 1 included
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    (info_a, tensors_a), (info_b, tensors_b) = _state(whole_run), _state(resumed_run)
    assert tensors_a.keys() == tensors_b.keys() and "extra.rng" in tensors_a
    assert [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])] == []   # weights, momentum, RNG
    assert "position" not in info_b and _without_timing(info_a["history"]) == _without_timing(info_b["history"])


def _rewritten(path, position=None, order=None):
    """Rewrite the state file `path` with its position's fields updated by `position`, its data order by `order`."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["info"]["position"].update(position or {})
    if order is not None:
        tensors["extra.order"] = order(tensors["extra.order"])
    save_file(tensors, path, metadata={META_KEY: json.dumps(meta)})


# Another config (data.batch_size, train.seed) makes the state another run's, refused before its data order is
# looked at (tests/unit/test_state_owner.py); what is left to differ under the same config is the rank count,
# or a file whose position or order was altered, as here.
@pytest.mark.parametrize("position, order, differs", [
    ({"batch_size": 8}, None, "(batch size 8 there, 16 now)"),
    (None, lambda order: order.flip(0), "(the shuffled order: position "),   # same sizes: the message names the order
])
def test_resume_inside_an_epoch_refuses_another_data_order(tmp_path, monkeypatch, position, order, differs):
    cut = make_run(tmp_path / "run", *ARGS)
    _preempted_in_epoch_1(cut, monkeypatch, forward=2, batch=4)
    cut.rundir.release()
    _rewritten(cut.rundir.member_state(0), position, order)
    resumed = make_run(tmp_path / "run", *ARGS, resume=True)
    with pytest.raises(UserError, match="another data order") as err:
        members.train_member(resumed, 0)
    assert differs in str(err.value)


def test_batches_start_at_a_step_in_the_same_order(tmp_path):
    run = make_run(tmp_path, "data.train_fraction=0.2")
    for max_mb in (64, 0):
        batches = train_batches(run.splits.train, 16, 5, num_replicas=2, rank=1, max_mb=max_mb)
        assert isinstance(batches, TensorBatches if max_mb else LoaderBatches)
        batches.set_epoch(3)
        full = [y for _, y in batches]
        batches.set_epoch(3, start_step=5)
        assert len(batches) == len(full) and len(full) > 6
        assert all(torch.equal(a, b) for a, b in zip(full[5:], [y for _, y in batches], strict=True))
        assert sorted(batches.order().tolist()) == list(range(len(run.splits.train)))


def test_fp16_resume_keeps_the_grad_scalers_state(tmp_path, monkeypatch):
    fp16 = [*ARGS, "train.precision=fp16"]
    whole_run = make_run(tmp_path / "whole", *fp16)
    whole, _ = members.train_member(whole_run, 0)
    cut = make_run(tmp_path / "cut", *fp16)
    _preempted_in_epoch_1(cut, monkeypatch, forward=6, batch=8)
    assert _state(cut)[0]["scaler"]["_growth_tracker"] == 8   # 8 steps without an overflow
    cut.rundir.release()
    resumed_run = make_run(tmp_path / "cut", *fp16, resume=True)
    resumed, _ = members.train_member(resumed_run, 0)
    steps = 2 * len(train_batches(whole_run.splits.train, 16, 0))
    scaler_a, scaler_b = _state(whole_run)[0]["scaler"], _state(resumed_run)[0]["scaler"]
    assert scaler_a["_growth_tracker"] == steps and scaler_b == scaler_a   # a restarted scaler would count steps - 8
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
