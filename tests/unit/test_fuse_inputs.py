"""`ntdist fuse` on what users bring: a 1-D model whose input shape no kwarg tells, the kwargs stored in its
checkpoints, an -o that is a folder, and state dicts wrapped by DDP, Lightning or torch.compile.

Run: .venv/bin/python -m pytest tests/unit/test_fuse_inputs.py
"""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ntdist.cli import main
from ntdist.errors import UserError
from ntdist.fusion import fuse
from ntdist.models import ModelSpec, build_model
from ntdist.records.checkpoint import load_model, save_checkpoint

CONV1D = "userpkg.models:conv1d_net"
KWARGS = {"num_classes": 10, "width": 8}


@pytest.fixture
def conv1d_members(tmp_path):
    """Two conv1d_net members saved as ntdist checkpoints whose metadata hold no input shape (as ntdist
    wrote them before it stored one)."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"member{seed}.safetensors"))
        save_checkpoint(paths[-1], build_model(CONV1D, KWARGS), ModelSpec(CONV1D, KWARGS))
    return paths


def test_a_1d_model_without_a_known_input_is_one_line_naming_the_layer(tmp_path, conv1d_members, capsys):
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "--model", CONV1D, "-o", out, *conv1d_members]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "in layer '0' (Conv1d)" in err and "--input-shape" in err and "--data" in err
    assert "num_classes" not in err                     # the stored kwargs were used
    assert not os.path.exists(out)


@pytest.mark.parametrize("how", [["--input-shape", "1,40"], ["data.name=synthetic", "data.synthetic_shape=[1,40]"],
                                 ["--data", "data.name=synthetic", "data.synthetic_shape=[1,40]"]])
def test_the_input_shape_comes_from_a_flag_or_the_data_and_the_stored_kwargs_are_kept(tmp_path, conv1d_members,
                                                                                      how):
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "--model", CONV1D, "-o", out, *how, *conv1d_members]) == 0
    fused, meta = load_model(out, expect_spec=ModelSpec(CONV1D, KWARGS))
    assert meta["model"]["kwargs"] == KWARGS and meta["input_shape"] == [1, 40]


def test_a_checkpoint_that_stores_its_input_shape_needs_no_flag(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"member{seed}.safetensors"))
        save_checkpoint(paths[-1], build_model(CONV1D, KWARGS), ModelSpec(CONV1D, KWARGS, (1, 40)))
    assert main(["fuse", "--model", CONV1D, "-o", str(tmp_path / "f.safetensors"), *paths]) == 0


def test_fusion_refuses_example_inputs_that_do_not_fit_in_one_line(capsys):
    models = [build_model(CONV1D, KWARGS) for _ in range(2)]
    with pytest.raises(UserError, match=r"do not fit Sequential at layer '0' \(RuntimeError: Expected") as err:
        fuse(models, "nt", example_inputs=torch.zeros(2, 3, 32, 32))
    assert "\n" not in str(err.value) and "Traceback" not in capsys.readouterr().err


def test_an_output_folder_receives_fused_safetensors(tmp_path, conv1d_members, capsys):
    shape = ["--input-shape", "1,40", "--model", CONV1D]
    new = tmp_path / "new" / "outdir"
    assert main(["fuse", *shape, "-o", f"{new}/", *conv1d_members]) == 0            # mergekit style: created
    assert load_file(str(new / "fused.safetensors"))
    assert main(["fuse", *shape, "-o", str(new), *conv1d_members]) == 2             # an existing folder: the same file
    assert "fused.safetensors' exists; pass --force" in capsys.readouterr().err
    assert main(["fuse", *shape, "-o", str(new), "--force", *conv1d_members]) == 0
    wrong = str(tmp_path / "wrong.safetensors")
    save_checkpoint(wrong, build_model(CONV1D, {"num_classes": 10, "width": 4}), ModelSpec(CONV1D, KWARGS))
    assert main(["fuse", *shape, "-o", f"{tmp_path / 'never'}/", conv1d_members[0], wrong]) == 2
    assert "'0.weight' has shape [4, 1, 5], the model [8, 1, 5]" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()                                        # a failure leaves no folder


def _wrapped(state, how, path):
    """`state` saved at `path` as a training wrapper would save it."""
    if how == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif how == "lightning":
        torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {f"model.{k}": v for k, v in state.items()},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
                    "lr_schedulers": [], "hyper_parameters": {"lr": 0.1}}, path)
    elif how == "compiled_ddp":
        save_file({f"_orig_mod.module.{k}": v.contiguous() for k, v in state.items()}, path)
    else:
        save_file({f"{how}.{k}": v.contiguous() for k, v in state.items()}, path)


@pytest.mark.parametrize("how, suffix", [("ddp", "pt"), ("lightning", "ckpt"), ("compiled_ddp", "safetensors")])
def test_wrapper_prefixes_are_removed(tmp_path, how, suffix):
    kwargs = {"input_dim": 64, "num_classes": 10, "width": 8}
    models, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model("mlp", kwargs))
        paths.append(str(tmp_path / f"m{seed}.{suffix}"))
        _wrapped(models[-1].state_dict(), how, paths[-1])
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "--model", "mlp", "--model-kwargs", '{"width": 8}', "data.name=digits", "fusion.repair=none",
                 "-o", out, *paths]) == 0      # --data would repair NT: the plain fusion is compared
    expected = fuse(models, "nt", example_inputs=torch.zeros(2, 64))
    assert set(load_file(out)) == set(expected.state_dict())
    assert all(torch.equal(load_file(out)[k], v) for k, v in expected.state_dict().items())


def test_an_unknown_prefix_is_refused_naming_it(tmp_path, capsys):
    paths = []
    for seed in (0, 1):
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        _wrapped(build_model("mlp", {"input_dim": 64, "num_classes": 10, "width": 8}).state_dict(), "backbone",
                 paths[-1])
    assert main(["fuse", "--model", "mlp", "--model-kwargs", '{"input_dim": 64, "num_classes": 10, "width": 8}',
                 "-o", str(tmp_path / "f.safetensors"), *paths]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every key starts with 'backbone.'" in err and "without it the keys fit" in err


def test_a_wrapped_model_beside_tensors_of_its_own_is_named(tmp_path, capsys):
    state = build_model("mlp", {"input_dim": 64, "num_classes": 10, "width": 8}).state_dict()
    paths = [str(tmp_path / f"m{i}.ckpt") for i in range(2)]
    for path in paths:   # a Lightning module holding the model and a weighted loss
        torch.save({"state_dict": {**{f"model.{k}": v for k, v in state.items()}, "loss_fn.weight": torch.ones(10)}},
                   path)
    assert main(["fuse", "--model", "mlp", "--model-kwargs", '{"input_dim": 64, "num_classes": 10, "width": 8}',
                 "-o", str(tmp_path / "f.safetensors"), *paths]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "carry the prefix 'model.', beside 1 other tensors ('loss_fn.weight')" in err
