"""Building blocks of config values: `opt()` fields, `format_value` and import paths.

Every config dataclass declares its fields with `opt` (a default and a one-line
help text), so `ntdist run --help` can list each key with its type, default and
meaning. `format_value` writes a value back the way a dotted override reads it.
`import_callable` resolves the `package.module:callable` values of `model.name`
and `data.name` (a model or dataset of one's own).
"""

import copy
import importlib
import json
import os
import sys
from dataclasses import field

import yaml

from ntdist.errors import UserError


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
    if isinstance(value, str) and _reads_back(value) != [value]:
        return json.dumps(value)   # a JSON string is a double-quoted YAML string: '1.0', 'yes', 'a?.pt' in a list
    return str(value)


def _reads_back(text: str):
    """What YAML reads from `text` as a list item (the strictest place a value stands in an override)."""
    try:
        return yaml.safe_load(f"[{text}]")
    except yaml.YAMLError:
        return None


HF_PREFIX = "hf:"   # model.name hf:<folder>: a Hugging Face model saved with save_pretrained (models.hf)


def is_import_path(name: str) -> bool:
    """`package.module:callable` (a model or dataset of one's own), as opposed to `torchvision:<name>` and
    `hf:<folder>`."""
    return ":" in name and not name.startswith(("torchvision:", HF_PREFIX))


def import_callable(path: str, what: str):
    """The callable named by `package.module:callable`, importable from the current directory or installed."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UserError(f"{what} '{path}' is not of the form package.module:callable")
    if not all(part.isidentifier() for part in module_name.split(".")):   # a file path: '../mods', 'a/b.py'
        raise UserError(f"{what} '{path}': '{module_name}' is a path, not a module name; write the module's import "
                        "path (package.module:callable) and run from the folder that holds it, or add that "
                        "folder to PYTHONPATH")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())   # as `python -m` would: a user's module beside the config
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{what} '{path}': cannot import '{module_name}' ({err}); run from the folder that "
                        "holds it or install its package") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"{what} '{path}': module '{module_name}' has no '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{what} '{path}' is not callable")
    return target
