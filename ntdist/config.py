"""The typed config tree: defaults, then a YAML file, then dotted command-line overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.epochs=5", "fusion.methods=[nt,avg]"])

Each section's dataclass lives beside the code it configures and checks its own
values in `__post_init__`; OmegaConf merges the layers and checks keys and
types, and its errors become one-line `UserError`s that name the key and
suggest the closest valid one. YAML files hold only what differs from the defaults.
"""

import dataclasses
import os
import re
import stat
import typing
from dataclasses import dataclass
from typing import List

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ntdist.data import DataConfig
from ntdist.distributed.world import DistributedConfig
from ntdist.errors import UserError, check_choice, suggest
from ntdist.fusion.config import FusionConfig, expand_members
from ntdist.models import ModelConfig
from ntdist.options import opt
from ntdist.records.trackers import TRACKERS, check_trackers
from ntdist.training.config import FinetuneConfig, SyncConfig, TrainConfig

MODES = ("fuse", "sync")


@dataclass
class OutputConfig:
    """Where a run writes its files."""

    dir: str = opt("runs/default", "run directory (config, metrics.jsonl, checkpoints, results.json)")
    diversity: bool = opt(True, "measure member disagreement and near-duplicate units before fusing")
    duplicate_threshold: float = opt(0.95, "cosine similarity above which two units count as near-duplicates")
    duplicate_max_units: int = opt(512, "near-duplicate check: units sampled per member and layer (0: all; the cost "
                                        "grows as k^2 x this x the layer's parameters)")
    trackers: List[str] = opt(["jsonl"], "where rank 0 sends metrics: " + " | ".join(TRACKERS)
                              + " (jsonl is always needed; tensorboard needs pip install 'ntdist[tensorboard]')")
    log_every_steps: int = opt(0, "also log rank 0's batch loss and the lr every this many steps (0: per epoch only)")

    def __post_init__(self):
        check_trackers(self.trackers)
        if self.log_every_steps < 0:
            raise UserError(f"output.log_every_steps must be >= 0 (0: per epoch only), got {self.log_every_steps}")
        if not self.dir.strip():
            raise UserError("output.dir is empty (an unset shell variable?); set it to the run's folder, "
                            "e.g. output.dir=runs/my-run")
        if self.duplicate_max_units < 0:
            raise UserError(f"output.duplicate_max_units must be >= 0 (0: every unit), got {self.duplicate_max_units}")
        if not 0 < self.duplicate_threshold <= 1:
            raise UserError(f"output.duplicate_threshold is a cosine similarity in (0, 1], got {self.duplicate_threshold}")


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

    def __post_init__(self):
        check_choice(self.mode, MODES, "mode")
        if self.mode == "sync" and self.fusion.repair == "lstsq":
            raise UserError("fusion.repair=lstsq does not apply to mode sync: its NT merges are never repaired "
                            "(the experiment is NT as the sync step); leave fusion.repair at auto or none")
        if self.mode == "sync" and (self.train.label_smoothing or self.train.grad_clip):
            raise UserError("train.label_smoothing and train.grad_clip do not apply to mode sync (its replicas take "
                            "plain cross-entropy steps); set them to 0, or use mode fuse")
        if self.fusion.members and self.mode == "sync":
            raise UserError("fusion.members are members trained elsewhere, and mode: sync trains its own replicas; "
                            "drop one of them")
        if self.fusion.members and self.model.weights:
            raise UserError("fusion.members are trained already, so nothing starts from model.weights; drop "
                            "model.weights (and model.reinit)")


MAX_CONFIG_BYTES = 1 << 20   # a config is a few hundred bytes; anything near this is a mistake or an attack


class _Loader(yaml.SafeLoader):
    """Safe YAML, stricter: no duplicate keys, no aliases of lists or mappings (an alias bomb), and
    `1e-4` read as a float (YAML 1.1 reads it as a string), the notation everyone writes for learning rates."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            if not isinstance(self.anchors.get(event.anchor), (yaml.ScalarNode, type(None))):
                raise ComposerError(None, None, f"the alias *{event.anchor} repeats a list or mapping, which ntdist "
                                    "configs do not allow; write the values out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<" and key in seen:
                raise ConstructorError(None, None, f"the key '{key}' appears twice in one mapping; keep one",
                                       key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?\d*\.\d+$|^[-+]?\d+\.$"),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _lookup(tree, dotted: str):
    """(the field type at `dotted` in the Config tree or None, the value at `dotted` in `tree` or None)."""
    cls, value = Config, tree
    for part in dotted.split("."):
        fields = _fields(cls) if dataclasses.is_dataclass(cls) else {}
        cls = fields[part][0] if part in fields else None
        value = value.get(part) if isinstance(value, dict) else None
    return cls, value


def _user_error(err: OmegaConfBaseException, layer: dict, command: str = "run") -> UserError:
    """One line naming the key, for an OmegaConf key or type error (`command`'s help lists the keys)."""
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        parent, _, name = key.rpartition(".")
        parent_cls = _lookup({}, parent)[0] if parent else Config
        choices = _fields(parent_cls) if dataclasses.is_dataclass(parent_cls) else {}
        close = suggest(name, choices).replace("'", f"'{parent + '.' if parent else ''}", 1)
        return UserError(f"unknown config key '{key}'{close}; run 'ntdist {command} --help' for the list of keys")
    if isinstance(err, ValidationError) and key:
        tp, value = _lookup(layer, key)
        if tp is not None and dataclasses.is_dataclass(tp):
            return UserError(f"config section '{key}' must be a mapping of keys, got {value!r}")
        expected = _type_name(tp) if tp is not None else "another type"
        return UserError(f"config key '{key}' expects {expected}, got {value!r} ({type(value).__name__})"
                         + _list_hint(key, expected, value))
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"the config does not fit ntdist's config keys ({first}); run 'ntdist {command} --help'")


def _list_hint(key: str, expected: str, value) -> str:
    """How to write a list on the command line, for a string given where `expected` is a list."""
    if not (expected.startswith("List") and isinstance(value, str)):
        return ""
    if value.lstrip().startswith("["):
        return f" that YAML cannot read as a list; quote its items: '{key}=[\"a\",\"b\"]'"
    return f"; write a list in brackets: '{key}=[a,b]' (quoted for the shell)"


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
    """The mapping in the YAML file `path`; anything but a small regular text file is refused first."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"config file '{path}' not found; pass a YAML file such as configs/quickstart.yaml") from None
    except OSError as err:
        raise UserError(f"cannot read config file '{path}' ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"config file '{path}' is a folder; pass a YAML file such as configs/quickstart.yaml")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"config file '{path}' is not a regular file (a device, FIFO or socket); pass a YAML file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise UserError(f"config file '{path}' has {info.st_size} bytes; an ntdist config is at most "
                        f"{MAX_CONFIG_BYTES} bytes (is it the right file?)")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
        data = yaml_load(text) or {}
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not a UTF-8 text file; pass a YAML file") from None
    except OSError as err:
        raise UserError(f"cannot read config file '{path}' ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | None = None, overrides=(), extra_keys=(), command: str = "run") -> Config:
    """Merge defaults <- YAML file <- overrides and return a validated `Config`.

    `extra_keys` names top-level YAML keys that a caller handles itself (e.g. a sweep);
    they are dropped here. Errors point to `ntdist <command> --help` for the keys.
    """
    layers = [read_yaml(path)] if path else []
    layers += [parse_override(o) for o in overrides]
    merged = OmegaConf.structured(Config)
    for layer in layers:
        layer = {k: v for k, v in layer.items() if k not in extra_keys}
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _user_error(err, layer, command) from None
    if merged.fusion.members:
        merged.fusion.members = expand_members(list(merged.fusion.members))
    if merged.fusion.members and not any(_sets(layer, ("fusion", "k")) for layer in layers):
        merged.fusion.k = len(merged.fusion.members)   # the number of members given, unless fusion.k is set
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _user_error(err, {}, command) from None


def _sets(layer: dict, path) -> bool:
    """Whether the nested mapping `layer` (a YAML file or an override) holds the key `path`."""
    for part in path:
        if not isinstance(layer, dict) or part not in layer:
            return False
        layer = layer[part]
    return True


def load_keys(overrides, keys, command: str, preset=()) -> Config:
    """A validated `Config` from the dotted `overrides` of a command that takes only some of `ntdist run`'s
    keys (`keys`), merged after `preset` (what the command sets itself) exactly as `ntdist run` merges its own."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" in item and key not in keys:
            if _lookup({}, key)[0] is not None:
                raise UserError(f"ntdist {command} does not take {key} (a key of ntdist run); run "
                                f"'ntdist {command} --help' for the keys it takes")
            raise UserError(f"unknown config key '{key}'{suggest(key, keys)}; run 'ntdist {command} --help' for "
                            "the keys it takes")
    return load_config(None, [*preset, *overrides], command=command)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe_keys(cls=Config, prefix: str = "", only=None):
    """Yield one help line per config key (of those in `only`, when given): 'train.epochs (int, default 10): ...'."""
    for name, (tp, f) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            yield from describe_keys(tp, f"{prefix}{name}.", only)
            continue
        if only is not None and f"{prefix}{name}" not in only:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield f"  {prefix}{name} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}"
