"""A model's weights read from a file of any common kind, and checked against the model they are meant for.

Files: ntdist checkpoints (tensors under the model's own keys since format 2,
`model.`-prefixed in format 1; `records.checkpoint` writes them), plain
safetensors, and weights-only torch files holding a state dict or a dict with
a `state_dict` entry (a Lightning `.ckpt`). Nothing is unpickled beyond what
`torch.load(weights_only=True)` allows. Weights with NaN or infinite values are
refused when read, naming the file and the tensor.

`fit_state_dict` matches a file's keys to a model: the prefixes that training
wrappers add (`WRAPPER_PREFIXES`: `module.` from DDP, `model.` from Lightning,
`_orig_mod.` from torch.compile) are removed when every key carries one and the
model has no module of that name; anything else that does not fit is refused with
one line naming the first tensor that differs (a missing or unexpected key, a
shape, a dtype) or the prefix that stands in the way.
"""

import json
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from ntdist.errors import UserError

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")   # DDP, Lightning (and ntdist format 1), torch.compile
EXTRA_PREFIX = "extra."   # the stored names of a checkpoint's extra tensors (optimizer buffers, RNG states)
META_KEY = "ntdist"       # the safetensors metadata entry that holds ntdist's JSON


def split_checkpoint(meta: dict, tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor],
                                                                            Dict[str, torch.Tensor]]:
    """(model state dict, extra tensors) of an ntdist checkpoint's tensors, for either format.

    Format 1 stored the model under `model.<key>`; format 2 stores it under its own keys and lists the
    stored names of its extra tensors (`extra.<name>`) in the metadata's "extra"."""
    if meta.get("format", 1) == 1:
        return ({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)})
    listed = set(meta.get("extra") or ())
    return ({k: v for k, v in tensors.items() if k not in listed},
            {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k in listed})


def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state dict, ntdist metadata or None) of a weights file: an ntdist checkpoint's model tensors, a plain
    safetensors file, or a weights-only torch file (its `state_dict` entry when it has one)."""
    if not os.path.isfile(path):
        raise UserError(f"weights file '{path}' {what_it_is(path)}; give a .safetensors or torch state-dict file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"'{path}' is not a readable safetensors file ({err})") from None
        if raw is None:
            return finite(path, tensors), None
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict) or not isinstance(meta.get("extra", []), list):
                raise ValueError("not a JSON object")
        except ValueError:
            raise UserError(f"'{path}' has corrupt ntdist metadata; the file was not written by this version of "
                            "ntdist") from None
        return finite(path, split_checkpoint(meta, tensors)[0]), meta
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle and zip errors of every kind mean the same here
        raise UserError(f"'{path}' {_unreadable(err)}; save the model's state_dict() with "
                        "safetensors.torch.save_file or torch.save") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]   # a Lightning checkpoint, or {"state_dict": ..., "epoch": ...} of one's own
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"'{path}' does not hold a state dict (a mapping of names to tensors); "
                        "save model.state_dict(), not the model")
    return finite(path, state), None


def _unreadable(err: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words: torch's own message is a page long."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"holds a pickled {found.group(1)}, not a state dict (a mapping of names to tensors); "
                "ntdist unpickles no objects")
    found = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    reason = found.group(1) if found else text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"is neither a safetensors file nor a torch state dict saved by torch.save ({reason.strip()[:120]})"


def what_it_is(path: str) -> str:
    """What stands at `path` that is not a regular file, in words: "does not exist", "is a directory", ..."""
    if not os.path.lexists(path):
        return "does not exist"
    if not os.path.exists(path):
        return "is a broken symbolic link"
    if os.path.isdir(path):
        return "is a directory, not a file"
    return "is not a regular file (a device, FIFO or socket)"


def finite(path: str, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state`, unless one of its floating-point tensors holds NaN or infinite values: then a UserError naming it."""
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise UserError(f"'{path}': tensor '{key}' holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                                "the weights were saved from a run that diverged: use an earlier checkpoint")
    return state


def unwrap(state: Dict[str, torch.Tensor], own_keys) -> Dict[str, torch.Tensor]:
    """`state` without the wrapper prefixes that every key carries and no key of the model starts with."""
    own = list(own_keys)
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)
                       and not any(k.startswith(p) for k in own)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _common_prefix(keys: List[str]) -> Optional[str]:
    """The first dotted component that every key shares ('backbone.'), or None."""
    firsts = {k.split(".", 1)[0] + "." for k in keys if "." in k}
    return firsts.pop() if len(firsts) == 1 and all("." in k for k in keys) else None


def first_difference(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> Optional[str]:
    """What first differs between a file's `state` and a model's own state dict, in a few words, or None.

    Keys in the model's order: missing, then a shape, then a dtype (floating-point values of another precision
    are cast, as load_state_dict does; a floating-point value where the model holds integers is not);
    then the file's unexpected keys."""
    if state and own and not set(state) & set(own):
        for wrapper in WRAPPER_PREFIXES:   # a wrapper's model beside tensors of its own (a Lightning loss's weights)
            others = [k for k in state if not k.startswith(wrapper)]
            if others and set(own) <= {k[len(wrapper):] for k in state if k.startswith(wrapper)}:
                return (f"the model's keys carry the prefix '{wrapper}', beside {len(others)} other tensors "
                        f"('{others[0]}'); save the wrapped model's own state_dict()")
        prefix = _common_prefix(list(state))
        if prefix is not None and _common_prefix(list(own)) != prefix:
            fits = {k[len(prefix):] for k in state} == set(own)
            return (f"every key starts with '{prefix}' ('{next(iter(state))}'), a prefix ntdist does not remove "
                    f"(it removes {', '.join(WRAPPER_PREFIXES)}){'; without it the keys fit' if fits else ''}")
    for key, mine in own.items():
        if key not in state:
            return f"missing key '{key}'"
        given = state[key]
        if tuple(given.shape) != tuple(mine.shape):
            return f"'{key}' has shape {list(given.shape)}, the model {list(mine.shape)}"
        if given.dtype != mine.dtype and not (given.is_floating_point() and mine.is_floating_point()):
            return f"'{key}' is stored as {given.dtype}, the model holds {mine.dtype}"
    unexpected = [k for k in state if k not in own]
    if unexpected:
        wrapped = next((p for p in WRAPPER_PREFIXES if unexpected[0].startswith(p)), None)
        why = f" (keys with and without the prefix '{wrapped}' are mixed)" if wrapped else ""
        return f"unexpected key '{unexpected[0]}'{why}"
    return None


def fit_state_dict(state: Dict[str, torch.Tensor], model: torch.nn.Module, what: str, target: str,
                   hint: str) -> Dict[str, torch.Tensor]:
    """`state` with wrapper prefixes removed, ready for a strict `model.load_state_dict`; otherwise a UserError
    "{what} does not fit {target} ({the first difference}); {hint}"."""
    own = model.state_dict()
    state = unwrap(state, own)
    problem = first_difference(state, own)
    if problem is not None:
        raise UserError(f"{what} does not fit {target} ({problem}); {hint}")
    return state


def load_weights(model: torch.nn.Module, path: str, target: str, hint: str) -> dict:
    """Load the weights file `path` into `model` (strictly, wrappers removed); returns the file's ntdist
    metadata ({} for a plain file). `target` names the model in an error ("resnet18 {'num_classes': 10}")."""
    state, meta = read_weights(path)
    what = f"'{path}'"
    saved = meta.get("model") if meta is not None else None
    if isinstance(saved, dict) and f"{saved.get('name')} {saved.get('kwargs')}" != target:
        what += f" (saved from {saved.get('name')} {saved.get('kwargs')})"
    model.load_state_dict(fit_state_dict(state, model, what, target, hint), strict=True)
    return meta or {}
