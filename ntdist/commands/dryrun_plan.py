"""The plan of `ntdist run --dry-run`: the checks a real run makes before it trains, for W ranks, and the sizes
the cost model needs.

`make_plan` loads the config, refuses an impossible member layout with the real run's line (`MemberLayout`,
the check `init_world` makes before joining), loads the data as `make_run` does (synthetic data only as
sizes, never generated), builds member 0 with its starting weights on `meta`, and measures its activations:
the tensors one training forward on `meta` saves for backward. No process group is joined, no GPU touched.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ntdist.config import Config, load_config, read_yaml
from ntdist.data import Splits, load_splits, synthetic_shapes
from ntdist.distributed import costs
from ntdist.distributed.layout import MemberLayout
from ntdist.errors import UserError
from ntdist.models import ModelSpec
from ntdist.models.weights import build_member, initial_state
from ntdist.sweep import SWEEP_KEYS, load_sweep
from ntdist.training.batches import _sample_bytes   # the size the resident check weighs a sample with


@dataclass(frozen=True)
class Plan:
    """What the dry run found: the config, the layout, and the sizes the cost model needs."""

    cfg: Config
    layout: MemberLayout
    gpus_per_node: Optional[int]
    spec: ModelSpec
    size: costs.MemberSize
    dtype: str
    activations: Optional[int]
    """bytes saved for backward by one training forward at data.batch_size (None: not estimated)"""
    splits: Dict[str, int]
    in_shape: tuple
    classes: int
    sample_bytes: int
    """bytes of one stored sample (uint8 images: one per pixel) and its label"""
    points: int = 1
    """the runs of a sweep (`seeds:`, `sweep:`); the plan is its first point's"""


def make_plan(config_path: str, overrides: List[str], world_size: int, gpus_per_node: Optional[int] = None) -> Plan:
    """Check the run as `ntdist run` does before it trains, for `world_size` ranks; return what the costs need."""
    if world_size < 1 or (gpus_per_node is not None and gpus_per_node < 1):
        raise UserError(f"--world-size and --gpus-per-node must be >= 1, got {world_size} and {gpus_per_node}")
    raw = read_yaml(config_path)
    plain = [o for o in overrides if not o.startswith("seeds=")]
    cfg = load_config(config_path, plain, extra_keys=SWEEP_KEYS)
    points = [cfg]
    if any(key in raw for key in SWEEP_KEYS) or len(plain) < len(overrides):
        sweep = load_sweep(config_path, list(overrides))
        points = [load_config(config_path, sweep.overrides + p.overrides, extra_keys=SWEEP_KEYS) for p in sweep.points]
        for point in points:   # a sweep's run refuses every point's layout before it trains the first
            MemberLayout(point.fusion.k, world_size)
        cfg = points[0]
    layout = MemberLayout(cfg.fusion.k, world_size)   # the check `init_world` makes before joining
    splits = synthetic_shapes(cfg.data) if cfg.data.name == "synthetic" else load_splits(cfg.data)
    spec = ModelSpec.for_data(cfg.model, splits.in_shape, splits.num_classes)
    initial = initial_state(cfg.model.name, cfg.model.weights)
    model = _member_on_meta(spec, initial, cfg)
    dtype = str(next((t.dtype for t in model.state_dict().values()), torch.float32)).replace("torch.", "")
    return Plan(cfg, layout, gpus_per_node, spec, costs.MemberSize.of(model), dtype,
                activation_bytes(model, splits.in_shape, cfg.data.batch_size), _split_sizes(splits),
                tuple(splits.in_shape), splits.num_classes, _sample_bytes(splits.train), len(points))


def _member_on_meta(spec: ModelSpec, initial, cfg: Config) -> torch.nn.Module:
    """Member 0 as `make_run` builds it (the model builds and the starting weights fit), on `meta` where its code
    allows, else on the CPU as a real run would."""
    try:
        with torch.device("meta"):
            return build_member(spec, 0, initial, cfg.model.reinit)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return build_member(spec, 0, initial, cfg.model.reinit)


def activation_bytes(model: torch.nn.Module, in_shape, batch: int) -> Optional[int]:
    """Bytes of the tensors autograd saves for backward in one training forward of a batch of `batch` inputs
    (each storage once, the parameters left out): on `meta` for a model built there, else on the CPU at two
    samples, scaled to `batch`. None when the forward fails, or the model is too large to build on the CPU."""
    meta = any(t.is_meta for t in model.state_dict().values())
    if not meta and costs.MemberSize.of(model).state_bytes > 2 ** 30:
        return None
    rows = batch if meta else min(batch, 2)
    x = torch.randn(rows, *in_shape, device="meta" if meta else "cpu")
    weights = {id(p.untyped_storage()) for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if id(storage) not in weights:
            saved[id(storage)] = storage   # kept alive, so that no id is reused by another storage
        return t

    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    except Exception:  # noqa: BLE001 - any failure only means: no estimate
        return None
    return sum(s.nbytes() for s in saved.values()) * batch // rows


def _split_sizes(splits: Splits) -> Dict[str, int]:
    return {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
