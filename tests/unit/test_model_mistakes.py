"""Mistakes in a model of one's own, in the timeouts and in `ntdist fuse`'s inputs: one line, exit 2, before any
member trains and before the run directory exists (the model is built and fed one batch in `make_run`).

Run: .venv/bin/python -m pytest tests/unit/test_model_mistakes.py
"""

import pytest
import torch

from ntdist.cli import main
from ntdist.errors import UserError
from ntdist.fusion import fuse
from ntdist.models import ModelSpec, build_model
from ntdist.records.checkpoint import save_checkpoint

MISTAKES = "model.name=userpkg.mistakes:"


def refused(tmp_path, capsys, *overrides) -> str:
    """The one line `ntdist run` prints for `overrides` on a tiny config; it must exit 2 and write nothing."""
    config = tmp_path / "tiny.yaml"
    config.write_text("train: {epochs: 1}\nfinetune: {epochs: 0, control: false}\nfusion: {k: 2, methods: [nt]}\n"
                      "distributed: {threads_per_rank: 1}\n")
    out = tmp_path / "run"
    code = main(["run", str(config), f"output.dir={out}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ntdist: error: "), err
    assert not out.exists()   # refused before the run directory was made
    return err


@pytest.mark.parametrize("overrides, words", [
    ([MISTAKES + "raises"], "model.name 'userpkg.mistakes:raises' raised RuntimeError: CUDA kernels for my_op are "
                            "not compiled while building the model"),
    ([MISTAKES + "exits"], "model.name 'userpkg.mistakes:exits' called sys.exit(0) while building the model"),
    ([MISTAKES + "three_classes"], "gives an output of shape [2, 3] for 2 inputs, but the data have 10 classes"),
    ([MISTAKES + "no_parameters"], "model.name 'userpkg.mistakes:no_parameters' has no trainable parameters"),
    ([MISTAKES + "float64"], "has torch.float64 parameters ('1.weight'); members train in torch.float32"),
    (["model.name=torchvision:resnet18"], "model.name 'torchvision:resnet18' does not run on inputs of shape "
                                          "[2, 1, 8, 8]: in layer 'conv1' (Conv2d) raised RuntimeError"),
    (["model.name=../mods:net"], "model.name '../mods:net': '../mods' is a path, not a module name"),
    ([MISTAKES + "gru"], "model.name 'userpkg.mistakes:gru' cannot be fused with nt: cannot fuse layer 'rnn': "
                         "it (GRU)"),
    ([MISTAKES + "shared_weight"], "SharedWeight ties its weights: 'b.weight' is the same tensor as 'a.weight'"),
])
def test_a_model_that_would_fail_in_training_or_fusion_is_refused_before_training(tmp_path, capsys, overrides,
                                                                                   words):
    assert words in refused(tmp_path, capsys, *overrides)


def test_a_tied_model_is_refused_before_training_with_nt_and_trains_with_avg(tmp_path, capsys):
    err = refused(tmp_path, capsys, MISTAKES + "called_twice")
    assert "CalledTwice calls layer 'fc' (Linear) 2 times in forward, so its weights are tied" in err
    config = tmp_path / "avg.yaml"
    config.write_text("train: {epochs: 1}\nfinetune: {epochs: 0, control: false}\nfusion: {k: 2, methods: [avg]}\n"
                      "data: {train_fraction: 0.1}\ndistributed: {threads_per_rank: 1}\n")
    assert main(["run", str(config), f"output.dir={tmp_path / 'run'}", MISTAKES + "called_twice"]) == 0


@pytest.mark.parametrize("value", ["inf", "nan", "1e300"])
@pytest.mark.parametrize("name", ["timeout_s", "rendezvous_timeout_s", "wait_timeout_s", "heartbeat_timeout_s"])
def test_non_finite_or_absurd_timeouts_are_refused(tmp_path, capsys, name, value):
    err = refused(tmp_path, capsys, f"distributed.{name}={value}")
    assert f"distributed.{name} must be a number of seconds in (0, 2592000] (at most 30 days)" in err


@pytest.fixture
def members(tmp_path):
    spec = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 8}, (1, 8, 8))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_checkpoint(paths[-1], spec.build(), spec)
    return paths


def fuse_refused(capsys, *args) -> str:
    assert main(["fuse", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ntdist: error: "), err
    return err


def test_fuse_refuses_the_meta_device(tmp_path, members, capsys):
    out = tmp_path / "fused.safetensors"
    assert "--device meta holds shapes but no values" in fuse_refused(capsys, *members, "-o", str(out), "--device",
                                                                         "meta")
    assert not out.exists()


def test_dedup_inputs_of_another_width_are_named(tmp_path, members, capsys):
    torch.save(torch.randn(20, 7), tmp_path / "wide.pt")
    err = fuse_refused(capsys, *members, "-o", str(tmp_path / "f.safetensors"), "fusion.dedup=on",
                       "fusion.dedup_criterion=activations", "--dedup-inputs", str(tmp_path / "wide.pt"))
    assert f"--dedup-inputs '{tmp_path / 'wide.pt'}' must hold training inputs of the model's input shape (one " \
           "input of shape [1, 8, 8])" in err


def test_fusing_a_member_with_itself_warns_in_one_line(tmp_path, members, capsys):
    assert main(["fuse", members[0], members[0], "-o", str(tmp_path / "f.safetensors")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"ntdist fuse: warning: '{members[0]}' and '{members[0]}' are identical members (the same "
                        "weights); NT keeps each of their units twice instead of the ensemble's: fuse members "
                        "trained apart, or add --dedup to merge the copies"]
    assert main(["fuse", *members, "-o", str(tmp_path / "g.safetensors")]) == 0   # members trained apart: no warning
    assert "warning" not in capsys.readouterr().err


def test_the_activation_criterion_refuses_non_finite_inputs_instead_of_merging_nothing():
    models = [build_model("mlp", {"input_dim": 6, "num_classes": 3, "width": 8}) for _ in range(2)]
    with pytest.raises(UserError, match="example_inputs with NaN or infinite values"):
        fuse(models, "nt", dedup=True, dedup_criterion="activations", example_inputs=torch.full((20, 6), torch.nan))
