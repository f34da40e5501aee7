"""`opt()`: a dataclass field with a default and a one-line help text.

Every config dataclass declares its fields with `opt`, so `ntdist run --help`
can list each key with its type, default and meaning.
"""

import copy
from dataclasses import field


def opt(default, help: str):
    """A dataclass field whose `metadata['help']` documents the key."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
