"""Every MNIST-1D and digits config of configs/paper loads, validates and builds its model at every sweep point.

Cheap: no data is loaded and nothing is trained (the configs themselves are run, shortened, in
docs/RESULTS.md). Also checks that every experiment with a digits variant has an MNIST-1D one.

Run: .venv/bin/python -m pytest tests/unit/test_paper_configs.py
"""

import glob
import os

import pytest

from helpers import ROOT
from ntdist.config import load_config
from ntdist.models import build_model, complete_kwargs
from ntdist.sweep import SWEEP_KEYS, load_sweep

PAPER = os.path.join(ROOT, "configs", "paper")
MNIST1D = sorted(glob.glob(os.path.join(PAPER, "*_mnist1d.yaml")))
DIGITS = sorted(glob.glob(os.path.join(PAPER, "*_digits.yaml")))
SHAPES = {"mnist1d": ((1, 40), 10), "digits": ((1, 8, 8), 10)}


def test_every_digits_experiment_has_an_mnist1d_variant():
    experiments = {os.path.basename(p)[:-len("_digits.yaml")] for p in DIGITS}
    # the digits conv nets (lenet, vgg11, resnet18) become the 1-D CNN of MNIST-1D
    expected = {("compare_cnn1d" if e in ("compare_lenet", "compare_vgg11", "compare_resnet18") else e)
                for e in experiments} | {"sync_sgd", "noniid"}   # MNIST-1D only: members on shards of their own
    assert {os.path.basename(p)[:-len("_mnist1d.yaml")] for p in MNIST1D} == expected


@pytest.mark.parametrize("path", MNIST1D + DIGITS, ids=os.path.basename)
def test_config_loads_at_every_point(path):
    sweep = load_sweep(path, [])
    assert sweep.points and sweep.base.startswith("runs/paper/")
    seen = set()
    for point, point_dir in zip(sweep.points, sweep.dirs):
        setting = point.name.rsplit("seed=", 1)[0]
        if setting in seen:   # the seeds of one setting differ only in train.seed
            continue
        seen.add(setting)
        cfg = load_config(path, point.overrides + [f"output.dir={point_dir}"], extra_keys=SWEEP_KEYS)
        in_shape, classes = SHAPES[cfg.data.name]
        model = build_model(cfg.model.name, complete_kwargs(cfg.model.name, dict(cfg.model.kwargs), in_shape, classes))
        assert sum(p.numel() for p in model.parameters()) > 0
    if path.endswith("compare_mlp_mnist1d.yaml"):
        assert len({p.name.rsplit("/seed=", 1)[1] for p in sweep.points}) == 10   # 10 seeds by default
