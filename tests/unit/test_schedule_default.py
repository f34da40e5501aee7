"""One default schedule: Python's `fuse()`, a run config's `fusion.schedule` and `ntdist fuse` agree.

Run: .venv/bin/python -m pytest tests/unit/test_schedule_default.py
"""

import inspect

import torch

from ntdist.cli import main
from ntdist.commands.fuse import fusion_config
from ntdist.config import load_config
from ntdist.fusion import fuse
from ntdist.fusion.config import FusionConfig
from ntdist.models import ModelSpec, build_model
from ntdist.records.checkpoint import load_model, save_checkpoint


def test_fuse_config_and_command_line_default_to_the_same_schedule(tmp_path):
    python = inspect.signature(fuse).parameters["schedule"].default
    assert python == FusionConfig().schedule == load_config(None, []).fusion.schedule
    assert fusion_config(["a", "b"], []).schedule == python
    spec, paths = ModelSpec("mlp", {"input_dim": 4, "num_classes": 3, "width": 5}), []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_checkpoint(paths[-1], build_model(spec.name, spec.kwargs), spec)
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", *paths, "-o", out]) == 0
    assert load_model(out)[1]["info"]["schedule"] == python
