"""BatchNorm statistics of a fused model: re-estimated by default wherever data is given, for every method.

Two small BatchNorm MLPs (`userpkg.models:bn_net`) are trained on digits for a few epochs; `ntdist fuse`
without data warns in one line, with `--data` it recomputes the statistics, and `ntdist run` does so too.

Run: .venv/bin/python -m pytest tests/unit/test_bn_defaults.py
"""

import json

import pytest
import torch
import torch.nn.functional as F

from ntdist.cli import main
from ntdist.data import DataConfig, load_splits
from ntdist.fusion import average
from ntdist.fusion.config import FusionConfig
from ntdist.models import ModelSpec, build_model
from ntdist.records.checkpoint import load_model, save_checkpoint

NAME = "userpkg.models:bn_net"
KWARGS = {"input_dim": 64, "num_classes": 10, "depth": 3}
MODEL = ["--model", NAME]
DATA = ["--data", "data.name=digits"]


def accuracy(model, split) -> float:
    x = torch.stack([split[i][0] for i in range(len(split))])
    y = torch.tensor([int(split[i][1]) for i in range(len(split))])
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == torch.as_tensor(y)).float().mean().item()


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two BatchNorm MLPs trained from different seeds on ntdist's digits: (paths, models, splits)."""
    tmp = tmp_path_factory.mktemp("bn_members")
    splits = load_splits(DataConfig())
    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    y = torch.tensor([int(splits.train[i][1]) for i in range(len(splits.train))])
    paths, models = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(NAME, KWARGS)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            for idx in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        assert accuracy(model, splits.test) > 0.8
        paths.append(str(tmp / f"member{seed}.safetensors"))
        save_checkpoint(paths[-1], model, ModelSpec(NAME, KWARGS, (1, 8, 8)))
        models.append(model.eval())
    return paths, models, splits


def bn_means(model) -> torch.Tensor:
    return torch.cat([m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)])


@pytest.mark.parametrize("method", ["avg", "ot"])
def test_fuse_without_data_says_in_one_line_that_batchnorm_statistics_are_stale(members, tmp_path, capsys, method):
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", *MODEL, "--method", method, "-o", out, *members[0]]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "BatchNorm" in err and "stale" in err and "--calibration" in err and "--data" in err, err


@pytest.mark.parametrize("method", ["avg", "ot"])
def test_fuse_with_data_reestimates_batchnorm_statistics(members, tmp_path, capsys, method):
    paths, models, splits = members
    out, stale = str(tmp_path / "fused.safetensors"), str(tmp_path / "stale.safetensors")
    assert main(["fuse", *MODEL, "--method", method, "-o", out, *DATA, *paths]) == 0
    assert main(["fuse", *MODEL, "--method", method, "-o", stale, *DATA, "fusion.bn_reestimate=off", *paths]) == 0
    assert "stale" not in capsys.readouterr().err
    fused = load_model(out, expect_spec=ModelSpec(NAME, KWARGS))[0]
    kept = load_model(stale, expect_spec=ModelSpec(NAME, KWARGS))[0]
    assert not torch.allclose(bn_means(fused), bn_means(kept), atol=1e-3)
    assert accuracy(fused, splits.test) > (0.8 if method == "ot" else 0.6)
    if method == "avg":     # off keeps the members' average, which fits no unit of the averaged model
        assert torch.allclose(bn_means(kept), bn_means(average(models)))
        assert accuracy(fused, splits.test) > accuracy(kept, splits.test) + 0.05


def test_bn_reestimate_on_without_data_is_refused_in_one_line(members, tmp_path, capsys):
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", *MODEL, "--method", "avg", "-o", out, "fusion.bn_reestimate=on", *members[0]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calibration" in err and "--data" in err, err


def test_the_setting_defaults_to_auto_and_reads_yaml_booleans():
    assert FusionConfig().bn_reestimate == "auto"
    assert FusionConfig(bn_reestimate=True).bn_reestimate == "on"
    assert FusionConfig(bn_reestimate="False").bn_reestimate == "off"


def test_run_reestimates_batchnorm_statistics_of_averaging_by_default(members, tmp_path):
    paths, models, splits = members
    cfg = tmp_path / "bn.yaml"
    cfg.write_text(json.dumps({"model": {"name": NAME, "kwargs": {"depth": 3}},
                               "fusion": {"members": paths, "methods": ["avg"]},
                               "finetune": {"epochs": 0, "control": False},
                               "output": {"dir": str(tmp_path / "run"), "diversity": False}}))
    assert main(["run", str(cfg)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    after = results["fusion"]["avg"]["post_fusion"]
    assert after > max(0.6, accuracy(average(models), splits.test) + 0.02), after
