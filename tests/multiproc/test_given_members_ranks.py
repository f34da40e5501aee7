"""Members trained elsewhere (`fusion.members`) under torchrun: each rank loads the members its layout holds,
and the run ends with the members, ensemble and fused models of a single process; averaging and OT with their
repair (gathered on rank 0) give the single process's fused weights.

Run: .venv/bin/python -m pytest tests/multiproc/test_given_members_ranks.py
"""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import ROOT, digits_tensors, ntdist, plain_accuracy, torchrun_cmd, train_plain
from ntdist.models import build_model
from ntdist.records.results import read_results

MLP = {"input_dim": 64, "num_classes": 10, "width": 32}


def _given(tmp_path, k):
    """k digits MLPs trained with plain torch and saved as DDP would: (paths, test accuracies, models)."""
    x, y = digits_tensors("train")
    xt, yt = digits_tensors("test")
    paths, accuracies, models = [], [], []
    for seed in range(k):
        torch.manual_seed(seed)
        model = train_plain(build_model("mlp", MLP), x, y, seed, steps=150)
        accuracies.append(plain_accuracy(model, xt, yt))
        models.append(model)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, paths[-1])   # from DDP
    return paths, accuracies, models


def _one_and_two(tmp_path, fusion: dict, epochs: int):
    """The config of `fusion` (members given) run by one process and under torchrun on two ranks: both run dirs."""
    config = tmp_path / "members.yaml"
    config.write_text(json.dumps({"model": {"kwargs": {"width": 32}}, "fusion": fusion, "finetune": {"epochs": epochs},
                                  "distributed": {"threads_per_rank": 1}}))
    one, two = tmp_path / "one", tmp_path / "two"
    assert ntdist("run", str(config), f"output.dir={one}").returncode == 0
    proc = subprocess.run(torchrun_cmd("run", str(config), f"output.dir={two}"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


@pytest.mark.parametrize("k", [2, 3])
def test_torchrun_on_given_members_equals_one_process(tmp_path, k):
    xt, yt = digits_tensors("test")
    paths, accuracies, _ = _given(tmp_path, k)
    one, two = _one_and_two(tmp_path, {"members": paths, "methods": ["nt", "avg"]}, epochs=1)
    a, b = read_results(str(one)), read_results(str(two))
    assert a.members == b.members == pytest.approx(accuracies) and a.ensemble == b.ensemble
    assert b.world["size"] == 2
    for method in ("nt", "avg"):   # the tree equals the single-process recursive schedule; fine-tuning differs by DDP
        assert b.fusion[method].post_fusion == pytest.approx(a.fusion[method].post_fusion, abs=1 / len(yt))
        assert len(b.fusion[method].finetune) == 1


def test_torchrun_repairs_averaging_and_ot_as_one_process(tmp_path):
    from ntdist.fusion import average
    paths, _, models = _given(tmp_path, 3)
    one, two = _one_and_two(tmp_path, {"members": paths, "methods": ["avg", "ot"], "repair": "lstsq"}, epochs=0)
    plain = average(models).state_dict()
    for method in ("avg", "ot"):      # finetune.epochs 0: the fine-tuned file is the fused model
        a, b = (load_file(str(d / "checkpoints" / f"finetuned_{method}.safetensors")) for d in (one, two))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
        assert not torch.allclose(a["net.5.weight"], plain["net.5.weight"], atol=1e-3)   # the output layer refitted
