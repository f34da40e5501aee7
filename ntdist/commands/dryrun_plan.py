"""The plan of `ntdist run --dry-run`: the checks a real run makes before it trains, for W ranks, and the sizes
the cost model needs.

`make_plan` loads the config, refuses an impossible member layout with the real run's line (`MemberLayout`,
the check `init_world` makes before joining), loads the data as `make_run` does (large synthetic data only as
sizes), builds member 0 with its starting weights on `meta`, runs the checks `make_run` makes before any member
trains (`run_checks`: the same functions, so a failing one stops the dry run with the run's line), and
measures the activations: the tensors one training forward on `meta` saves for backward. A sweep is checked
point by point, each distinct `stages.context.checked_settings` once, and a failing point's line names it
(`sweep point 2 of 4 (model.kwargs.width=16, train.lr=0.1): ...`); its plan is the first point's. No process
group is joined, no GPU touched, and nothing larger than CHEAP_BYTES is built for real.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ntdist.config import Config, load_config, read_yaml
from ntdist.data import DataConfig, Splits, load_splits, synthetic_shapes
from ntdist.distributed import costs
from ntdist.distributed.layout import MemberLayout
from ntdist.errors import UserError
from ntdist.models import ModelSpec
from ntdist.models.weights import build_member, initial_state
from ntdist.stages.context import check_shards, check_template, checked_settings, example_inputs
from ntdist.stages.given import check_members
from ntdist.sweep import SWEEP_KEYS, load_sweep
from ntdist.training.batches import _sample_bytes   # the size the resident check weighs a sample with

CHEAP_BYTES = 2 ** 26   # what the dry run builds for real, as the run does: member 0 for the checks, synthetic
#                         data; a larger member is checked on `meta`, larger synthetic data are sizes only


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
    checked: int = 1
    """the distinct `checked_settings` among the points: each was checked once"""
    checked_on_meta: bool = False
    """the checks before training ran on member 0 built on `meta` (it is larger than CHEAP_BYTES)"""
    unchecked: Tuple[str, ...] = ()
    """the checks of a real run that the dry run could not make"""


def make_plan(config_path: str, overrides: List[str], world_size: int, gpus_per_node: Optional[int] = None) -> Plan:
    """Check the run as `ntdist run` does before it trains, for `world_size` ranks (a sweep: every point, each
    distinct `checked_settings` once, a failing point named in the line); return what the costs need."""
    if world_size < 1 or (gpus_per_node is not None and gpus_per_node < 1):
        raise UserError(f"--world-size and --gpus-per-node must be >= 1, got {world_size} and {gpus_per_node}")
    points = sweep_points(config_path, overrides)
    for name, point in points:   # a sweep's run refuses every point's layout before it trains the first
        with _named(name):
            MemberLayout(point.fusion.k, world_size)   # the check `init_world` makes before joining
    checked, unchecked, first = set(), [], None
    for name, point in points:
        settings = checked_settings(point)
        if settings in checked:   # it differs from a checked point only in what no check reads
            continue
        checked.add(settings)
        with _named(name):
            found = _check_point(point)
        first = found if first is None else first
        unchecked += [text if found is first else f"{text} ({name})" for text in found[-1]]
    cfg = points[0][1]
    splits, spec, model, _ = first
    size = costs.MemberSize.of(model)
    dtype = str(next((t.dtype for t in model.state_dict().values()), torch.float32)).replace("torch.", "")
    return Plan(cfg, MemberLayout(cfg.fusion.k, world_size), gpus_per_node, spec, size, dtype,
                activation_bytes(model, splits.in_shape, cfg.data.batch_size), _split_sizes(splits),
                tuple(splits.in_shape), splits.num_classes, _sample_bytes(splits.train), len(points), len(checked),
                _on_meta(size), tuple(unchecked))


def sweep_points(config_path: str, overrides: List[str]) -> List[Tuple[Optional[str], Config]]:
    """(the point's name for messages, its config) for each run of the config: one, named None, without
    `seeds:` or `sweep:`."""
    raw = read_yaml(config_path)
    plain = [o for o in overrides if not o.startswith("seeds=")]
    cfg = load_config(config_path, plain, extra_keys=SWEEP_KEYS)
    if not any(key in raw for key in SWEEP_KEYS) and len(plain) == len(overrides):
        return [(None, cfg)]
    sweep = load_sweep(config_path, list(overrides))
    points = []
    for i, point in enumerate(sweep.points):
        name = f"sweep point {i + 1} of {len(sweep.points)} ({', '.join(point.overrides) or point.name})"
        with _named(name):
            points.append((name, load_config(config_path, sweep.overrides + point.overrides, extra_keys=SWEEP_KEYS)))
    return points


@contextmanager
def _named(name: Optional[str]):
    """A UserError inside names the sweep point `name`; a single run's (None) stays the real run's line."""
    try:
        yield
    except UserError as err:
        if name is None:
            raise
        raise UserError(f"{name}: {err}") from None


def _check_point(cfg: Config) -> Tuple[Splits, ModelSpec, torch.nn.Module, List[str]]:
    """The data, the spec and member 0 (on `meta` when large) of the run `cfg`, once `run_checks` passed, and the
    checks it could not make."""
    splits = synthetic_shapes(cfg.data) if _large_synthetic(cfg.data) else load_splits(cfg.data)
    spec = ModelSpec.for_data(cfg.model, splits.in_shape, splits.num_classes)
    initial = initial_state(cfg.model.name, cfg.model.weights)
    model = _member_on_meta(spec, initial, cfg)
    return splits, spec, model, run_checks(cfg, splits, spec, initial, model)


def _on_meta(size: costs.MemberSize) -> bool:
    """Whether the checks run on member 0 on `meta` (else on the CPU, built as the run builds it)."""
    return size.state_bytes > CHEAP_BYTES


def _large_synthetic(data: DataConfig) -> bool:
    return data.name == "synthetic" and data.synthetic_samples * math.prod(data.synthetic_shape) * 4 > CHEAP_BYTES


def run_checks(cfg: Config, splits: Splits, spec: ModelSpec, initial, member: torch.nn.Module) -> List[str]:
    """The checks `make_run` makes before any member trains, with its functions (`stages.context`): the files of
    fusion.members, data.member_split, and the template (it runs on the data's inputs, gives one score per
    class, and the fusion methods can analyse it, tied weights included). A member of up to CHEAP_BYTES is
    built on the CPU, as the run builds it; a larger one is checked as `member` (on `meta`), where a failing
    forward is named in meta's words. Returns the checks that could not be made."""
    unchecked, cheap = [], not _on_meta(costs.MemberSize.of(member))
    if cheap or not cfg.fusion.members:
        check_members(cfg.fusion.members, spec)
    else:
        unchecked.append("the files of fusion.members (a member is too large to build here)")
    meta_data = len(splits.train) > 0 and splits.train[0][0].is_meta
    if not meta_data:
        check_shards(cfg, splits)
    elif cfg.data.member_split != "iid":
        unchecked.append(f"data.member_split={cfg.data.member_split} (the synthetic data are not generated)")
    examples = example_inputs(cfg, splits.train)
    if meta_data:   # the synthetic data's distribution: the checks read shapes, not values
        examples = torch.randn(examples.shape, generator=torch.Generator().manual_seed(0))
    if cheap:
        check_template(cfg, splits, examples, build_member(spec, 0, initial, cfg.model.reinit))
        return unchecked
    device = next((t.device for t in member.state_dict().values()), torch.device("meta"))
    try:
        check_template(cfg, splits, examples.to(device), member)
    except Exception as err:  # noqa: BLE001 - a failure of meta tensors themselves is no finding
        why = _meta_failure(err)
        if why is None:
            raise
        unchecked.append(f"the model's forward and fusability (they do not run on meta: {why})")
    return unchecked


def _meta_failure(err: BaseException) -> Optional[str]:
    """The first line of the error in `err`'s chain that meta tensors raised (an operation without a meta
    kernel, a value read), or None when none did."""
    while err is not None:
        text = str(err).strip()
        if not isinstance(err, UserError) and "meta" in text.lower():
            return text.splitlines()[0][:160]
        err = err.__context__
    return None


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
