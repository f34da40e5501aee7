"""Public surface of ntdist.fusion: the config dataclass and the exported names.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_api.py
"""

import dataclasses

import ntdist.fusion as fusion
from ntdist.fusion.config import FusionConfig


def test_fusion_config_fields_have_defaults_and_help():
    cfg = FusionConfig()
    assert (cfg.k, cfg.methods, cfg.schedule, cfg.order, cfg.importance) == (2, ["nt"], "recursive", "merge_prune", "group_l2")
    assert cfg.keep_ratio is None and cfg.width is None and cfg.bn_reestimate == "auto" and cfg.bn_batches == 10
    for f in dataclasses.fields(FusionConfig):
        assert f.metadata["help"] and "\n" not in f.metadata["help"], f.name
    assert FusionConfig().methods is not cfg.methods


def test_public_names():
    for name in ("concat", "fuse", "fuse_pair", "recursive_pairs", "recursive_plan", "average", "ot_fuse",
                 "Ensemble", "distillation_loss", "reestimate_bn", "IMPORTANCES", "FusionConfig", "prune"):
        assert hasattr(fusion, name), name
