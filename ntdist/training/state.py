"""Training state for `--resume`, written at epoch ends and (with `checkpoint_every_steps`) inside epochs.

A state file is a safetensors checkpoint holding the model, the optimizer's
buffers, the torch RNG states (the CPU one and, where CUDA is available, the
generator of the writing rank's GPU), and in its JSON metadata the epochs done, the scheduler state, the fp16
grad scaler's state (loss scale and growth tracker) and the history so far. A
state written inside an epoch also holds its `position`: the epoch, the batches
done, their loss sum and sample count, the batch size and rank count, and (as a
tensor) the epoch's data order, which a resume checks before it continues with
the next batch. Restoring a state and replaying the rest gives the same weights,
bit for bit, as a run that was never interrupted (on a GPU only with
`train.deterministic`, see docs/PERFORMANCE.md), because the data order depends
only on the seed and the epoch.

A state file also records whose it is (`StateOwner`: the run's config digest,
the stage and member, the seed, the weights' dtype, the stage's epochs), and a
resume refuses a file that belongs to another run or stage, weights of another
dtype, and optimizer buffers that do not fit their parameters. A stage's final
checkpoint records the same owner (`finished_info`), and a resume refuses a
final checkpoint of another owner instead of taking it as the stage's result
(`finished_history`).
"""

import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch

from ntdist.errors import UserError
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import read_checkpoint, save_checkpoint

RUN_CHANGED = ": the config's keys that decide the results, or the bytes of the fusion.members files, differ"


@dataclass(frozen=True)
class StateOwner:
    """Whose a state file is: a resume refuses a file whose owner differs from the stage's own."""

    run: str      # digest of the config keys that decide the results and of fusion.members' bytes (`Run.run_id`)
    part: str     # the stage and member: "training of member 1", "fine-tuning (nt)"
    seed: int     # the seed of the part's initialisation and data order
    dtype: str    # of the model's floating-point tensors
    epochs: int   # the stage's epochs

    @classmethod
    def of(cls, run: str, part: str, seed: int, model, epochs: int) -> "StateOwner":
        return cls(run, part, seed, cls.dtype_of(model), epochs)

    @staticmethod
    def dtype_of(model) -> str:
        """The dtype an owner records for `model`: its first floating-point tensor's ("none" without one)."""
        floats = [t.dtype for t in model.state_dict().values() if t.is_floating_point()]
        return str(floats[0]) if floats else "none"

    def differences(self, saved) -> List[str]:
        """What differs between this owner and the one a file recorded (`saved`: its JSON dict)."""
        if not isinstance(saved, dict):
            return ["it records no owner (written by an older ntdist, or altered)"]
        return [f"{key} {saved.get(key)!r} there, {mine!r} here" + (RUN_CHANGED if key == "run" else "")
                for key, mine in asdict(self).items() if saved.get(key) != mine]


def save_state(path: str, model, spec: ModelSpec, optimizer, scheduler, epoch: int, history: List[dict],
               position: Optional[dict] = None, order: Optional[torch.Tensor] = None, scaler=None,
               owner: Optional[StateOwner] = None) -> None:
    """Atomically write everything needed to continue after `epoch`, or inside epoch `epoch + 1` at `position`
    (a JSON-able dict, see the module docstring) with that epoch's data `order`; `scaler`: the fp16 grad scaler;
    `owner`: whose the file is."""
    extra = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():   # this rank's GPU: the one it trains on, whatever the others see
        extra["cuda_rng"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    if order is not None:
        extra["order"] = order
    opt_state = optimizer.state_dict()
    for index, buffers in opt_state["state"].items():
        for key, value in buffers.items():
            if torch.is_tensor(value):
                extra[f"opt.{index}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    info = {"epoch": epoch, "history": history, "optimizer_groups": groups,
            "scheduler": _jsonable(scheduler.state_dict())}
    if position is not None:
        info["position"] = position
    if scaler is not None:
        info["scaler"] = scaler.state_dict()
    if owner is not None:
        info["owner"] = asdict(owner)
    save_checkpoint(path, model, spec, info=info, extra=extra)


def load_state(path: str, model, optimizer, scheduler, epochs: int,
               scaler=None, owner: Optional[StateOwner] = None) -> Tuple[int, List[dict], Optional[dict]]:
    """Restore a state file of a stage of `epochs` epochs into `model`, `optimizer`, `scheduler` and the fp16
    grad `scaler` when given (a file written without one leaves it at its initial scale).

    Returns (epoch, history, position): `position` is None for a state written at an epoch end, else the
    dict `save_state` was given with its data order under "order". The file's metadata is checked like
    any input: a state claiming more epochs than the stage has, or missing a field, is refused; with
    `owner`, so is a file that records another owner.
    """
    meta, state, extra = read_checkpoint(path)
    info = meta.get("info")
    if owner is not None:
        differences = owner.differences(info.get("owner") if isinstance(info, dict) else None)
        if differences:
            raise UserError(f"state file '{path}' does not belong to {owner.part} of this run ("
                            f"{'; '.join(differences)}); delete it to redo that stage from its start, "
                            "or resume the run it came from")
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and tensor.dtype != own[key].dtype:
            raise UserError(f"state file '{path}' stores '{key}' as {tensor.dtype}, but the model holds "
                            f"{own[key].dtype}; delete it to redo that stage from its start")
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
        buffers = _optimizer_buffers(path, extra, optimizer)
        groups = optimizer.state_dict()["param_groups"]
        for group, saved in zip(groups, info["optimizer_groups"]):
            group.update(saved)
        optimizer.load_state_dict({"state": buffers, "param_groups": groups})
        scheduler.load_state_dict(info["scheduler"])
        if scaler is not None and "scaler" in info:
            scaler.load_state_dict(info["scaler"])
        torch.set_rng_state(extra["rng"])
        _restore_cuda_rng(extra)
        position = info.get("position")
        if position is not None:
            position = _checked_position(position, epoch, extra["order"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise UserError(f"state file '{path}' has damaged or forged metadata ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'missing field'}); delete it to redo that stage "
                        "from its start, or pass --overwrite to start the run again") from None
    return epoch, history, position


def _optimizer_buffers(path: str, extra: dict, optimizer) -> dict:
    """The optimizer buffers of a state file by parameter index, each checked against its parameter: every
    optimizer ntdist builds keeps buffers of the parameter's shape (momentum, moments) and scalar counters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    buffers: dict = {}
    for key, value in extra.items():
        if not key.startswith("opt."):
            continue
        _, index, name = key.split(".", 2)
        index = int(index)
        if not 0 <= index < len(params):
            raise UserError(f"state file '{path}' holds optimizer buffer '{name}' of parameter {index}, but the "
                            f"model has {len(params)} parameters; delete it to redo that stage from its start")
        if value.numel() > 1 and value.shape != params[index].shape:
            raise UserError(f"state file '{path}' holds optimizer buffer '{name}' of shape {list(value.shape)} for "
                            f"parameter {index} of shape {list(params[index].shape)}; delete it to redo that stage "
                            "from its start")
        buffers.setdefault(index, {})[name] = value
    return buffers


def _checked_position(position, epoch: int, order: torch.Tensor) -> dict:
    """The position of a state written inside epoch `epoch + 1`, its fields checked; ValueError if one is wrong."""
    counts = [position[key] for key in ("epoch", "step", "count", "batch_size", "replicas")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise ValueError(f"its position holds {counts}, not counts")
    if position["epoch"] != epoch + 1 or position["batch_size"] < 1 or position["replicas"] < 1:
        raise ValueError(f"its position (epoch {position['epoch']}) does not follow epoch {epoch}")
    sums = position["loss_sums"]
    if not isinstance(sums, list) or len(sums) != position["replicas"] or not all(
            isinstance(x, (int, float)) for x in sums):
        raise ValueError("its position's loss sums do not match its rank count")
    if order.dtype != torch.int64 or order.dim() != 1:
        raise ValueError("its data order is not a list of sample indices")
    return {**position, "order": order}


def _restore_cuda_rng(extra: dict) -> None:
    """Restore the saved GPU generator into this rank's GPU (every rank of a member's group reads its writer's,
    which equals its own: the group's ranks are seeded alike and draw alike). Files written before this
    held every visible GPU's generator as `cuda_rng.<index>`: the one of this rank's index is taken."""
    if not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    saved = extra.get("cuda_rng", extra.get(f"cuda_rng.{device}"))
    if saved is not None:
        torch.cuda.set_rng_state(saved, device)


def finished_info(owner: StateOwner, history: List[dict], **fields) -> dict:
    """The metadata of a stage's final checkpoint: `fields`, the stage's epochs, its `history` and its owner."""
    return {**fields, "epochs": owner.epochs, "history": history, "owner": asdict(owner)}


def finished_history(path: str, owner: StateOwner, required: bool = True) -> Optional[List[dict]]:
    """The history stored in the final checkpoint `path` of `owner`'s stage if it completed the stage, else None.

    A file that records another owner is refused, and so is one that records none when `required` (the run
    directory was written by a version whose final checkpoints record it): a file copied in from another run
    must not pass for this run's.
    """
    if not os.path.exists(path):
        return None
    info = read_checkpoint(path)[0]["info"]
    saved = info.get("owner") if isinstance(info, dict) else None
    if saved is not None or required:
        differences = owner.differences(saved)
        if differences:
            raise UserError(f"checkpoint '{path}' is not the result of {owner.part} of this run ("
                            f"{'; '.join(differences)}); delete it to redo that stage, or set output.dir to a "
                            "new folder")
    epochs = owner.epochs
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
