"""Building blocks of config values: `opt()` fields and `format_value`.

Every config dataclass declares its fields with `opt` (a default and a one-line
help text), so `ntdist run --help` can list each key with its type, default and
meaning. `format_value` writes a value back the way a dotted override reads it.
"""

import copy
from dataclasses import field

import yaml


def opt(default, help: str):
    """A dataclass field whose `metadata['help']` documents the key."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def format_value(value) -> str:
    """Write a value the way a dotted override (parsed as YAML) reads it back."""
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)
