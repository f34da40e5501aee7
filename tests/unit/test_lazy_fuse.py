"""`ntdist fuse --lazy`: members read and the result written one tensor at a time, bit for bit the normal fuse.

Run: .venv/bin/python -m pytest tests/unit/test_lazy_fuse.py
"""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ntdist.cli import main
from ntdist.commands.bench import peak_extra_memory
from ntdist.models import ModelSpec, build_model
from ntdist.records.checkpoint import load_model, save_checkpoint

SMALL = {"input_dim": 20, "width": 32, "depth": 3, "num_classes": 5}
BIG = {"input_dim": 512, "width": 1024, "depth": 14, "num_classes": 10}   # 14 layers of 2-4 MB: 54 MB a member
BOUND = 1.0   # lazy fusion's peak extra memory, in members' sizes (the normal fuse holds every member and the result)


def members(root, kwargs, count, plain=False):
    """`count` seeded MLP members as ntdist checkpoints (or plain state dicts); their paths."""
    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_model("mlp", kwargs)
        paths.append(str(root / f"member{seed}.safetensors"))
        if plain:
            save_file({f"module.{k}": v for k, v in model.state_dict().items()}, paths[-1])
        else:
            save_checkpoint(paths[-1], model, ModelSpec("mlp", kwargs, (kwargs["input_dim"],)))
    return paths


def same_files(a, b) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("flags", [["--method", "nt"], ["--method", "avg"],
                                   ["--method", "nt", "--importance", "l1", "--schedule", "flat"]])
def test_lazy_fusion_equals_the_normal_fuse(tmp_path, flags):
    paths = members(tmp_path, SMALL, 3 if "flat" in flags else 2)
    eager, lazy = str(tmp_path / "eager.safetensors"), str(tmp_path / "lazy.safetensors")
    assert main(["fuse", *paths, "-o", eager, *flags]) == 0
    assert main(["fuse", *paths, "-o", lazy, "--lazy", *flags]) == 0
    assert same_files(eager, lazy)
    model, meta = load_model(lazy)   # an ntdist checkpoint with its spec, like the normal fuse's
    assert meta["info"]["lazy"] and model(torch.zeros(1, SMALL["input_dim"])).shape == (1, 5)


def test_plain_state_dicts_with_a_wrapper_prefix_fuse_lazily(tmp_path):
    paths = members(tmp_path, SMALL, 2, plain=True)
    model = ["--model", "mlp", "--model-kwargs", '{"input_dim": 20, "width": 32, "depth": 3, "num_classes": 5}']
    outs = [str(tmp_path / f"{name}.safetensors") for name in ("eager", "lazy")]
    assert main(["fuse", *paths, "-o", outs[0], *model]) == 0
    assert main(["fuse", *paths, "-o", outs[1], *model, "--lazy"]) == 0
    assert same_files(*outs)


def test_what_needs_the_whole_models_is_refused_in_one_line(tmp_path, capsys):
    paths = members(tmp_path, SMALL, 3)
    torch.save(build_model("mlp", SMALL).state_dict(), tmp_path / "member.pt")
    out = str(tmp_path / "out.safetensors")
    for flags, expected in ((["--method", "ot"], "not ot"), (["--dedup"], "fusion.dedup"),
                            (["--calibration", str(tmp_path / "x.pt")], "--calibration"),
                            (["--width", "16"], "fusion.width"), ([paths[2]], "--schedule flat"),
                            (["--model", "mlp", "--model-kwargs", '{"input_dim": 20}', str(tmp_path / "member.pt")],
                             "reads .safetensors files")):
        given = paths[:1] if "member.pt" in flags[-1] else paths[:2]
        assert main(["fuse", *given, "-o", out, "--lazy", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not os.path.exists(out)


def test_lazy_fusion_peak_memory_stays_near_one_member(tmp_path):
    paths = members(tmp_path, BIG, 2)
    size = os.path.getsize(paths[0])
    assert size > 50e6
    lazy, eager = str(tmp_path / "lazy.safetensors"), str(tmp_path / "eager.safetensors")
    lazy_peak = peak_extra_memory(lambda: main(["fuse", *paths, "-o", lazy, "--lazy"]))
    eager_peak = peak_extra_memory(lambda: main(["fuse", *paths, "-o", eager]))
    assert same_files(lazy, eager)
    assert lazy_peak < BOUND * size, (lazy_peak, size)
    assert eager_peak > 2 * size > lazy_peak, (eager_peak, size)   # the bound is one the normal fuse breaks
