"""Safetensors checkpoints that carry their model spec.

A checkpoint holds the model's state dict (keys prefixed `model.`), optional
extra tensors (optimizer state, RNG states; prefixed `extra.`) and JSON metadata
with the `ModelSpec`, so `load_model` rebuilds the module from the file alone.
Nothing here unpickles: a file that is not safetensors is refused, and a spec
that names an import path (code of one's own) is built only when the caller
names the same spec, so a crafted file never chooses which code runs. Writes
are atomic (see `records.files`).
"""

import json
import os
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ntdist.errors import UserError
from ntdist.models import ModelSpec, is_import_path
from ntdist.records.files import replacing

FORMAT = 1
# builder arguments that fetch or read weights: a file's metadata never gets to pass them
_BANNED_ARGUMENTS = ("progress", "download", "url", "model_dir", "checkpoint_path", "file_name")


def save_checkpoint(path: str, model: torch.nn.Module, spec: ModelSpec, info: Optional[dict] = None,
                    extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Atomically save `model` with its spec, JSON `info` and `extra` tensors."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous().clone() for k, v in (extra or {}).items()})
    meta = {"format": FORMAT, "model": spec.to_dict(), "info": info or {}}
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata={"ntdist": json.dumps(meta)})


def read_checkpoint(path: str) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Return (metadata, model state dict, extra tensors) of a checkpoint, refusing anything else."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' is not a regular file (a folder, device or FIFO); "
                        "pass a .safetensors file written by ntdist")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("ntdist")
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
    except (ValueError, KeyError, TypeError):
        raise UserError(f"'{path}' has corrupt ntdist metadata; the file was not written by this version of ntdist") from None
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
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


def load_model(path: str, expect_spec: Optional[ModelSpec] = None) -> Tuple[torch.nn.Module, dict]:
    """Rebuild the module stored in `path`; returns (model, metadata)."""
    meta, state, _ = read_checkpoint(path)
    spec = _untrusted_spec(path, meta["model"])
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
