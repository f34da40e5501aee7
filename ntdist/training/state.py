"""Per-epoch training state for `--resume`.

A state file is a safetensors checkpoint holding the model, the optimizer's
buffers, the torch RNG state, and in its JSON metadata the epoch, the scheduler
state and the history so far. Restoring it and replaying the remaining epochs
gives the same weights, bit for bit, as a run that was never interrupted,
because the data order depends only on the seed and the epoch.
"""

import os
from typing import List, Optional, Tuple

import torch

from ntdist.errors import UserError
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import read_checkpoint, save_checkpoint


def save_state(path: str, model, spec: ModelSpec, optimizer, scheduler, epoch: int, history: List[dict]) -> None:
    """Atomically write everything needed to continue after `epoch`."""
    extra = {"rng": torch.get_rng_state()}
    opt_state = optimizer.state_dict()
    for index, buffers in opt_state["state"].items():
        for key, value in buffers.items():
            if torch.is_tensor(value):
                extra[f"opt.{index}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    info = {"epoch": epoch, "history": history, "optimizer_groups": groups, "scheduler": _jsonable(scheduler.state_dict())}
    save_checkpoint(path, model, spec, info=info, extra=extra)


def load_state(path: str, model, optimizer, scheduler, epochs: int) -> Tuple[int, List[dict]]:
    """Restore a state file of a stage of `epochs` epochs into `model`, `optimizer` and `scheduler`.

    Returns (epoch, history). The file's metadata is checked like any input: a state
    claiming more epochs than the stage has, or missing a field, is refused.
    """
    meta, state, extra = read_checkpoint(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"state file '{path}' does not fit the configured model ({str(err).splitlines()[0]}); "
                        "resume with the config the run started with, or start again with --overwrite") from None
    try:
        info = meta["info"]
        epoch, history = info["epoch"], info["history"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= epochs:
            raise ValueError(f"epoch {epoch!r} is not one of 0..{epochs}")
        if not _is_history(history, epoch):
            raise ValueError(f"its history does not hold {epoch} epoch records")
        buffers: dict = {}
        for key, value in extra.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                buffers.setdefault(int(index), {})[name] = value
        groups = optimizer.state_dict()["param_groups"]
        for group, saved in zip(groups, info["optimizer_groups"]):
            group.update(saved)
        optimizer.load_state_dict({"state": buffers, "param_groups": groups})
        scheduler.load_state_dict(info["scheduler"])
        torch.set_rng_state(extra["rng"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise UserError(f"state file '{path}' has damaged or forged metadata ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'missing field'}); delete it to redo that stage "
                        "from its start, or pass --overwrite to start the run again") from None
    return epoch, history


def finished_history(path: str, epochs: int) -> Optional[List[dict]]:
    """The history stored in a final checkpoint if it completed `epochs`, else None."""
    if not os.path.exists(path):
        return None
    info = read_checkpoint(path)[0]["info"]
    if not isinstance(info, dict) or info.get("epochs") != epochs or "history" not in info:
        return None
    if not _is_history(info["history"], epochs):
        raise UserError(f"checkpoint '{path}' has damaged or forged metadata (its history does not hold {epochs} "
                        "epoch records); delete it to redo that stage, or pass --overwrite to start again")
    return info["history"]


def _is_history(history, epochs: int) -> bool:
    return isinstance(history, list) and len(history) == epochs and all(isinstance(h, dict) for h in history)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.tolist()
    return value
