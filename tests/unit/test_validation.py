"""Bad input is refused before any work, with one line and exit 2: configs, state files, bench and fuse arguments.

Run: .venv/bin/python -m pytest tests/unit/test_validation.py
"""

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ntdist.cli import main
from ntdist.commands.bench import check_bench_args
from ntdist.config import MAX_CONFIG_BYTES, load_config, read_yaml
from ntdist.errors import UserError
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import load_model, read_checkpoint, save_checkpoint
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.config import TrainConfig
from ntdist.training.state import StateOwner, finished_history, load_state, save_state


@pytest.mark.parametrize("overrides, words", [
    (["fusion.keep_ratio=0"], "keep_ratio must be in \\(0, k\\]"),
    (["fusion.keep_ratio=2.5"], "keep_ratio must be in \\(0, k\\]"),
    (["fusion.width=0"], "fusion.width must be a positive"),
    (["fusion.width=-4"], "fusion.width must be a positive"),
    (["fusion.bn_batches=0"], "bn_batches"),
    (["finetune.deepspeed_config=/nonexistent/ds.json"], "deepspeed_config"),
    (["output.dir="], "output.dir is empty"),
    (["output.duplicate_threshold=5"], "duplicate_threshold"),
    (["train.momentum=-1"], "momentum"),
    (["finetune.weight_decay=-0.1"], "weight_decay"),
    (["finetune.temperature=0"], "temperature"),
    (["output.dir=  "], "output.dir is empty"),
])
def test_config_values_that_would_fail_after_training_fail_at_load(overrides, words):
    with pytest.raises(UserError, match=words):
        load_config(None, overrides)


def test_deepspeed_config_must_be_a_json_object(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a readable JSON object"):
        load_config(None, [f"finetune.deepspeed_config={bad}"])


def _config_cases(tmp):
    binary = tmp / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    big = tmp / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    bomb = tmp / "bomb.yaml"
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb.write_text("model:\n  name: mlp\n  kwargs:\n" + "".join(f"    {line}\n" for line in levels))
    dup = tmp / "dup.yaml"
    dup.write_text("train:\n  epochs: 3\n  epochs: 5\n")
    fifo = tmp / "fifo.yaml"
    os.mkfifo(fifo)
    return [(tmp, "is a folder"), (binary, "not a UTF-8 text file"), (big, "at most"), (bomb, "alias"),
            (dup, "appears twice"), (fifo, "not a regular file"), ("/dev/zero", "not a regular file")]


def test_configs_that_are_not_small_yaml_text_files_are_refused_at_once(tmp_path):
    for path, words in _config_cases(tmp_path):
        with pytest.raises(UserError, match=words) as err:
            read_yaml(str(path))
        assert "\n" not in str(err.value), path


def test_a_scalar_alias_is_still_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  lr: &lr 0.1\nfinetune:\n  lr: *lr\n")
    assert load_config(str(path)).finetune.lr == 0.1


def _state(tmp_path, epoch, history):
    model = torch.nn.Linear(4, 3)
    cfg = TrainConfig(epochs=3)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    path = str(tmp_path / "s.safetensors")
    spec = ModelSpec("mlp", {"input_dim": 4, "num_classes": 3})
    save_state(path, model, spec, optimizer, scheduler, epoch, history)
    return path, model, optimizer, scheduler


@pytest.mark.parametrize("epoch, history", [(10 ** 6, [{}]), (2, [{}]), (-1, []), (True, [{}]), (1, "x")])
def test_forged_state_metadata_is_refused(tmp_path, epoch, history):
    path, model, optimizer, scheduler = _state(tmp_path, epoch, history)
    with pytest.raises(UserError, match="damaged or forged"):
        load_state(path, model, optimizer, scheduler, 3)


def test_an_honest_state_loads(tmp_path):
    path, model, optimizer, scheduler = _state(tmp_path, 2, [{"epoch": 1}, {"epoch": 2}])
    assert load_state(path, model, optimizer, scheduler, 3) == (2, [{"epoch": 1}, {"epoch": 2}], None)


@pytest.mark.parametrize("change", [{"step": "3"}, {"epoch": 2}, {"loss_sums": [0.5, 1.0]}, {"replicas": 0}])
def test_a_forged_position_inside_an_epoch_is_refused(tmp_path, change):
    path, model, optimizer, scheduler = _state(tmp_path, 0, [])
    where = {"epoch": 1, "step": 3, "loss_sums": [6.5], "count": 12, "batch_size": 4, "replicas": 1}
    save_state(path, model, ModelSpec("mlp", {"input_dim": 4, "num_classes": 3}), optimizer, scheduler, 0, [],
               where, torch.arange(20))
    assert load_state(path, model, optimizer, scheduler, 3)[2]["step"] == 3
    save_state(path, model, ModelSpec("mlp", {"input_dim": 4, "num_classes": 3}), optimizer, scheduler, 0, [],
               {**where, **change}, torch.arange(20))
    with pytest.raises(UserError, match="damaged or forged"):
        load_state(path, model, optimizer, scheduler, 3)


def test_a_final_checkpoint_with_a_forged_history_is_refused(tmp_path):
    path = str(tmp_path / "member0.safetensors")
    save_checkpoint(path, torch.nn.Linear(4, 3), ModelSpec("mlp", {}), info={"epochs": 3, "history": [1, 2, 3]})
    owner = StateOwner("run", "training of member 0", 0, "torch.float32", 3)
    with pytest.raises(UserError, match="forged"):
        finished_history(path, owner, required=False)   # as in a run directory of a version without owners
    assert finished_history(path, replace(owner, epochs=4), required=False) is None


@pytest.mark.parametrize("widths, repeats, out, words", [
    ([0], 1, "x.csv", "--widths"), ([64, -1], 1, "x.csv", "--widths"), ([64], 0, "x.csv", "--repeats"),
    ([64], 1, ".", "is a folder"), ([64], 1, "missing/x.csv", "missing or not writable"),
])
def test_bench_arguments_are_checked_before_any_work(tmp_path, monkeypatch, widths, repeats, out, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=words):
        check_bench_args(widths, repeats, out)


def test_bench_refuses_a_folder_as_out_without_benchmarking(tmp_path, capsys):
    assert main(["bench", "fusion", "--widths", "64", "--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "is a folder" in err and "width" not in out   # no table: nothing was measured


def test_fuse_refuses_to_replace_a_file_without_force_and_bad_sizes(tmp_path, capsys):
    members = []
    for i in range(2):
        members.append(str(tmp_path / f"m{i}.safetensors"))
        torch.manual_seed(i)
        spec = ModelSpec("mlp", {"input_dim": 4, "width": 8, "depth": 1, "num_classes": 3})
        save_checkpoint(members[-1], spec.build(), spec)
    out = tmp_path / "fused.safetensors"
    out.write_bytes(b"precious")
    assert main(["fuse", "-o", str(out), *members]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"precious"
    for flags, words in ((["--width", "0"], "fusion.width"), (["--keep-ratio", "0"], "fusion.keep_ratio"),
                         (["-o", str(tmp_path)], "fused.safetensors' exists")):   # a folder: its fused.safetensors
        assert main(["fuse", "-o", str(tmp_path / "new.safetensors"), *flags, *members]) == 2
        assert words in capsys.readouterr().err
    assert main(["fuse", "--force", "-o", str(out), *members]) == 0
    assert read_checkpoint(str(out))[0]["info"]["method"] == "nt"


def test_a_fifo_in_place_of_a_checkpoint_is_named_as_such(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(UserError, match="not a regular file"):
        read_checkpoint(str(tmp_path / "pipe.safetensors"))


def _crafted(tmp_path, spec_dict, retype=None):
    """A checkpoint of a small MLP whose metadata says `spec_dict`, its first weight relabelled as `retype`."""
    spec = ModelSpec("mlp", {"input_dim": 4, "width": 8, "depth": 1, "num_classes": 3})
    path = str(tmp_path / "crafted.safetensors")
    save_checkpoint(path, spec.build(), spec)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["ntdist"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if retype is not None:
        key = next(k for k in tensors if k.endswith("weight"))
        tensors[key] = tensors[key].view(retype)            # same bytes, another dtype in the header
    meta["model"] = spec_dict or meta["model"]
    save_file(tensors, path, metadata={"ntdist": json.dumps(meta)})
    return path


@pytest.mark.parametrize("spec_dict, retype, words", [
    (None, torch.int32, "stores 'net.1.weight' as torch.int32"),
    ({"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}, None, "would load or download"),
    ({"name": "torchvision:fasterrcnn_resnet50_fpn", "kwargs": {"weights_backbone": "DEFAULT"}}, None, "download"),
    ({"name": "mlp", "kwargs": {"input_dim": {"nested": 1}}}, None, "malformed model spec"),
    ({"name": "torchvision:resnet18", "kwargs": {"num_classes": -3}}, None, "cannot be built"),
])
def test_crafted_checkpoints_are_refused_before_use(tmp_path, spec_dict, retype, words):
    path = _crafted(tmp_path, spec_dict, retype)
    with pytest.raises(UserError, match=words):
        load_model(path)


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"width": -3}, {"depth": 0}])
def test_a_model_width_or_depth_out_of_range_is_a_user_error(kwargs):
    with pytest.raises(UserError, match="model.kwargs do not fit 'mlp'.*width >= 1"):
        ModelSpec("mlp", kwargs).build()


def test_torchvision_weights_in_the_config_are_a_user_error():
    with pytest.raises(UserError, match="may not set"):
        ModelSpec("torchvision:resnet18", {"weights": "DEFAULT"}).build()
    with pytest.raises(UserError, match="do not fit"):
        ModelSpec("torchvision:resnet18", {"no_such_argument": 1}).build()
