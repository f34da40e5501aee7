"""Members trained elsewhere (`fusion.members`) under torchrun: each rank loads the members its layout holds,
and the run ends with the members, ensemble and fused models of a single process.

Run: .venv/bin/python -m pytest tests/multiproc/test_given_members_ranks.py
"""

import json
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT, digits_tensors, ntdist, plain_accuracy, torchrun_cmd, train_plain
from ntdist.models import build_model
from ntdist.records.results import read_results

MLP = {"input_dim": 64, "num_classes": 10, "width": 32}


@pytest.mark.parametrize("k", [2, 3])
def test_torchrun_on_given_members_equals_one_process(tmp_path, k):
    x, y = digits_tensors("train")
    xt, yt = digits_tensors("test")
    paths, accuracies = [], []
    for seed in range(k):
        torch.manual_seed(seed)
        model = train_plain(build_model("mlp", MLP), x, y, seed, steps=150)
        accuracies.append(plain_accuracy(model, xt, yt))
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, paths[-1])   # from DDP
    config = tmp_path / "members.yaml"
    config.write_text(json.dumps({"model": {"kwargs": {"width": 32}}, "fusion": {"members": paths,
                                  "methods": ["nt", "avg"]}, "finetune": {"epochs": 1},
                                  "distributed": {"threads_per_rank": 1}}))
    one, two = tmp_path / "one", tmp_path / "two"
    assert ntdist("run", str(config), f"output.dir={one}").returncode == 0
    proc = subprocess.run(torchrun_cmd("run", str(config), f"output.dir={two}"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_results(str(one)), read_results(str(two))
    assert a.members == b.members == pytest.approx(accuracies) and a.ensemble == b.ensemble
    assert b.world["size"] == 2
    for method in ("nt", "avg"):   # the tree equals the single-process recursive schedule; fine-tuning differs by DDP
        assert b.fusion[method].post_fusion == pytest.approx(a.fusion[method].post_fusion, abs=1 / len(yt))
        assert len(b.fusion[method].finetune) == 1
