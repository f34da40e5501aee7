"""Training the ensemble members, each with its own seed, on the ranks the layout assigns.

Member i is initialised and shuffled with its own seed (`member_seed`), so the members
are diverse and a member trained by any rank layout has the same weights as the
one trained alone in a single process.
"""

import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from ntdist.models.weights import build_member
from ntdist.preempt import preempt_requested
from ntdist.training.batches import eval_batches, feed, train_batches
from ntdist.training.hardware import tf32, use_channels_last
from ntdist.training.config import member_seed
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.loop import (EpochPosition, Precision, check_finite, epoch_stats, evaluate, grad_clipper,
                                  step_logger, train_epoch)
from ntdist.training.resume import ResumableEpochs
from ntdist.stages.context import Run, member_part
from ntdist.stages.vectorized import member_batches, probe, train_together, why_not



def use_sync_batchnorm(model: torch.nn.Module, group) -> Callable[[], None]:
    """Replace the BatchNorm layers of `model` in place by SyncBatchNorm over `group`, so that W ranks with batch
    B normalise with the statistics of all W*B samples, as one process would; returns the function that puts
    the original layers back (they share their tensors with the synchronised ones, so they hold what was
    trained). torch synchronises only CUDA (and XPU, HPU) tensors: the caller uses it on those devices."""
    originals = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and name]
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    assert converted is model, "a model that is a BatchNorm layer itself"

    def restore() -> None:
        for name, module in originals:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
    return restore


def train_member(r: Run, index: int, group=None) -> Tuple[torch.nn.Module, List[dict]]:
    """Train member `index` (with DDP inside `group` when its group has several ranks); returns (model, history).

    The group's first rank writes the state after every epoch; with `--resume` an existing
    state file is restored first. Preemption is checked at each epoch boundary.
    """
    cfg, world = r.cfg, r.world
    seed = member_seed(cfg.train, index)
    model = build_member(r.spec, seed, r.initial, r.cfg.model.reinit).to(world.device)
    note = use_channels_last(model, cfg.train.channels_last, world.device)
    if note:
        world.print0(f"ntdist: member {index}: {note}", file=sys.stderr)
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    group_size = r.layout.group_size
    group_rank = world.rank % group_size
    precision = Precision(cfg.train.precision, world.device)
    epochs = ResumableEpochs(member_part(index), cfg.train.epochs, model, optimizer, scheduler, r.spec,
                             r.rundir.member_state(index), group_rank == 0, r.resume,
                             cfg.train.checkpoint_every_steps, precision.scaler, run_id=r.run_id, seed=seed)
    # CPU ranks keep per-rank BatchNorm statistics: torch cannot synchronise them there (docs/PERFORMANCE.md)
    synced = group_size > 1 and world.device.type == "cuda"
    restore = use_sync_batchnorm(model, group) if synced else (lambda: None)
    wrapped = DistributedDataParallel(model, process_group=group) if group_size > 1 else model
    wrapped = torch.compile(wrapped) if cfg.train.compile else wrapped
    loader = train_batches(r.member_train(index), cfg.data.batch_size, seed, group_size, group_rank,
                           **feed(cfg.data, world.device))
    val = eval_batches(r.splits.val, cfg.data.eval_batch_size, **feed(cfg.data, world.device))

    def one_epoch(epoch: int, position: EpochPosition) -> dict:
        start = time.perf_counter()
        loss = train_epoch(wrapped, loader, optimizer, world.device, progress=world.is_main,
                           desc=f"member {index} epoch {epoch}/{cfg.train.epochs}", precision=precision,
                           on_step=step_logger(r.rundir.log, cfg.output.log_every_steps,
                                               {"stage": "member", "member": index}, epoch, len(loader), optimizer),
                           position=position, label_smoothing=cfg.train.label_smoothing,
                           clip=grad_clipper(cfg.train.grad_clip, model.parameters()))
        stats = epoch_stats(optimizer, len(r.member_train(index)), time.perf_counter() - start, world.device)
        check_finite(loss, f"member training of member {index}", epoch)
        scheduler.step()
        record = {"stage": "member", "member": index, "epoch": epoch, "loss": loss,
                  "val_accuracy": evaluate(model, val, world.device)["accuracy"], **stats}
        world.print0(f"member {index} epoch {epoch}/{cfg.train.epochs}: loss {loss:.4f}, "
                     f"val accuracy {record['val_accuracy']:.4f}")
        return record

    if group is None:
        return model, epochs.train(one_epoch, preempt_requested, loader)
    try:
        return model, epochs.train(one_epoch, lambda: world.any(preempt_requested(), group), loader,
                                 lambda t: world.reduce_sum(t, group))
    finally:
        restore()


def train_members(r: Run, indices: List[int], groups: dict) -> Dict[int, Tuple[torch.nn.Module, List[dict]]]:
    """Train members `indices` on this rank: all at once when `train.vectorize` allows, else one after another;
    with TF32 on CUDA when `train.tf32`."""
    with tf32(r.cfg.train.tf32, r.world.device):
        return _train_members(r, indices, groups)


def _train_members(r: Run, indices: List[int], groups: dict) -> Dict[int, Tuple[torch.nn.Module, List[dict]]]:
    if len(indices) > 1 and r.cfg.train.vectorize != "off":
        together, reason, tell = _train_together(r, indices)
        if together is not None:
            return together
        if tell:   # the vectorised models and batches are gone: the members below get the memory
            r.world.print0(f"ntdist: training members {indices} one after another: {reason}", file=sys.stderr)
    return {i: train_member(r, i, groups.get(i)) for i in indices}


def _train_together(r: Run, indices: List[int]):
    """(the trained members, None, False) when they trained at once, else (None, why not, whether to say so:
    with train.vectorize=on, or when auto's choice failed its probe, e.g. for lack of GPU memory)."""
    seeds = [member_seed(r.cfg.train, i) for i in indices]
    models = [build_member(r.spec, seed, r.initial, r.cfg.model.reinit).to(r.world.device) for seed in seeds]
    batches = member_batches(r, seeds)
    reason = why_not(r, models, batches)
    tell = r.cfg.train.vectorize == "on"
    if reason is None:
        reason = probe(models, batches, r.cfg.train)
        tell = tell or reason is not None
    if reason is None:
        together = train_together(r, indices, seeds, models, batches)
        if together is not None:
            return together, None, False
        reason = "their state files stand at different epochs or inside an epoch"
    return None, reason, tell
