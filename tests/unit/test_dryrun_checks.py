"""`ntdist run --dry-run` makes the checks a real run makes before training, with the run's one line and exit 2
(a model that does not run, gives no score per class, cannot be fused or ties its weights; member files that do
not fit; a member split that meets members trained elsewhere), on the CPU for a small member and on meta for a
large one (a forward that cannot run on meta is reported unchecked, not refused); a sweep's every point, each
distinct setting of the checks once, a failing point named; and its estimates count the configured optimizer's
state: 2, 1 or 0 buffers per parameter in memory, and in a state file AdamW's step counts too.

Run: .venv/bin/python -m pytest tests/unit/test_dryrun_checks.py
"""

import re

import pytest
import torch

from ntdist.cli import main
from ntdist.commands import dryrun_plan
from ntdist.commands.dryrun import render, size_text
from ntdist.commands.dryrun_plan import make_plan
from ntdist.config import load_config
from ntdist.distributed import costs
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import save_checkpoint
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.state import save_state

MISTAKES = "model.name=userpkg.mistakes:"
TINY = "train: {epochs: 1}\nfinetune: {epochs: 0, control: false}\nfusion: {k: 2, methods: [nt]}\n" \
       "distributed: {threads_per_rank: 1}\n"


def both_refuse(tmp_path, capsys, *overrides) -> str:
    """The line a real run and the dry run print for `overrides` on a tiny config; both must exit 2 with it."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    args = ["run", str(config), f"output.dir={tmp_path / 'run'}", *overrides]
    assert main(args) == 2
    real = capsys.readouterr().err.strip()
    assert main([*args, "--dry-run", "--world-size", "2"]) == 2
    dry = capsys.readouterr().err.strip()
    assert len(real.splitlines()) == 1 and real.startswith("ntdist: error: "), real
    assert dry == real
    return dry


@pytest.mark.parametrize("overrides, words", [
    ([MISTAKES + "gru"], "model.name 'userpkg.mistakes:gru' cannot be fused with nt: cannot fuse layer 'rnn'"),
    ([MISTAKES + "shared_weight"], "SharedWeight ties its weights: 'b.weight' is the same tensor as 'a.weight'"),
    ([MISTAKES + "three_classes"], "gives an output of shape [2, 3] for 2 inputs, but the data have 10 classes"),
    ([MISTAKES + "float64"], "has torch.float64 parameters ('1.weight')"),
    (["model.name=torchvision:resnet18"], "model.name 'torchvision:resnet18' does not run on inputs of shape "
                                          "[2, 1, 8, 8]: in layer 'conv1' (Conv2d) raised RuntimeError"),
])
def test_a_model_the_run_refuses_fails_the_dry_run_with_the_runs_line(tmp_path, capsys, overrides, words):
    assert words in both_refuse(tmp_path, capsys, *overrides)


@pytest.mark.parametrize("model", ["gru", "shared_weight"])
def test_a_large_member_is_checked_on_meta_with_the_same_line(tmp_path, capsys, monkeypatch, model):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    args = ["run", str(config), f"output.dir={tmp_path / 'run'}", MISTAKES + model]
    assert main(args) == 2
    real = capsys.readouterr().err.strip()
    built, build = [], dryrun_plan.build_member

    def recorded(*args, **kwargs):
        model = build(*args, **kwargs)
        built.append({t.device.type for t in model.state_dict().values()})
        return model

    monkeypatch.setattr(dryrun_plan, "CHEAP_BYTES", 0)   # every member counts as large
    monkeypatch.setattr(dryrun_plan, "build_member", recorded)
    assert main([*args, "--dry-run", "--world-size", "2"]) == 2
    assert capsys.readouterr().err.strip() == real
    assert built == [{"meta"}]   # member 0 on meta only: the checks ran there


def test_a_large_member_whose_forward_cannot_run_on_meta_is_left_unchecked_not_refused(tmp_path, capsys,
                                                                                        monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    args = ["run", str(config), MISTAKES + "reads_a_value", "fusion.methods=[avg]", "--dry-run"]
    assert main(args) == 0   # small: built on the CPU, where its forward runs
    assert "not checked" not in capsys.readouterr().out
    monkeypatch.setattr(dryrun_plan, "CHEAP_BYTES", 0)
    assert main(args) == 0
    out = capsys.readouterr().out.replace("\n          ", " ")
    assert "not checked: the model's forward and fusability (they do not run on meta: Tensor.item() cannot be " \
           "called on meta tensors)" in out


def test_member_files_that_do_not_fit_fail_the_dry_run_with_the_runs_line(tmp_path, capsys):
    spec = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 8}, (1, 8, 8))
    paths = [str(tmp_path / f"m{i}.safetensors") for i in range(2)]
    for path in paths:
        save_checkpoint(path, spec.build(), spec)
    err = both_refuse(tmp_path, capsys, f"fusion.members=[{','.join(paths)}]", "model.kwargs.width=16")
    assert "m0.safetensors" in err
    err = both_refuse(tmp_path, capsys, f"fusion.members=[{','.join(paths)}]", "model.kwargs.width=8",
                      "data.member_split=classes")
    assert "data.member_split=classes deals the training set out" in err


def test_a_config_that_passes_says_where_its_checks_ran(tmp_path, capsys, monkeypatch):
    assert main(["run", "configs/quickstart.yaml", "--dry-run", "--world-size", "2"]) == 0
    assert "checks  passed: the checks ntdist run makes before training (member 0 built on the CPU)" \
        in capsys.readouterr().out
    monkeypatch.setattr(dryrun_plan, "CHEAP_BYTES", 0)
    assert main(["run", "configs/quickstart.yaml", "--dry-run", "--world-size", "2"]) == 0
    assert "(member 0 on meta: a 13.9 kB member is not built)" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["gru", "three_classes"])
def test_a_sweep_point_the_run_refuses_fails_the_dry_run_named(tmp_path, capsys, model):
    alone = both_refuse(tmp_path, capsys, f"{MISTAKES}{model}").removeprefix("ntdist: error: ")   # a run of its own
    config = tmp_path / "sweep.yaml"
    config.write_text(TINY + f"sweep: {{model.name: [mlp, '{MISTAKES[11:]}{model}']}}\n")
    assert main(["run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ntdist: error: sweep point 2 of 2 ({MISTAKES}{model}): {alone}"


def test_points_that_differ_only_in_keys_no_check_reads_share_one_check(tmp_path, capsys, monkeypatch):
    built, checked = [], []
    build, check = dryrun_plan.build_member, dryrun_plan.check_template
    monkeypatch.setattr(dryrun_plan, "build_member", lambda *args: built.append(args[0]) or build(*args))
    monkeypatch.setattr(dryrun_plan, "check_template",
                        lambda cfg, *args: checked.append(cfg.model.kwargs["width"]) or check(cfg, *args))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    assert main(["run", str(config), "model.kwargs.width=8", "--dry-run"]) == 0
    once, built[:], checked[:] = len(built), [], []   # the builds of one run's checks
    config.write_text(TINY + "sweep: {model.kwargs.width: [8, 16], train.lr: [0.05, 0.1]}\nseeds: [0, 1]\n")
    assert main(["run", str(config), "--dry-run"]) == 0
    assert checked == [8, 16] and len(built) == 2 * once   # 8 points, 2 widths: lr and seed change no check
    assert "sweep of 8 runs, each checked (2 distinct settings of the checks" \
        in capsys.readouterr().out.replace("\n          ", " ")


OPTIMIZERS = [("adamw", "0.9", 2), ("sgd", "0.9", 1), ("sgd", "0", 0)]


@pytest.mark.parametrize("optimizer, momentum, buffers", OPTIMIZERS)
def test_the_estimate_counts_the_optimizers_buffers(optimizer, momentum, buffers):
    other = {"adamw": "sgd", "sgd": "adamw"}[optimizer]   # fine-tuning with another optimizer: counted apart
    plan = make_plan("configs/quickstart.yaml", [f"train.optimizer={optimizer}", f"train.momentum={momentum}",
                                                 f"finetune.optimizer={other}"], 1)
    assert len(plan.cfg.train.state_buffers) == buffers
    param_bytes = plan.size.param_bytes
    terms = dict(costs.step_memory(plan.size, 0, buffers=len(plan.cfg.train.state_buffers)))
    assert terms.get("optimizer state", 0) == buffers * param_bytes
    text = render(plan, "configs/quickstart.yaml").replace("\n          ", " ")
    train = re.search(r"^        member training: (weights .*)$", text, re.M).group(1)
    tune = re.search(r"^        fine-tuning: (weights .*)$", text, re.M).group(1)
    state = f"optimizer state {size_text(buffers * param_bytes)}"
    assert (state in train) == (buffers > 0) and ("optimizer state" in train) == (buffers > 0), train
    other_buffers = 2 if other == "adamw" else 1
    assert f"optimizer state {size_text(other_buffers * param_bytes)}" in tune, tune
    words = {"adamw": "adamw: 2 (exp_avg, exp_avg_sq)", "sgd": "sgd with momentum 0.9: 1 (momentum_buffer)"}
    said = "sgd without momentum: none" if buffers == 0 else words[optimizer]
    assert f"member training {said}; fine-tuning {words[other]}" in text


def test_deepspeed_divides_the_optimizer_state():
    size = costs.MemberSize(params=10, param_bytes=400, state_bytes=480, tensors=3, param_tensors=2, small_bytes=480,
                            largest_bytes=400, widest=4)
    terms = dict(costs.deepspeed_memory(size, 0, 4, 1, "fp32", buffers=2))
    assert terms["optimizer state"] == 2 * 400 // 4
    assert "optimizer state" not in dict(costs.deepspeed_memory(size, 0, 4, 1, "fp32", buffers=0))


@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0), ("sgd", 0.9), ("adamw", 0.9)])
def test_the_state_file_estimate_is_the_size_of_a_real_one(tmp_path, optimizer, momentum):
    spec = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 2}, (1, 8, 8))   # small tensors: the
    cfg = load_config(None, [f"train.optimizer={optimizer}", f"train.momentum={momentum}"]).train   # per-tensor
    model = spec.build()                                                                          # entries weigh
    optim = make_optimizer(model, cfg)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optim.step()   # torch creates the state at the first step
    path = tmp_path / "member0.state.safetensors"
    save_state(str(path), model, spec, optim, make_scheduler(optim, cfg), 0, [])
    estimate = costs.state_file_bytes(costs.MemberSize.of(model), len(cfg.state_buffers), len(cfg.state_scalars), 0)
    assert abs(estimate - path.stat().st_size) < 0.05 * path.stat().st_size, (estimate, path.stat().st_size)
