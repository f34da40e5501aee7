"""The typed config tree: defaults, then a YAML file, then dotted command-line overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.epochs=5", "fusion.methods=[nt,avg]"])

YAML files hold only what differs from the defaults. Unknown keys and values of
the wrong type are refused with a one-line `UserError` that names the key and
suggests the closest valid one.
"""

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, List

import yaml
from omegaconf import OmegaConf

from ntdist.data import DATASETS, DataConfig
from ntdist.dist.world import DistributedConfig
from ntdist.errors import UserError, suggest
from ntdist.fusion.config import FusionConfig
from ntdist.models import ModelConfig
from ntdist.options import opt
from ntdist.sync import SYNC_METHODS, SyncConfig
from ntdist.train import SCHEDULES, FinetuneConfig, TrainConfig

FUSION_METHODS = ["nt", "avg", "ot"]
ENGINES = ["ddp", "accelerate", "deepspeed"]


@dataclass
class OutputConfig:
    """Where a run writes its files."""

    dir: str = opt("runs/default", "run directory (config, metrics.jsonl, checkpoints, results.json)")
    diversity: bool = opt(True, "measure member disagreement and near-duplicate units before fusing")
    duplicate_threshold: float = opt(0.95, "cosine similarity above which two units count as near-duplicates")


@dataclass
class Config:
    """One ntdist experiment."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    fusion: FusionConfig = dataclasses.field(default_factory=FusionConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    mode: str = opt("fuse", "fuse (train members, fuse, fine-tune) | sync (experimental periodic-sync SGD)")
    sync: SyncConfig = dataclasses.field(default_factory=SyncConfig)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; accept the exponent notation everyone writes for learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?\d*\.\d+$|^[-+]?\d+\.$"),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _type_ok(value: Any, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is list or origin in (list, List):
        args = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_keys(data: dict, cls=Config, prefix: str = "") -> None:
    """Refuse unknown keys and wrongly typed values in a (partial) config dict."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    fields = _fields(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = suggest(str(key), fields)
            close = close.replace("'", f"'{prefix}", 1) if close else ""
            raise UserError(f"unknown config key '{full}'{close}; run 'ntdist run --help' for the list of keys")
        tp, _ = fields[key]
        if dataclasses.is_dataclass(tp):
            check_keys(value, tp, full + ".")
        elif not _type_ok(value, tp):
            raise UserError(f"config key '{full}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def parse_override(item: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}, the value parsed as YAML."""
    if "=" not in item:
        raise UserError(f"override '{item}' is not of the form key=value (e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml_load(f.read()) or {}
    except FileNotFoundError:
        raise UserError(f"config file '{path}' not found; pass a YAML file such as configs/quickstart.yaml") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | None = None, overrides=(), extra_keys=()) -> Config:
    """Merge defaults <- YAML file <- overrides and return a validated `Config`.

    `extra_keys` names top-level YAML keys that a caller handles itself (e.g. a sweep);
    they are dropped here.
    """
    layers = [read_yaml(path)] if path else []
    layers += [parse_override(o) for o in overrides]
    merged = OmegaConf.structured(Config)
    for layer in layers:
        layer = {k: v for k, v in layer.items() if k not in extra_keys}
        check_keys(layer)
        merged = OmegaConf.merge(merged, layer)
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Config) -> None:
    """Value checks the type system cannot express."""
    _require(cfg.train.epochs >= 0, f"train.epochs must be >= 0, got {cfg.train.epochs}")
    _require(cfg.finetune.epochs >= 0, f"finetune.epochs must be >= 0, got {cfg.finetune.epochs}")
    _require(cfg.fusion.k >= 2, f"fusion.k must be at least 2 (an ensemble of one cannot be fused), got {cfg.fusion.k}")
    for section in (cfg.train, cfg.finetune):
        _require(section.lr > 0, f"learning rates must be > 0, got {section.lr}")
        _require(section.schedule in SCHEDULES,
                 f"unknown LR schedule '{section.schedule}'{suggest(section.schedule, SCHEDULES)}; choose one of {SCHEDULES}")
    _require(cfg.data.name in DATASETS,
             f"unknown dataset data.name='{cfg.data.name}'{suggest(cfg.data.name, DATASETS)}; choose one of {DATASETS}")
    _require(cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    for key in ("val_fraction", "test_fraction"):
        value = getattr(cfg.data, key)
        _require(0 <= value < 1, f"data.{key} must be in [0, 1), got {value}")
    _require(0 < cfg.data.train_fraction <= 1, f"data.train_fraction must be in (0, 1], got {cfg.data.train_fraction}")
    _require(len(cfg.fusion.methods) > 0, "fusion.methods is empty; list at least one of " + str(FUSION_METHODS))
    for method in cfg.fusion.methods:
        _require(method in FUSION_METHODS,
                 f"unknown fusion method '{method}'{suggest(method, FUSION_METHODS)}; choose from {FUSION_METHODS}")
    _require(cfg.finetune.engine in ENGINES,
             f"unknown finetune.engine '{cfg.finetune.engine}'{suggest(cfg.finetune.engine, ENGINES)}; choose one of {ENGINES}")
    _require(cfg.mode in ("fuse", "sync"), f"unknown mode '{cfg.mode}'{suggest(cfg.mode, ['fuse', 'sync'])}; "
             "choose fuse or sync")
    for method in cfg.sync.methods:
        _require(method in SYNC_METHODS,
                 f"unknown sync method '{method}'{suggest(method, SYNC_METHODS)}; choose from {SYNC_METHODS}")
    _require(cfg.sync.unit in ("epoch", "step"), f"sync.unit must be epoch or step, got '{cfg.sync.unit}'")
    _require(cfg.sync.every >= 1, f"sync.every must be >= 1, got {cfg.sync.every}")
    _require(cfg.distributed.timeout_s > 0, f"distributed.timeout_s must be > 0, got {cfg.distributed.timeout_s}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe_keys(cls=Config, prefix: str = ""):
    """Yield one help line per config key: 'train.epochs (int, default 10): ...'."""
    for name, (tp, f) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            yield from describe_keys(tp, f"{prefix}{name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield f"  {prefix}{name} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}"
