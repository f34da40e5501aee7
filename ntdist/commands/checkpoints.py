"""Checkpoints named on the command line, as models: the spec that rebuilds them, their data and input shape.

`ntdist fuse` and `ntdist eval` take ntdist's checkpoints, which carry their model
spec (and, when written by `ntdist run`, one input's shape), and plain state dicts
from elsewhere (safetensors, weights-only torch files, Lightning `.ckpt`), rebuilt
from `--model NAME --model-kwargs JSON`. A `--model` that names the architecture an
ntdist checkpoint stores keeps the stored kwargs (`--model-kwargs` overrides them).

A Hugging Face folder (`hf:DIR`, or a folder holding config.json) is a
checkpoint too: its config names the architecture (`models.hf`), its safetensors
(sharded or not) hold the weights; `--model hf:DIR` gives the architecture of
plain state dicts and folders alike.

`--data` takes the data settings of `ntdist run`: a YAML config (its `data:`
section; a run directory's config.yaml does) and/or dotted `data.key=value`
overrides; the data fill in the model's class count and input shape as in a run.
"""

import json
import os
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

from ntdist.config import load_config
from ntdist.data import DataConfig, Splits, load_splits
from ntdist.errors import UserError
from ntdist.options import HF_PREFIX
from ntdist.models import ModelSpec, complete_kwargs, hf
from ntdist.models.statedict import META_KEY, fit_state_dict, load_weights
from ntdist.records.checkpoint import file_spec, load_model
from ntdist.sweep import SWEEP_KEYS

GUESSED_SHAPE = (3, 32, 32)   # an image batch: the input of a model whose spec says nothing about it


def parse_model_kwargs(text: Optional[str]) -> dict:
    """`--model-kwargs` as a dict: a JSON object such as '{"num_classes": 10}'."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise UserError(f"--model-kwargs is not valid JSON ({err}); write e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"--model-kwargs must be a JSON object such as '{{\"num_classes\": 10}}', got {text}")
    return value


def model_spec(model: Optional[str], model_kwargs: Optional[str]) -> Optional[ModelSpec]:
    """The spec of `--model NAME --model-kwargs JSON`, or None to use the one stored in the checkpoints."""
    if model is None:
        if model_kwargs:
            raise UserError("--model-kwargs needs --model (the checkpoints' own spec already holds its kwargs)")
        return None
    return ModelSpec(model, parse_model_kwargs(model_kwargs))


def parse_input_shape(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """`--input-shape 1,40` (one input, without the batch dimension) as a tuple."""
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UserError(f"--input-shape takes one input's shape without the batch dimension, e.g. 1,40 or "
                        f"3,32,32; got '{text}'")
    return shape


def data_settings(items: Sequence[str], command: str) -> DataConfig:
    """The `data:` section that `--data ITEM...` describes: at most one YAML config, then data.* overrides."""
    configs = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if len(configs) > 1:
        raise UserError(f"--data takes one YAML config and data.key=value overrides, got {len(configs)} files: "
                        f"{configs}")
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("data."):
            raise UserError(f"--data takes data.key=value overrides (the data keys of ntdist run), got '{item}'")
    return load_config(configs[0] if configs else None, overrides, extra_keys=SWEEP_KEYS, command=command).data


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")   # weights-only torch files (a .ckpt: Lightning's)


def _header(path: str) -> Optional[dict]:
    """The safetensors metadata of `path` ({} when it has none), or None when it is no readable safetensors file."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None


def _stored(path: str) -> Optional[ModelSpec]:
    """The spec stored in the ntdist checkpoint `path` with its input shape; None for a plain state dict.
    Anything that is neither is refused here, with load_model's message (missing, unreadable, a pickle)."""
    if os.path.isdir(path):
        hf.folder(path, "checkpoint")   # raises: a folder is a checkpoint only when it holds config.json
    header = _header(path) if os.path.isfile(path) else None
    if header is None and not (os.path.isfile(path) and path.endswith(TORCH_SUFFIXES)):
        load_model(path)   # raises: missing, not a file, not safetensors
    if not header or META_KEY not in header:
        return None
    try:
        meta = json.loads(header[META_KEY])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"'{path}' has corrupt ntdist metadata; the file was not written by this version of ntdist")
    return file_spec(path, meta)


def resolve_spec(paths: Sequence[str], given: Optional[ModelSpec], splits: Optional[Splits] = None,
                 input_shape: Optional[Tuple[int, ...]] = None) -> ModelSpec:
    """The spec that rebuilds every checkpoint in `paths`: `given` (--model), with the stored kwargs when the
    first file stores the same architecture, else the first file's own; kwargs the data fill in completed
    from `splits`; the input shape from `input_shape`, the data or the file, in that order."""
    stored = hf_spec(paths[0]) if hf.is_hf(paths[0]) else _stored(paths[0])
    if given is None:
        if stored is None:
            raise UserError(f"'{paths[0]}' is a plain state dict without a model spec; pass --model NAME "
                            "(e.g. torchvision:resnet18) and --model-kwargs JSON to rebuild it")
        if not hf.is_hf(paths[0]):
            load_model(paths[0])   # the file's own spec builds and fits; a file never chooses which code runs
        spec = stored
    elif stored is not None and stored.name == given.name:
        spec = ModelSpec(given.name, {**stored.kwargs, **given.kwargs}, stored.input_shape)
    else:
        spec = given
    if splits is not None:
        spec = ModelSpec(spec.name, complete_kwargs(spec.name, spec.kwargs, splits.in_shape, splits.num_classes),
                         tuple(splits.in_shape))
    return spec if input_shape is None else replace(spec, input_shape=tuple(input_shape))


def hf_spec(path: str) -> ModelSpec:
    """The spec of a Hugging Face folder (`hf:DIR` or DIR): its config, with one input's shape."""
    name = path if path.startswith(HF_PREFIX) else HF_PREFIX + path
    return ModelSpec(name, {}, hf.input_shape(hf.load_config(hf.folder(name, "checkpoint"))))


def usable_device(device: str) -> torch.device:
    """`--device` as a torch.device on which a tensor can be made."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"--device {device} is not usable here ({str(err).splitlines()[0]}); use cpu or cuda") from None
    if dev.type == "meta":   # tensors without values: every weight would be lost
        raise UserError(f"--device {device} holds shapes but no values, so nothing can be computed there; use cpu "
                        "or cuda")
    return dev


@dataclass(frozen=True)
class ModelSource:
    """How the checkpoints named on the command line become models: the flags that `ntdist fuse` and
    `ntdist eval` share."""

    model: Optional[str] = None             # --model: a registry name, torchvision:<name> or package.module:callable
    model_kwargs: Optional[str] = None      # --model-kwargs: a JSON object
    data: Sequence[str] = ()                # --data: a YAML config and/or data.key=value overrides
    input_shape: Optional[str] = None       # --input-shape: one input's shape, e.g. 1,40

    def data_config(self, command: str) -> DataConfig:
        """The `data:` section that --data describes (checked as ntdist run checks it)."""
        return data_settings(self.data, command)

    def splits(self, command: str) -> Optional[Splits]:
        """The data `--data` names (loaded and checked as ntdist run loads them), or None without --data."""
        return load_splits(self.data_config(command)) if self.data else None

    def spec(self, paths: Sequence[str], splits: Optional[Splits] = None) -> ModelSpec:
        """The spec that rebuilds the checkpoints `paths` (`resolve_spec`)."""
        return resolve_spec(paths, model_spec(self.model, self.model_kwargs), splits,
                            parse_input_shape(self.input_shape))


def load_checkpoints(paths: Sequence[str], spec: ModelSpec, hint: str) -> List[torch.nn.Module]:
    """Every file of `paths` loaded into a model built from `spec`; one line naming the first differing tensor
    (or the prefix in the way) for a file that does not fit."""
    models, first = [], None if hf.is_hf(paths[0]) else _stored(paths[0])
    for path in paths:
        if hf.is_hf(path):   # a Hugging Face folder: the config's architecture, its safetensors weights
            model = spec.build()
            state = hf.folder_state(hf.folder(path, "checkpoint"), model)
            model.load_state_dict(fit_state_dict(state, model, f"'{path}'", f"{spec.name} {spec.kwargs}", hint))
        else:
            own = _member_spec(spec, first, _stored(path))
            model = own.build()
            load_weights(model, path, f"{own.name} {own.kwargs}", hint)
        models.append(model)
    return models


def _member_spec(spec: ModelSpec, first: Optional[ModelSpec], stored: Optional[ModelSpec]) -> ModelSpec:
    """The spec of one member: `spec`, with the kwargs its own checkpoint stores where they differ from the first
    member's (members of different widths: `ntdist fuse` returns the first member's structure)."""
    if stored is None or first is None or stored.name != spec.name:
        return spec
    differ = {k: v for k, v in stored.kwargs.items() if first.kwargs.get(k) != v}
    return replace(spec, kwargs={**spec.kwargs, **differ}) if differ else spec


def example_input(spec: ModelSpec) -> Tuple[torch.Tensor, bool]:
    """(a dummy batch of two inputs, whether its shape was guessed) for tracing the model of `spec`: the stored
    input shape, else what its kwargs say (input_dim; in_channels, image_size or length), else an image batch."""
    kw = spec.kwargs
    if spec.name.startswith(HF_PREFIX):   # token ids for a text model
        return hf.example_input(spec.name, kw, spec.input_shape), False
    if spec.input_shape is not None:
        return torch.zeros(2, *spec.input_shape), False
    if "input_dim" in kw:
        return torch.zeros(2, kw["input_dim"]), False
    if "length" in kw:
        return torch.zeros(2, kw.get("in_channels", 1), kw["length"]), False
    known = "in_channels" in kw or "image_size" in kw
    channels, size = kw.get("in_channels", GUESSED_SHAPE[0]), kw.get("image_size", GUESSED_SHAPE[-1])
    return torch.zeros(2, channels, size, size), not known
