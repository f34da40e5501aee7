"""`train.deterministic` switches torch's deterministic mode; SyncBatchNorm goes in and out of a member cleanly.

Run: .venv/bin/python -m pytest tests/unit/test_determinism.py
"""

import os

import pytest
import torch
import torch.nn as nn

import ntdist.pipeline as pipeline
from helpers import make_run
from ntdist.training.loop import set_deterministic
from ntdist.stages.members import use_sync_batchnorm


def test_set_deterministic_switches_kernels_cudnn_and_cublas(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.empty(8).isnan().all()   # deterministic mode fills fresh memory: visible on a CPU too
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.benchmark   # without train.deterministic cuDNN autotunes its convolutions


def _stop(run):
    raise RuntimeError("stop before training")


def test_the_run_applies_train_deterministic(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "set_deterministic", seen.append)
    monkeypatch.setattr(pipeline, "train_stage", _stop)
    for value in (True, False):
        with pytest.raises(RuntimeError, match="stop before training"):
            pipeline.run_stages(make_run(tmp_path / str(value), f"train.deterministic={value}"))
    assert seen == [True, False]


def test_sync_batchnorm_trains_the_members_own_layers_and_is_undone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    layers = [model[1], model[3][1]]
    before = [m.weight.detach().clone() for m in layers]
    restore = use_sync_batchnorm(model, None)
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[3][1], nn.SyncBatchNorm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(4, 3, 6, 6)).square().mean().backward()   # no process group: torch normalises locally
    optimizer.step()
    restore()
    assert [type(m) for m in model.modules() if "Norm" in type(m).__name__] == [nn.BatchNorm2d] * 2
    assert model[1] is layers[0] and model[3][1] is layers[1]
    assert all(not torch.equal(m.weight, b) for m, b in zip(layers, before))   # the step reached them
    assert all(int(m.num_batches_tracked) == 1 for m in layers)
