"""`ntdist run --dry-run`: the plan of the quickstart, a ResNet-50 and a 1 B-parameter MLP on 1, 8 and 64 ranks
(built on meta: the 1 B model never takes its 4 GB), an impossible layout refused with a real run's line, the
cost model's arithmetic, and docs/PERFORMANCE.md's scale section equal to the command's output.

Run: .venv/bin/python -m pytest tests/unit/test_dryrun.py
"""

import os
import re

import pytest
import torch

from helpers import ROOT, ntdist
from ntdist.cli import main
from ntdist.commands.dryrun_plan import make_plan
from ntdist.config import load_config
from ntdist.data import load_synthetic_splits, synthetic_shapes
from ntdist.distributed import costs
from ntdist.distributed.launchers import free_port
from ntdist.distributed.layout import MemberLayout
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import save_checkpoint

CONFIGS = {"quickstart": ("configs/quickstart.yaml", []),
           "resnet50": ("configs/scale/resnet50_k16.yaml", []),
           "mlp_1b": ("configs/scale/mlp_1b_k16.yaml", [])}
SCALE_COMMANDS = [   # the commands whose output docs/PERFORMANCE.md shows, in its order
    ["run", "configs/scale/resnet50_k16.yaml", "--dry-run", "--world-size", "64", "--gpus-per-node", "8"],
    ["run", "configs/scale/mlp_1b_k16.yaml", "--dry-run", "--world-size", "64", "--gpus-per-node", "8"]]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@pytest.mark.parametrize("ranks", [1, 8, 64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dry_run_prints_the_plan(capsys, name, ranks):
    path, overrides = CONFIGS[name]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    assert main(["run", path, *overrides, "--dry-run", "--world-size", str(ranks), "--gpus-per-node", "8"]) == 0
    assert _status("VmHWM") - before < 2 ** 30, "a dry run built a model for real"   # the 1 B MLP is 4 GB
    out = capsys.readouterr().out
    cfg = load_config(path, overrides)
    k, batch = cfg.fusion.k, cfg.data.batch_size
    assert out.startswith(f"dry run of {path} on {ranks} rank")
    for section in ("model ", "data ", "layout ", "fusion ", "finetune ", "memory ", "peak ", "host ", "files "):
        assert re.search(rf"^{section}", out, re.M), section
    assert f"global batch {ranks} x {batch} = {ranks * batch}" in out
    layout = MemberLayout(k, ranks)
    if ranks >= k:
        assert f"member 0: ranks {'0' if layout.group_size == 1 else f'0-{layout.group_size - 1}'}, holder 0" in out
    else:
        assert f"rank 0: members 0-{len(layout.members_of(0)) - 1}" in out
    if ranks > 1 and cfg.fusion.schedule == "recursive":
        assert "round 1: " in out and f"to each of {ranks - 1} ranks" in out
    if ranks == 1:
        assert "nothing moves" in out
    assert "activations: the tensors one training forward" in out


def test_the_one_billion_parameter_member_is_read_on_meta():
    plan = make_plan("configs/scale/mlp_1b_k16.yaml", [], 64)
    assert plan.size.params > 10 ** 9 and plan.size.state_bytes == plan.size.params * 4
    assert plan.activations is not None and plan.activations > 0


def test_an_impossible_layout_is_refused_with_the_line_a_real_run_gives(capsys):
    args = ["run", "configs/quickstart.yaml", "fusion.k=3", "distributed.rendezvous_timeout_s=5"]
    real = ntdist(*args, env={"RANK": "0", "WORLD_SIZE": "64", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8",
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}, timeout=60)
    assert main([*args, "--dry-run", "--world-size", "64"]) == 2
    dry = capsys.readouterr().err.strip()
    assert real.returncode == 2 and real.stderr.strip().splitlines()[-1] == dry
    assert dry == "ntdist: error: 64 ranks cannot train 3 members: with at least as many ranks as members the " \
                  "ranks must split evenly (64 % 3 = 1); use 63 or 66 ranks, or fewer ranks than members, or set " \
                  "fusion.k to a divisor of 64"


def test_a_bad_config_is_refused_as_a_real_run_refuses_it(capsys):
    assert main(["run", "configs/quickstart.yaml", "fusion.k=1", "--dry-run", "--world-size", "8"]) == 2
    assert "fusion.k must be at least 2" in capsys.readouterr().err
    assert main(["run", "configs/quickstart.yaml", "--world-size", "8"]) == 2   # only with --dry-run
    assert "--dry-run" in capsys.readouterr().err


def test_a_sweep_checks_every_points_layout(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("fusion: {methods: [nt]}\nsweep: {fusion.k: [2, 3]}\n")
    assert main(["run", str(path), "--dry-run", "--world-size", "4"]) == 2
    assert capsys.readouterr().err.startswith("ntdist: error: sweep point 2 of 2 (fusion.k=3): 4 ranks cannot train "
                                              "3 members")
    assert main(["run", str(path), "--dry-run", "--world-size", "6"]) == 0
    assert "sweep of 2 runs, each checked (1 distinct setting of the checks: runs that differ only in keys" \
        in capsys.readouterr().out.replace("\n          ", " ")


def test_synthetic_shapes_are_the_synthetic_splits():
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_samples=1000", "data.synthetic_shape=[3,4]",
                             "data.train_fraction=0.5"]).data
    real, meta = load_synthetic_splits(cfg), synthetic_shapes(cfg)
    for split in ("train", "val", "test"):
        assert len(getattr(real, split)) == len(getattr(meta, split)), split
    assert real.in_shape == meta.in_shape and real.num_classes == meta.num_classes


def test_tree_rounds_follow_the_layout():
    size = costs.MemberSize(params=10, param_bytes=40, state_bytes=48, tensors=3, param_tensors=2, small_bytes=48,
                            largest_bytes=40, widest=4)
    rounds = costs.tree_rounds(MemberLayout(4, 8), size)   # holders 0, 2, 4, 6
    assert [r.links for r in rounds] == [((2, 0), (6, 4)), ((4, 0),), ()]
    assert rounds[0].sent == {2: 72, 6: 72} and rounds[0].received == {0: 72, 4: 72}   # 48 + 8 x 3 header
    assert rounds[-1].sent == {0: 72} and len(rounds[-1].received) == 7
    local = costs.tree_rounds(MemberLayout(4, 2), size)   # holders 0, 0, 1, 1: round 1 stays on each rank
    assert [r.links for r in local] == [(), ((1, 0),), ()]
    assert costs.average_rounds(MemberLayout(4, 1), size) == []
    peaks = costs.tree_peaks(MemberLayout(4, 4), size)   # rank 0 fuses twice, rank 2 once, ranks 1, 3 send
    work = round(costs.NT_PAIR_WORK * 40)
    assert peaks == {0: 3 * 48 + work, 1: 48 + 48, 2: 2 * 48 + work, 3: 48 + 48}


def test_checkpoint_sizes_are_within_a_tenth_of_the_files(tmp_path):
    spec = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 32, "depth": 2})
    model = spec.build()
    history = [{"stage": "member", "member": 0, "epoch": e, "loss": 0.1234567891234, "val_accuracy": 0.9876543210,
                "lr": 0.05, "samples_per_s": 1234.5678901234} for e in range(10)]
    save_checkpoint(str(tmp_path / "m.safetensors"), model, spec, info={"stage": "member", "history": history})
    predicted = costs.checkpoint_bytes(costs.MemberSize.of(model), epochs=10)
    assert abs(os.path.getsize(tmp_path / "m.safetensors") - predicted) <= 0.1 * predicted


def test_activations_on_meta_equal_those_of_a_cpu_forward():
    from ntdist.commands.dryrun_plan import activation_bytes
    spec = ModelSpec("lenet", {"in_channels": 1, "image_size": 28, "num_classes": 10})
    with torch.device("meta"):
        meta = spec.build()
    assert activation_bytes(meta, (1, 28, 28), 2) == activation_bytes(spec.build(), (1, 28, 28), 2)


def test_the_scale_section_of_the_performance_page_is_the_commands_output(capsys):
    with open(os.path.join(ROOT, "docs", "PERFORMANCE.md")) as f:
        page = f.read()
    for args in SCALE_COMMANDS:
        assert main(list(args)) == 0
        block = f"$ ntdist {' '.join(args)}\n{capsys.readouterr().out}```"
        assert block in page, f"docs/PERFORMANCE.md shows another output of: ntdist {' '.join(args)}"
