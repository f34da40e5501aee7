"""Training the ensemble members, each with its own seed, on the ranks the layout assigns.

Member i is initialised and shuffled with its own seed (`member_seed`), so the members
are diverse and a member trained by any rank layout has the same weights as the
one trained alone in a single process.
"""

import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from ntdist.data import Splits
from ntdist.models import build_model
from ntdist.resume import Preempted, load_state, preempt_requested, save_state
from ntdist.train import (TrainConfig, check_finite, eval_loader, evaluate, make_optimizer, make_scheduler,
                          train_epoch, train_loader)


@dataclass
class MemberRun:
    """One trained member and its per-epoch history."""

    index: int
    model: torch.nn.Module
    history: List[dict] = field(default_factory=list)


def member_seed(cfg: TrainConfig, index: int) -> int:
    """Member i's seed: 1000 * train.seed + i (+ 0 for every member with `train.identical_members`).

    The factor keeps runs with neighbouring seeds (a seed sweep) from sharing members;
    fine-tuning uses 1000 * train.seed + 998 (control) and + 999 (fused models).
    """
    return 1000 * cfg.seed + (0 if cfg.identical_members else index)


def build_member(spec: dict, seed: int) -> torch.nn.Module:
    """A freshly initialised member; the seed fixes the initialisation."""
    torch.manual_seed(seed)
    return build_model(spec["name"], spec["kwargs"])


def train_member(index: int, spec: dict, cfg: TrainConfig, splits: Splits, batch_size: int, eval_batch: int,
                 device: torch.device, group=None, group_rank: int = 0, group_size: int = 1,
                 show: bool = True, log=None, state_path: Optional[str] = None, resume: bool = False,
                 should_stop: Callable[[], bool] = preempt_requested) -> MemberRun:
    """Train member `index` (with DDP inside `group` when the group has several ranks).

    With `state_path` the state is written after every epoch (by the group's first rank);
    with `resume` an existing state file is restored first. `should_stop()` is asked at
    each epoch boundary (after the state is written) and ends training with `Preempted`.
    """
    seed = member_seed(cfg, index)
    model = build_member(spec, seed).to(device)
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs)
    run = MemberRun(index, model)
    start = 1
    if resume and state_path and os.path.exists(state_path):
        done, run.history = load_state(state_path, model, optimizer, scheduler)
        start = done + 1
    wrapped = DistributedDataParallel(model, process_group=group) if group_size > 1 else model
    loader = train_loader(splits.train, batch_size, seed, group_size, group_rank)
    val = eval_loader(splits.val, eval_batch)
    for epoch in range(start, cfg.epochs + 1):
        loader.sampler.set_epoch(epoch)
        loss = train_epoch(wrapped, loader, optimizer, device, desc=f"member {index} epoch {epoch}/{cfg.epochs}",
                           show=show)
        check_finite(loss, "member training", epoch, index)
        scheduler.step()
        record = {"stage": "member", "member": index, "epoch": epoch, "loss": loss,
                  "val_accuracy": evaluate(model, val, device)["accuracy"]}
        run.history.append(record)
        if log:
            log(f"member {index} epoch {epoch}/{cfg.epochs}: loss {loss:.4f}, val accuracy {record['val_accuracy']:.4f}")
        if state_path and group_rank == 0:
            save_state(state_path, model, spec, optimizer, scheduler, epoch, run.history)
        if epoch < cfg.epochs and should_stop():
            raise Preempted(f"preempted during training of member {index} after epoch {epoch}; "
                            "the state is saved: rerun the same command with --resume")
    return run
