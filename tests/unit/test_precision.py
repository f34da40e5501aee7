"""Mixed precision: bf16 autocast trains as well as fp32, fp16 trains through its grad scaler, and a DeepSpeed
config must agree with finetune.precision.

Run: .venv/bin/python -m pytest tests/unit/test_precision.py
"""

import importlib.util
import json

import pytest
import torch

from helpers import make_run
from ntdist.errors import UserError
from ntdist.config import load_config
from ntdist.training.batches import eval_batches
from ntdist.training.loop import evaluate
from ntdist.stages.members import train_member, train_members

QUICK = ["model.kwargs.width=32", "model.kwargs.depth=2", "train.epochs=6", "train.lr=0.05"]


def _accuracy(run, model):
    return evaluate(model, eval_batches(run.splits.test, 256), "cpu")["accuracy"]


def test_bf16_trains_within_one_point_of_fp32(tmp_path):
    fp32 = make_run(tmp_path / "fp32", *QUICK)
    bf16 = make_run(tmp_path / "bf16", *QUICK, "train.precision=bf16")
    a = _accuracy(fp32, train_member(fp32, 0)[0])
    b = _accuracy(bf16, train_member(bf16, 0)[0])
    assert a > 0.9 and abs(a - b) <= 0.01, (a, b)
    vectorised = make_run(tmp_path / "vec", *QUICK, "train.precision=bf16", "train.vectorize=on")
    together = train_members(vectorised, [0, 1], {})
    assert abs(_accuracy(vectorised, together[0][0]) - a) <= 0.01


def test_fp16_uses_a_grad_scaler_and_trains(tmp_path):
    run = make_run(tmp_path, *QUICK, "train.epochs=2", "train.precision=fp16")
    model, history = train_member(run, 0)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("override, words", [("train.precision=fp8", "train.precision"),
                                             ("finetune.precision=fp16", "finetune.engine=ddp")])
def test_bad_precision_settings_are_one_line(override, words):
    extra = ["finetune.engine=accelerate"] if override.startswith("finetune") else []
    with pytest.raises(UserError, match=words):
        load_config(None, [override, *extra])


def test_a_deepspeed_config_that_enables_another_precision_is_refused(tmp_path, monkeypatch):
    # the unit tier installs no engine package: the config check needs only to find deepspeed, not to import it
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name == "deepspeed"
                        else find_spec(name, *args))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "fp16": {"enabled": False}}))
    with pytest.raises(UserError, match="enables bf16 but finetune.precision=fp32; set finetune.precision=bf16"):
        load_config(None, ["finetune.engine=deepspeed", f"finetune.deepspeed_config={ds}"])
    cfg = load_config(None, ["finetune.engine=deepspeed", f"finetune.deepspeed_config={ds}", "finetune.precision=bf16"])
    assert cfg.finetune.precision == "bf16"


def test_fp16_members_train_one_after_another_each_with_its_own_scaler(tmp_path, capsys):
    run = make_run(tmp_path / "on", *QUICK, "train.epochs=1", "train.precision=fp16", "train.vectorize=on")
    together = train_members(run, [0, 1], {})
    assert "one after another: train.precision is fp16" in capsys.readouterr().err
    alone = make_run(tmp_path / "alone", *QUICK, "train.epochs=1", "train.precision=fp16")
    model = train_member(alone, 1)[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, together[1][0].state_dict()[key]), key
