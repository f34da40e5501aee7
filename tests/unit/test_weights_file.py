"""`model.weights` is read and matched by the rule `ntdist fuse` applies: integer tensors, NaN and inf refused.

Run: .venv/bin/python -m pytest tests/unit/test_weights_file.py
"""

import os

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT
from ntdist.cli import main
from ntdist.errors import UserError
from ntdist.models import build_model
from ntdist.models.statedict import fit_state_dict
from ntdist.models.weights import initial_state, load_initial

KWARGS = {"input_dim": 64, "num_classes": 10, "width": 8}


def _saved(tmp_path, change) -> str:
    """A safetensors file of an 8-wide MLP's state dict after `change(state)`."""
    state = {k: v.contiguous() for k, v in build_model("mlp", KWARGS).state_dict().items()}
    change(state)
    path = str(tmp_path / "w.safetensors")
    save_file(state, path)
    return path


def test_integer_weights_are_refused_as_ntdist_fuse_refuses_them(tmp_path):
    path = _saved(tmp_path, lambda state: state.update(
        {k: (v * 100).to(torch.int64) for k, v in state.items() if k.endswith("weight")}))
    model = build_model("mlp", KWARGS)
    with pytest.raises(UserError) as fuse_says:
        fit_state_dict(initial_state("mlp", path), model, f"'{path}'", "mlp", "")
    with pytest.raises(UserError, match=r"model.weights do not fit the model \('net.1.weight' is stored as "
                                        r"torch.int64, the model holds torch.float32\)") as run_says:
        load_initial(model, initial_state("mlp", path), [])
    problem = "'net.1.weight' is stored as torch.int64, the model holds torch.float32"
    assert problem in str(fuse_says.value) and problem in str(run_says.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_before_anything_is_written(tmp_path, capsys, value):
    path = _saved(tmp_path, lambda state: state["net.3.weight"].view(-1)[:3].fill_(value))
    out = tmp_path / "run"
    assert main(["run", os.path.join(ROOT, "configs", "quickstart.yaml"), f"output.dir={out}", f"model.weights={path}",
                 "model.kwargs.width=8", "train.epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ntdist: error: '{path}': tensor 'net.3.weight' holds 3 NaN or infinite value(s) of 64; "
                   "the weights were saved from a run that diverged: use an earlier checkpoint"]
    assert not out.exists()


def test_a_folder_or_a_device_is_called_what_it_is(tmp_path):
    with pytest.raises(UserError, match=f"weights file '{tmp_path}' is a directory, not a file"):
        initial_state("mlp", str(tmp_path))
    with pytest.raises(UserError, match="weights file '/dev/zero' is not a regular file \\(a device, FIFO or socket\\)"):
        initial_state("mlp", "/dev/zero")
    with pytest.raises(UserError, match="weights file '.*nothere.pt' does not exist"):
        initial_state("mlp", str(tmp_path / "nothere.pt"))
