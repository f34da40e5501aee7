"""Safetensors checkpoints that carry their model spec.

A checkpoint holds the model's state dict under the model's own keys, so
`model.load_state_dict(safetensors.torch.load_file(path))` works on a final
checkpoint; optional extra tensors (optimizer state, RNG states of a state file;
stored as `extra.<name>` and listed in the metadata); and JSON metadata with the
`ModelSpec`, so `load_model` rebuilds the module from the file alone. Files of
format 1 (model keys prefixed `model.`) are still read (`models.statedict.split_checkpoint`).
Nothing here unpickles: a file that is not safetensors is refused, and a spec
that names an import path (code of one's own) is built only when the caller
names the same spec, so a crafted file never chooses which code runs. Writes
are atomic (see `records.files`).
"""

import errno
import json
import os
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ntdist.errors import UserError
from ntdist.models import ModelSpec, is_import_path
from ntdist.models.statedict import EXTRA_PREFIX, META_KEY, split_checkpoint
from ntdist.records.files import replacing

FORMAT = 2        # 1: model tensors under model.<key>; 2: under their own keys, extras listed in the metadata
# builder arguments that fetch or read weights: a file's metadata never gets to pass them
_BANNED_ARGUMENTS = ("progress", "download", "url", "model_dir", "checkpoint_path", "file_name")


def save_checkpoint(path: str, model: torch.nn.Module, spec: ModelSpec, info: Optional[dict] = None,
                    extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Atomically save `model` with its spec, JSON `info` and `extra` tensors."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    stored = {f"{EXTRA_PREFIX}{k}": v.detach().cpu().contiguous().clone() for k, v in (extra or {}).items()}
    assert not set(stored) & set(tensors), f"model keys clash with extra tensors: {sorted(set(stored) & set(tensors))}"
    tensors.update(stored)
    with replacing(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=checkpoint_metadata(spec, info, sorted(stored)))
        except SafetensorError as err:   # safetensors reports an OS error as text: a full disk becomes ENOSPC again
            if "StorageFull" in str(err) or f"code: {errno.ENOSPC}," in str(err):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp) from None
            raise


def checkpoint_metadata(spec: ModelSpec, info: Optional[dict] = None, extra=()) -> Dict[str, str]:
    """The safetensors metadata of a checkpoint of `spec`: ntdist's JSON (format, spec, input shape, `info`,
    the stored names of the `extra` tensors) under META_KEY."""
    meta = {"format": FORMAT, "model": spec.to_dict(), "info": info or {}}
    if spec.input_shape is not None:
        meta["input_shape"] = list(spec.input_shape)
    if extra:
        meta["extra"] = list(extra)
    return {META_KEY: json.dumps(meta)}


def read_checkpoint(path: str) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Return (metadata, model state dict, extra tensors) of a checkpoint, refusing anything else."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' is not a regular file (a folder, device or FIFO); "
                        "pass a .safetensors file written by ntdist")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"'{path}' is not a readable safetensors checkpoint ({err}); ntdist never loads pickles: "
                        "re-save the weights with ntdist or safetensors") from None
    if raw is None:
        raise UserError(f"'{path}' is a safetensors file without ntdist metadata (no model spec); "
                        "save it with ntdist so the model can be rebuilt")
    try:
        meta = json.loads(raw)
        meta["model"]["name"], meta["model"]["kwargs"]
        if meta.get("format", 1) not in (1, FORMAT) or not isinstance(meta.get("extra", []), list):
            raise ValueError(f"format {meta.get('format')}")
    except (ValueError, KeyError, TypeError):
        raise UserError(f"'{path}' has corrupt ntdist metadata; the file was not written by this version of ntdist") from None
    state, extra = split_checkpoint(meta, tensors)
    return meta, state, extra


def _plain(value) -> bool:
    scalar = (int, float, bool, str, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(x, scalar) for x in value))


def _untrusted_spec(path: str, data) -> ModelSpec:
    """The model spec of a file, treated as untrusted data: plain values only, no weight or download arguments."""
    data = data if isinstance(data, dict) else {}
    name, kwargs = data.get("name"), data.get("kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict) or not all(
            isinstance(k, str) and _plain(v) for k, v in kwargs.items()):
        raise UserError(f"'{path}' has a malformed model spec in its metadata; the file was not written by ntdist")
    banned = sorted(k for k in kwargs if k in _BANNED_ARGUMENTS or k.startswith("weights") or "pretrained" in k)
    if banned:
        raise UserError(f"'{path}' asks for the model arguments {banned}, which would load or download weights; "
                        "ntdist takes weights only from the checkpoint's tensors")
    return ModelSpec(name, dict(kwargs))


def file_spec(path: str, meta: dict) -> ModelSpec:
    """The spec stored in a checkpoint's metadata `meta`, checked as untrusted data, with its input shape."""
    spec = _untrusted_spec(path, meta.get("model"))
    shape = meta.get("input_shape")
    if shape is None:
        return spec
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise UserError(f"'{path}' has a malformed input_shape {shape!r} in its metadata; the file was not "
                        "written by ntdist")
    return ModelSpec(spec.name, spec.kwargs, tuple(shape))


def load_model(path: str, expect_spec: Optional[ModelSpec] = None) -> Tuple[torch.nn.Module, dict]:
    """Rebuild the module stored in `path`; returns (model, metadata)."""
    meta, state, _ = read_checkpoint(path)
    spec = file_spec(path, meta)
    if expect_spec is not None and spec != expect_spec:
        raise UserError(f"checkpoint '{path}' holds {spec.name} {spec.kwargs}, but the config asks for "
                        f"{expect_spec.name} {expect_spec.kwargs}; use a matching config or a new run directory")
    if expect_spec is None and is_import_path(spec.name):
        raise UserError(f"checkpoint '{path}' names the model '{spec.name}', code that ntdist runs only when you "
                        f"name it yourself: pass --model {spec.name} (and --model-kwargs) if you trust it")
    try:
        model = spec.build()
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"checkpoint '{path}' holds a model spec that cannot be built "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tensor.dtype != expected[key].dtype:
            raise UserError(f"checkpoint '{path}' stores '{key}' as {tensor.dtype}, but the model holds "
                            f"{expected[key].dtype}; the file is damaged or was altered")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"checkpoint '{path}' does not fit its own model spec ({str(err).splitlines()[0]}); "
                        "the file is damaged") from None
    return model, meta
