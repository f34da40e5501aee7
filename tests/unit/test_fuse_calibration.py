"""`ntdist fuse --calibration` with what users bring: other precisions, callables returning a DataLoader or bare
inputs, the inputs of --data, a model whose input shape only the calibration tells, a file much larger than the
inputs drawn from it, and the plausible mistakes, each one line with exit 2.

Run: .venv/bin/python -m pytest tests/unit/test_fuse_calibration.py
"""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ntdist.cli import main
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import load_model, save_checkpoint

SPEC = ModelSpec("mlp", {"input_dim": 12, "num_classes": 5, "width": 16, "depth": 2})
CAL = torch.randn(300, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def members(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(70 + seed)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_checkpoint(paths[-1], SPEC.build(), SPEC)
    return paths


def fuse_with(tmp_path, members, *args) -> str:
    """The file `ntdist fuse` wrote (or where it would have)."""
    out = str(tmp_path / "fused.safetensors")
    main(["fuse", "-o", out, "--force", *members, *args])
    return out


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ntdist: error:") and "Traceback" not in err, err
    return err


def saved(tmp_path, value, name="cal.pt") -> str:
    path = str(tmp_path / name)
    torch.save(value, path)
    return path


def test_unreadable_files_are_one_line(tmp_path, members, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    for path, says in [(str(tmp_path / "empty.pt"), "empty or cut short"), (str(tmp_path / "text.pt"), "torch.save"),
                       (saved(tmp_path, CAL.numpy(), "np.pt"), "numpy"),
                       (saved(tmp_path, CAL.to_sparse(), "sparse.pt"), "x.to_dense()")]:
        out = str(tmp_path / "fused.safetensors")
        assert main(["fuse", "-o", out, *members, "--calibration", path]) == 2, path
        assert says in one_line(capsys)
        assert not os.path.exists(out)


@pytest.mark.parametrize("value,says", [((CAL, torch.zeros(300)), "holds a tuple of 2 items"),
                                        ({"x": CAL}, "holds a dict (keys x)"),
                                        ((CAL * 40).abs().to(torch.uint8), "(raw images?)"),
                                        (torch.zeros(300, dtype=torch.long), "labels are not inputs"),
                                        (torch.zeros(300, 12, dtype=torch.long), "Long"),
                                        (torch.randn(50, 7), "must hold training inputs of the model's input shape")])
def test_the_wrong_content_is_named_in_one_line(tmp_path, members, capsys, value, says):
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "-o", out, *members, "--calibration", saved(tmp_path, value)]) == 2
    assert says in one_line(capsys)


def test_float64_inputs_repair_as_float32(tmp_path, members):
    expected, out = str(tmp_path / "f32.safetensors"), str(tmp_path / "f64.safetensors")
    assert main(["fuse", "-o", expected, *members, "--calibration", saved(tmp_path, CAL, "f32.pt")]) == 0
    assert main(["fuse", "-o", out, *members, "--calibration", saved(tmp_path, CAL.double())]) == 0
    assert all(torch.equal(load_file(out)[key], t) for key, t in load_file(expected).items())


@pytest.mark.parametrize("callable_, count", [("loader", 64), ("bare_inputs", 64)])
def test_a_callable_may_return_a_dataloader_or_bare_inputs(tmp_path, members, capsys, callable_, count):
    fuse_with(tmp_path, members, "--calibration", f"userpkg.calibration:{callable_}",
              f"fusion.calibration_samples={count}")
    assert f"repaired on {count} inputs" in capsys.readouterr().out


def test_a_dataset_of_dicts_is_one_line(tmp_path, members, capsys):
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "-o", out, *members, "--calibration", "userpkg.calibration:dict_items"]) == 2
    assert "gave an item that is a dict (keys x, y)" in one_line(capsys)


def test_the_inputs_of_data_repair_nt(tmp_path, members, capsys):
    data = ["--data", "data.name=synthetic", "data.synthetic_shape=[12]", "data.synthetic_classes=5",
            "data.synthetic_samples=300", "fusion.calibration_samples=100"]
    fused = load_file(fuse_with(tmp_path, members, *data))
    assert "repaired on 100 inputs" in capsys.readouterr().out
    plain = load_file(fuse_with(tmp_path, members, *data, "fusion.repair=none"))
    assert not all(torch.equal(fused[key], t) for key, t in plain.items())


@pytest.mark.parametrize("flags,why", [(["--method", "avg"], "avg is repaired only with fusion.repair=lstsq"),
                                       (["fusion.repair=none"], "fusion.repair=none"),
                                       (["--dedup"], "dedup and the torch_pruning pruner select differently")])
def test_calibration_that_repairs_nothing_is_said_in_one_line(tmp_path, members, capsys, flags, why):
    fuse_with(tmp_path, members, "--calibration", saved(tmp_path, CAL), *flags)
    out, err = capsys.readouterr()
    assert "repaired" not in out and err.count("\n") == 1, err
    assert err.startswith("ntdist fuse: note: the --calibration inputs were not used for a repair: ") and why in err


def test_the_calibration_inputs_give_the_input_shape(tmp_path):
    name, kwargs = "userpkg.models:conv1d_net", {"num_classes": 10, "width": 8}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_checkpoint(paths[-1], ModelSpec(name, kwargs).build(), ModelSpec(name, kwargs))
    cal = saved(tmp_path, torch.randn(64, 1, 40))
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "--model", name, "-o", out, "--calibration", cal, *paths]) == 0
    assert load_model(out, expect_spec=ModelSpec(name, kwargs))[1]["input_shape"] == [1, 40]


def _anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


def test_a_large_file_costs_only_the_inputs_drawn(tmp_path, monkeypatch):
    from ntdist.commands.calibration import read_calibration

    path = saved(tmp_path, torch.randn(250_000, 64, generator=torch.Generator().manual_seed(0)))   # 64 MB
    held, randperm = [], torch.randperm

    def measured(*args, **kwargs):     # the draw: what was loaded is held at this point
        held.append(_anonymous_bytes())
        return randperm(*args, **kwargs)

    monkeypatch.setattr(torch, "randperm", measured)
    before = _anonymous_bytes()
    inputs = read_calibration(path, 1000)
    assert inputs.shape == (1000, 64) and np.isfinite(inputs.numpy()).all()
    assert held and max(held) - before < 24 * 2 ** 20
