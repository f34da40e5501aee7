"""NT's repair through the public API and the CLI: `fuse(..., calibration=x)`, `fusion.repair`, `--calibration`.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_repair_api.py
"""

import pytest
import torch

from helpers import ntdist as run_cli
from ntdist.errors import UserError
from ntdist.fusion import Ensemble, NTOptions, fuse
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import load_model, save_checkpoint

SPEC = ModelSpec("mlp", {"input_dim": 12, "num_classes": 5, "width": 16, "depth": 2})


def _members(k=3):
    out = []
    for i in range(k):
        torch.manual_seed(40 + i)
        out.append(SPEC.build().eval())
    return out


def _error(model, models, x):
    with torch.no_grad():
        return (model(x) - Ensemble(models)(x)).pow(2).mean().item()


CAL = torch.randn(600, 12, generator=torch.Generator().manual_seed(1))
HELD_OUT = torch.randn(400, 12, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("schedule,order", [("flat", "merge_prune"), ("recursive", "merge_prune"),
                                            ("iterative", "merge_prune"), ("flat", "prune_merge")])
def test_calibration_inputs_bring_nt_closer_to_the_ensemble(schedule, order):
    models = _members()
    plain = fuse(models, schedule=schedule, order=order)
    repaired = fuse(models, schedule=schedule, order=order, calibration=CAL)
    assert type(repaired) is type(models[0])
    assert {k: v.shape for k, v in repaired.state_dict().items()} == \
        {k: v.shape for k, v in models[0].state_dict().items()}
    assert _error(repaired, models, HELD_OUT) < 0.7 * _error(plain, models, HELD_OUT)


def test_batches_and_one_tensor_repair_alike_and_none_is_plain_nt():
    models = _members(2)
    whole = fuse(models, calibration=CAL)
    batched = fuse(models, calibration=[CAL[:250], CAL[250:500], CAL[500:]])
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    off = fuse(models, calibration=CAL, repair="none")
    for key, value in fuse(models).state_dict().items():
        assert torch.equal(off.state_dict()[key], value), key


def test_repair_options_are_checked_once():
    with pytest.raises(UserError, match="needs calibration inputs"):
        fuse(_members(2), repair="lstsq")
    with pytest.raises(UserError, match="repair_ridge only applies"):
        NTOptions(repair="none", repair_ridge=0.5)
    with pytest.raises(UserError, match="repair_ridge must be a number >= 0"):
        NTOptions(repair_ridge=-1.0)
    with pytest.raises(UserError, match="select differently"):
        NTOptions(repair="lstsq", dedup=True)
    with pytest.raises(UserError, match="fusion.repair"):
        NTOptions(repair="ols", prefix="fusion.")
    # auto with dedup: dedup's own selection, no refit, no error
    dedup = fuse(_members(2), dedup=True, calibration=CAL)
    for key, value in fuse(_members(2), dedup=True).state_dict().items():
        assert torch.equal(dedup.state_dict()[key], value), key


def test_ntdist_fuse_calibration_file_equals_the_python_api(tmp_path):
    models = _members(2)
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_checkpoint(paths[-1], m, SPEC)
    torch.save(CAL, tmp_path / "cal.pt")
    out = str(tmp_path / "fused.safetensors")
    proc = run_cli("fuse", *paths, "-o", out, "--calibration", str(tmp_path / "cal.pt"), "fusion.schedule=flat")
    assert proc.returncode == 0, proc.stderr
    assert "repaired on 600 inputs" in proc.stdout
    expected = fuse(models, calibration=CAL)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(load_model(out)[0].state_dict()[key], value, rtol=0, atol=1e-6)
    proc = run_cli("fuse", *paths, "-o", str(tmp_path / "x.safetensors"), "fusion.repair=lstsq")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "calibration" in proc.stderr
    proc = run_cli("fuse", *paths, "-o", str(tmp_path / "y.safetensors"))
    assert proc.returncode == 0 and "--calibration" in proc.stderr   # the hint where repair would help
