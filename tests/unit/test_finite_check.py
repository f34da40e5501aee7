"""`fusion.checks.check_finite`: a NaN or inf in any tensor of any member is named, skipped tensors are not
read, and finite members cost one read back per device however many tensors they hold.

Run: .venv/bin/python -m pytest tests/unit/test_finite_check.py
"""

import pytest
import torch
import torch.nn as nn

from ntdist.errors import UserError
from ntdist.fusion.checks import check_finite

# the order check_finite reads a member in: parameters, then buffers (num_batches_tracked is an integer)
ORDER = ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "1.running_mean", "1.running_var"]


def members(count=2):
    """Members of float32, bfloat16 and float64 layers: one stack of extremes per dtype would mix them up."""
    torch.manual_seed(0)
    out = []
    for _ in range(count):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        model[1].to(torch.bfloat16), model[2].to(torch.float64)
        out.append(model)
    return out


def spoil(model, name, value):
    with torch.no_grad():
        tensor = model.state_dict(keep_vars=True)[name]
        tensor.view(-1)[tensor.numel() // 2] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", [ORDER[0], ORDER[3], ORDER[-1]])   # first, middle (bfloat16), last (a buffer)
def test_a_non_finite_value_in_any_one_tensor_is_named(name, value):
    models = members()
    check_finite(models)
    spoil(models[1], name, value)
    with pytest.raises(UserError) as err:
        check_finite(models)
    assert str(err.value) == f"model 1 has NaN or inf values in '{name}'; fuse trained, finite models"


def test_the_first_spoiled_tensor_in_reading_order_is_named_and_skipped_ones_are_not():
    models = members(3)
    spoil(models[2], ORDER[0], float("nan"))      # float32, read early but in a later model
    spoil(models[1], ORDER[-1], float("inf"))     # float32 buffer of model 1
    spoil(models[1], ORDER[4], float("nan"))      # float64, in model 1 before its buffers
    with pytest.raises(UserError, match=r"^model 1 has NaN or inf values in '2\.weight'"):
        check_finite(models)
    with pytest.raises(UserError, match=r"^model 1 has NaN or inf values in '1\.running_var'"):
        check_finite(models, skip={"2.weight"})
    with pytest.raises(UserError, match=r"^model 2 has NaN or inf values in '0\.weight'"):
        check_finite(models, skip={"2.weight", "1.running_var"})
    check_finite(models, skip={"2.weight", "1.running_var", "0.weight"})   # every spoiled tensor skipped


def test_finite_members_are_read_back_once_per_device_not_once_per_tensor(monkeypatch):
    models = members(4)
    reads = []
    for method in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    check_finite(models)
    assert reads == ["__bool__"]
