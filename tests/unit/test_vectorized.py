"""Training a rank's members at once (torch.func) equals training them one after another.

Run: .venv/bin/python -m pytest tests/unit/test_vectorized.py
"""

import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import make_run
from ntdist.training.batches import TensorBatches
from ntdist.models.weights import build_member
from ntdist.stages.members import train_member
from ntdist.training.config import member_seed
from ntdist.stages.vectorized import member_batches, train_together, why_not

MODELS = {"mlp": ["model.kwargs.width=16"],
          "vgg11-bn": ["model.name=vgg11", "model.kwargs.width=0.0625", "model.kwargs.batch_norm=true"]}


def _float64_run(tmp_path, name, k, *extra):
    run = make_run(tmp_path, *MODELS[name], f"fusion.k={k}", "train.epochs=2", "train.lr=0.05",
                   "data.batch_size=32", "data.train_fraction=0.15", "train.vectorize=on", *extra)
    double = {split: TensorDataset(*[t.double() if t.is_floating_point() else t for t in
                                     (torch.stack([s[0] for s in data]), torch.stack([s[1] for s in data]))])
              for split, data in (("train", run.splits.train), ("val", run.splits.val), ("test", run.splits.test))}
    return dataclasses.replace(run, splits=dataclasses.replace(run.splits, **double))


@pytest.mark.parametrize("name, k", [("mlp", 2), ("mlp", 3), ("vgg11-bn", 2), ("vgg11-bn", 3)])
def test_vectorised_equals_sequential_in_float64(tmp_path, name, k):
    torch.set_default_dtype(torch.float64)
    try:
        run = _float64_run(tmp_path, name, k)
        indices = list(range(k))
        seeds = [member_seed(run.cfg.train, i) for i in indices]
        models = [build_member(run.spec, s) for s in seeds]
        batches = member_batches(run, seeds)
        assert why_not(run, models, batches) is None
        together = train_together(run, indices, seeds, models, batches)
        alone_run = dataclasses.replace(run, rundir=make_run(tmp_path / "alone", *MODELS[name]).rundir)
        for i in indices:
            alone, history = train_member(alone_run, i)
            model, vector_history = together[i]
            assert [h["epoch"] for h in vector_history] == [1, 2]
            for (key, a), b in zip(alone.state_dict().items(), model.state_dict().values()):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"member {i} {key}")
            assert any("running_mean" in key for key in alone.state_dict()) == (name != "mlp")
            assert abs(history[-1]["loss"] - vector_history[-1]["loss"]) < 1e-6
            assert [h["val_accuracy"] for h in history] == [h["val_accuracy"] for h in vector_history]
        first = dict(together[0][0].named_parameters())
        second = dict(together[1][0].named_parameters())
        assert not torch.equal(next(iter(first.values())), next(iter(second.values())))   # own seeds
    finally:
        torch.set_default_dtype(torch.float32)


def test_reasons_to_train_one_after_another(tmp_path):
    run = make_run(tmp_path, *MODELS["mlp"], "fusion.k=2", "train.vectorize=off")
    seeds = [0, 1]
    models = [build_member(run.spec, s) for s in seeds]
    assert why_not(run, models, member_batches(run, seeds)) == "off"
    run = make_run(tmp_path / "b", *MODELS["mlp"], "fusion.k=2", "data.resident_max_mb=0")
    assert "resident_max_mb" in why_not(run, models, member_batches(run, seeds))
    run = make_run(tmp_path / "c", *MODELS["mlp"], "fusion.k=2", "model.kwargs.width=512")
    wide = [build_member(run.spec, s) for s in seeds]
    assert "faster one after another" in why_not(run, wide, member_batches(run, seeds))
    run = make_run(tmp_path / "d", *MODELS["mlp"], "fusion.k=2")
    assert "fewer than 4 members" in why_not(run, models, member_batches(run, seeds))
    assert isinstance(member_batches(run, seeds)[0], TensorBatches)


def test_vectorised_training_resumes_bit_identically(tmp_path, monkeypatch):
    import ntdist.stages.vectorized as vectorized
    from ntdist.errors import Preempted
    from ntdist.stages.members import train_members

    args = [*MODELS["mlp"], "fusion.k=4", "train.epochs=2", "train.vectorize=on", "data.train_fraction=0.3"]
    whole = train_members(make_run(tmp_path / "whole", *args), [0, 1, 2, 3], {})
    monkeypatch.setattr(vectorized, "preempt_requested", lambda: True)
    cut = make_run(tmp_path / "cut", *args)
    with pytest.raises(Preempted, match="after epoch 1"):
        train_members(cut, [0, 1, 2, 3], {})
    cut.rundir.release()
    monkeypatch.setattr(vectorized, "preempt_requested", lambda: False)
    resumed = train_members(make_run(tmp_path / "cut", *args, resume=True), [0, 1, 2, 3], {})
    for i in range(4):
        assert [h["epoch"] for h in resumed[i][1]] == [1, 2]
        for a, b in zip(whole[i][0].state_dict().values(), resumed[i][0].state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer, momentum, buffers", [("sgd", 0, 0), ("sgd", 0.9, 1), ("adamw", 0.9, 2)])
def test_the_probe_reserves_the_optimizers_buffers(tmp_path, monkeypatch, optimizer, momentum, buffers):
    import ntdist.stages.members as members
    import ntdist.stages.vectorized as vectorized

    run = make_run(tmp_path, *MODELS["mlp"], "fusion.k=2", "train.vectorize=on", f"train.optimizer={optimizer}",
                   f"train.momentum={momentum}")
    reserved, step = [], vectorized._one_step
    monkeypatch.setattr(vectorized, "_one_step", lambda models, x, n: reserved.append(n) or step(models, x, n))
    monkeypatch.setattr(members, "train_together", lambda *args: "trained together")   # the probe is what counts
    assert members._train_together(run, [0, 1]) == ("trained together", None, False)
    assert reserved == [buffers] and len(run.cfg.train.state_buffers) == buffers
