"""The training recipe keys: optimizer (sgd | adamw), betas, the no-decay group, warmup_epochs, label_smoothing and
grad_clip, in their config sections, the loop, vectorised members and a resume inside an epoch.

Run: .venv/bin/python -m pytest tests/unit/test_recipe.py
"""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import ntdist.stages.members as members
from helpers import ROOT, make_run
from ntdist.cli import main
from ntdist.config import load_config
from ntdist.errors import UserError
from ntdist.models.weights import build_member
from ntdist.training.batches import TensorBatches
from ntdist.training.config import member_seed
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.loop import Precision, train_epoch
from ntdist.stages.vectorized import member_batches, train_together, why_not

RECIPE = ["train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.05", "train.betas=[0.8,0.99]",
          "train.warmup_epochs=1", "train.schedule=cosine", "train.label_smoothing=0.1", "train.grad_clip=0.5"]


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("override, words", [
    ("train.optimizer=adam", ["train.optimizer", "'adam'", "adamw"]),
    ("finetune.optimizer=lamb", ["finetune.optimizer", "sgd"]),
    ("train.betas=[0.9]", ["train.betas", "two numbers"]),
    ("train.betas=[0.9,1.0]", ["train.betas", "[0, 1)"]),
    ("train.warmup_epochs=11", ["train.warmup_epochs", "0..train.epochs (10)"]),
    ("finetune.warmup_epochs=-1", ["finetune.warmup_epochs", "must be in 0..finetune.epochs"]),
    ("train.label_smoothing=1", ["train.label_smoothing", "[0, 1)"]),
    ("finetune.grad_clip=-1", ["finetune.grad_clip", "> 0"]),
])
def test_recipe_keys_refuse_bad_values_with_one_line(override, words):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)


def test_recipe_keys_are_accepted_per_section_and_an_unknown_optimizer_exits_2(tmp_path, capsys):
    cfg = load_config(None, [*RECIPE, "finetune.optimizer=adamw", "finetune.grad_clip=0"])
    assert (cfg.train.optimizer, cfg.train.betas, cfg.train.warmup_epochs) == ("adamw", [0.8, 0.99], 1)
    assert (cfg.train.label_smoothing, cfg.train.grad_clip) == (0.1, 0.5)
    assert (cfg.finetune.optimizer, cfg.finetune.warmup_epochs, cfg.finetune.grad_clip) == ("adamw", 0, 0)
    assert load_config(None, []).train.optimizer == "sgd" == load_config(None, []).finetune.optimizer
    with pytest.raises(UserError, match="finetune.label_smoothing.*finetune.distill"):
        load_config(None, ["finetune.distill=true", "finetune.label_smoothing=0.1"])
    with pytest.raises(UserError, match="train.grad_clip do not apply to mode sync"):
        load_config(None, ["mode=sync", "train.grad_clip=1"])
    assert load_config(None, ["mode=sync", "train.optimizer=adamw", "train.warmup_epochs=1"]).train.optimizer == "adamw"
    config = os.path.join(ROOT, "configs/quickstart.yaml")
    assert main(["run", config, "train.optimizer=adamx", f"output.dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.optimizer" in err[0] and "adamw" in err[0], err


def test_deepspeed_clips_to_finetune_grad_clip_and_a_file_that_says_otherwise_is_refused(tmp_path, monkeypatch):
    import importlib.util
    import json
    find_spec = importlib.util.find_spec   # the unit tier installs no deepspeed: the check only needs to find it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name == "deepspeed"
                        else find_spec(name, *args))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_clipping": 1.0}))
    engine = ["finetune.engine=deepspeed", f"finetune.deepspeed_config={ds}"]
    with pytest.raises(UserError, match="gradient_clipping 1.0 but finetune.grad_clip=None; set finetune.grad_clip=1"):
        load_config(None, engine)
    assert load_config(None, [*engine, "finetune.grad_clip=1"]).finetune.grad_clip == 1.0
    assert load_config(None, [*engine[1:], "finetune.grad_clip=2"]).finetune.grad_clip == 2.0   # ddp ignores the file


def test_adamw_leaves_norm_weights_and_biases_undecayed():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.Flatten(), nn.Linear(8, 3), nn.LayerNorm(3))
    cfg = load_config(None, ["train.optimizer=adamw", "train.weight_decay=0.1"]).train
    optimizer = make_optimizer(model, cfg)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.1 if p.ndim > 1 else 0.0), name
    assert len(decay) == len(list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():   # no gradient signal: only decoupled decay can move a parameter
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for (name, p), old in zip(model.named_parameters(), before):
        assert torch.equal(p, old) == (p.ndim <= 1), name
    sgd = make_optimizer(model, load_config(None, []).train)
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-4]   # sgd: one group, as before


@pytest.mark.parametrize("schedule, after", [("cosine", [1.0, 0.5 * (1 + math.cos(math.pi / 3)),
                                                         0.5 * (1 + math.cos(2 * math.pi / 3))]),
                                             ("step", [1.0, 1.0, 0.1]), ("none", [1.0, 1.0, 1.0])])
def test_warmup_ramps_linearly_then_the_schedule_starts_at_the_full_lr(schedule, after):
    cfg = load_config(None, ["train.lr=0.3", "train.epochs=6", "train.warmup_epochs=3", f"train.schedule={schedule}",
                             "train.step_size=2"]).train
    optimizer = make_optimizer(_tiny(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.3 * f for f in [1 / 4, 2 / 4, 3 / 4, *after]]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    plain = load_config(None, ["train.lr=0.3", "train.epochs=6", f"train.schedule={schedule}"]).train
    assert type(make_scheduler(make_optimizer(_tiny(), plain), plain)) is not type(scheduler)   # 0: unchanged


def test_label_smoothing_gives_torchs_smoothed_loss():
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = _tiny()
    with torch.no_grad():
        plain, smoothed = F.cross_entropy(model(x), y), F.cross_entropy(model(x), y, label_smoothing=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_epoch(model, [(x, y)], optimizer, "cpu", progress=False, label_smoothing=0.2)
    assert loss == pytest.approx(smoothed.item(), rel=1e-6) and abs(loss - plain.item()) > 1e-3


def test_grad_clip_bounds_the_global_norm_before_each_step():
    from ntdist.training.loop import grad_clipper
    x, y = torch.randn(16, 6) * 50, torch.randint(0, 3, (16,))
    norms = []
    for clip, precision in ((None, "fp32"), (0.1, "fp32"), (0.1, "fp16")):   # fp16: the scaler's grads unscaled first
        model = _tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = optimizer.step

        def spy(*args, **kwargs):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            return step(*args, **kwargs)
        optimizer.step = spy
        Precision(precision, "cpu").backward_step(F.cross_entropy(model(x), y), optimizer,
                                                  clip=grad_clipper(clip, model.parameters()))
    assert norms[0] > 0.3 and norms[1:] == pytest.approx([0.1, 0.1], rel=1e-4)
    assert grad_clipper(0, []) is None and grad_clipper(None, []) is None


def test_vectorised_adamw_with_clip_equals_sequential_in_float64(tmp_path):
    torch.set_default_dtype(torch.float64)
    try:
        run = make_run(tmp_path, "model.kwargs.width=16", "fusion.k=2", "train.epochs=2", "data.batch_size=32",
                       "data.train_fraction=0.1", "train.vectorize=on", *RECIPE)
        double = {split: TensorDataset(torch.stack([s[0] for s in data]).double(), torch.stack([s[1] for s in data]))
                  for split, data in (("train", run.splits.train), ("val", run.splits.val), ("test", run.splits.test))}
        run = dataclasses.replace(run, splits=dataclasses.replace(run.splits, **double))
        seeds = [member_seed(run.cfg.train, i) for i in (0, 1)]
        models = [build_member(run.spec, s) for s in seeds]
        batches = member_batches(run, seeds)
        assert isinstance(batches[0], TensorBatches) and why_not(run, models, batches) is None
        together = train_together(run, [0, 1], seeds, models, batches)
        alone_run = dataclasses.replace(run, rundir=make_run(tmp_path / "alone", "model.kwargs.width=16").rundir)
        for i in (0, 1):
            alone, history = members.train_member(alone_run, i)
            model, vector_history = together[i]
            for (key, a), b in zip(alone.state_dict().items(), model.state_dict().values()):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"member {i} {key}")
            assert abs(history[-1]["loss"] - vector_history[-1]["loss"]) < 1e-6
            assert [h["lr"] for h in history] == [h["lr"] for h in vector_history] == pytest.approx([0.005, 0.01])
        assert not torch.equal(*[next(together[i][0].parameters()) for i in (0, 1)])   # own seeds
    finally:
        torch.set_default_dtype(torch.float32)


def test_stopped_inside_an_epoch_then_resumed_is_bit_identical_with_the_recipe(tmp_path, monkeypatch):
    import ntdist.training.resume as resume
    from ntdist.errors import Preempted
    from ntdist.records.checkpoint import read_checkpoint
    from ntdist.training.batches import train_batches

    args = ["model.kwargs.width=16", "train.epochs=3", "data.batch_size=16", "data.train_fraction=0.1",
            "train.checkpoint_every_steps=2", *RECIPE]
    whole_run = make_run(tmp_path / "whole", *args)
    whole, whole_history = members.train_member(whole_run, 0)
    checkpoints = (len(train_batches(whole_run.splits.train, 16, 0)) - 1) // 2   # inside each epoch
    assert checkpoints >= 2
    calls = []   # the first stop request: batch 4 of epoch 2 of 3, past the warm-up
    monkeypatch.setattr(resume, "preempt_requested", lambda: calls.append(1) or len(calls) == checkpoints + 2)
    cut = make_run(tmp_path / "cut", *args)
    with pytest.raises(Preempted, match="at batch 4 of epoch 2"):
        members.train_member(cut, 0)
    cut.rundir.release()
    extra = read_checkpoint(cut.rundir.member_state(0))[2]
    assert any(k.endswith(".exp_avg_sq") for k in extra) and any(k.endswith(".step") for k in extra)   # AdamW's
    monkeypatch.setattr(resume, "preempt_requested", lambda: False)
    resumed, resumed_history = members.train_member(make_run(tmp_path / "cut", *args, resume=True), 0)
    timing = ("samples_per_s", "peak_device_mib")
    assert [{k: v for k, v in h.items() if k not in timing} for h in resumed_history] == \
        [{k: v for k, v in h.items() if k not in timing} for h in whole_history]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_finetuning_trains_the_recipe_as_a_torch_loop(tmp_path):
    from ntdist.stages.finetune import finetune
    from ntdist.training.batches import feed, train_batches

    run = make_run(tmp_path, "model.kwargs.width=16", "data.train_fraction=0.1", "finetune.epochs=2",
                   *[key.replace("train.", "finetune.") for key in RECIPE])
    model = build_member(run.spec, 3)
    reference = build_member(run.spec, 3)
    history = finetune(run, model, "nt", seed=7)
    assert [h["lr"] for h in history] == pytest.approx([0.005, 0.01])   # half the LR in the warm-up epoch
    decay = [p for p in reference.parameters() if p.ndim > 1]
    flat = [p for p in reference.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": flat, "weight_decay": 0.0}], lr=0.01,
                                  betas=(0.8, 0.99), weight_decay=0.05)
    loader = train_batches(run.splits.train, run.cfg.data.batch_size, 7, **feed(run.cfg.data, "cpu"))
    for epoch, lr in ((1, 0.005), (2, 0.01)):
        loader.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(reference(x), y, label_smoothing=0.1).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_vectorised_members_resume_their_adamw_state_bit_identically(tmp_path, monkeypatch):
    import ntdist.stages.vectorized as vectorized
    from ntdist.errors import Preempted

    args = ["model.kwargs.width=16", "fusion.k=2", "train.epochs=3", "train.vectorize=on", "data.train_fraction=0.1",
            *RECIPE]
    whole = members.train_members(make_run(tmp_path / "whole", *args), [0, 1], {})
    monkeypatch.setattr(vectorized, "preempt_requested", lambda: True)   # stop after epoch 1, in the warm-up
    cut = make_run(tmp_path / "cut", *args)
    with pytest.raises(Preempted, match="after epoch 1"):
        members.train_members(cut, [0, 1], {})
    cut.rundir.release()
    monkeypatch.setattr(vectorized, "preempt_requested", lambda: False)
    calls = []
    monkeypatch.setattr(members, "train_member", lambda *a: calls.append(a))   # must resume vectorised
    resumed = members.train_members(make_run(tmp_path / "cut", *args, resume=True), [0, 1], {})
    assert calls == []
    for i in (0, 1):
        assert [h["lr"] for h in resumed[i][1]] == [h["lr"] for h in whole[i][1]]
        for key, value in whole[i][0].state_dict().items():
            assert torch.equal(value, resumed[i][0].state_dict()[key]), (i, key)
