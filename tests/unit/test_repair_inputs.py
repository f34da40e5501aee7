"""`fuse(..., calibration=...)` with what users pass: one-shot iterators, other precisions, and the plausible
mistakes (wrong shape, labels, uint8, NaN, empty, a dict, a Dataset, an (inputs, labels) pair), each one UserError.

Run: .venv/bin/python -m pytest tests/unit/test_repair_inputs.py
"""

import pytest
import torch
from torch.utils.data import TensorDataset

from ntdist.errors import UserError
from ntdist.fusion import fuse
from ntdist.models import ModelSpec

SPEC = ModelSpec("mlp", {"input_dim": 12, "num_classes": 5, "width": 16, "depth": 2})
CAL = torch.randn(300, 12, generator=torch.Generator().manual_seed(1))
LABELS = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(2))


def _members(k=2):
    out = []
    for i in range(k):
        torch.manual_seed(60 + i)
        out.append(SPEC.build().eval())
    return out


def _same(a, b):
    return all(torch.equal(t, b.state_dict()[key]) for key, t in a.state_dict().items())


@pytest.mark.parametrize("method,schedule", [("nt", "recursive"), ("nt", "iterative"), ("avg", "recursive")])
def test_a_one_shot_iterator_calibrates_every_pairwise_step(method, schedule):
    models = _members(3)
    repair = dict(repair="lstsq", example_inputs=CAL[:2])
    expected = fuse(models, method, schedule, calibration=list(CAL.split(100)), **repair)
    fused = fuse(models, method, schedule, calibration=(b for b in CAL.split(100)), **repair)
    assert _same(fused, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_inputs_of_another_precision_take_the_models_dtype(dtype):
    models = _members()
    expected = fuse(models, calibration=CAL.to(dtype).float())
    fused = fuse(models, calibration=CAL.to(dtype))
    assert _same(fused, expected)
    assert not _same(fused, fuse(models, repair="none"))


MISTAKES = {
    "wrong shape": (torch.randn(50, 7), "calibration inputs of float32 of shape [7] (one input) do not fit MLP"),
    "labels": (LABELS, "not the labels"),
    "uint8 images": ((CAL.abs() * 50).to(torch.uint8), "x.float() / 255"),
    "nan": (torch.cat([CAL[:10], torch.full((1, 12), float("nan"))]), "NaN or infinite"),
    "inf": (CAL.clone().index_fill_(0, torch.tensor([3]), float("inf")), "NaN or infinite"),
    "empty tensor": (torch.empty(0, 12), "holds no inputs"),
    "empty list": ([], "holds no inputs"),
    "dict": ({"x": CAL}, "is a dict (keys x)"),
    "dict batches": ([{"x": CAL}], "batch 0 is a dict (keys x)"),
    "dataset": (TensorDataset(CAL, LABELS), "DataLoader(dataset, batch_size=256)"),
    "pair": ((CAL, LABELS), "pass the inputs alone"),
    "ragged batches": ([CAL[:10], CAL[10:20], LABELS[:10]], "batch 2 is int64 of shape [10] but batch 0 float32"),
    "meta": (CAL.to("meta"), "meta device"),
    "a number": (3, "calibration is of type int"),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_calibration_mistakes_are_one_line_user_errors(name, capsys):
    given, fragment = MISTAKES[name]
    with pytest.raises(UserError) as err:
        fuse(_members(), calibration=given, example_inputs=CAL[:2])
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert "Traceback" not in capsys.readouterr().err
