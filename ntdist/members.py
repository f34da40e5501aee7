"""Training the ensemble members, each with its own seed, on the ranks the layout assigns.

Member i is initialised and shuffled with seed `train.seed + i`, so the members
are diverse and a member trained by any rank layout has the same weights as the
one trained alone in a single process.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from ntdist.data import Splits
from ntdist.models import build_model
from ntdist.train import (TrainConfig, check_finite, eval_loader, evaluate, make_optimizer, make_scheduler,
                          train_epoch, train_loader)


@dataclass
class MemberRun:
    """One trained member and its per-epoch history."""

    index: int
    model: torch.nn.Module
    history: List[dict] = field(default_factory=list)


def member_seed(cfg: TrainConfig, index: int) -> int:
    return cfg.seed + index


def build_member(spec: dict, seed: int) -> torch.nn.Module:
    """A freshly initialised member; the seed fixes the initialisation."""
    torch.manual_seed(seed)
    return build_model(spec["name"], spec["kwargs"])


def train_member(index: int, spec: dict, cfg: TrainConfig, splits: Splits, batch_size: int, eval_batch: int,
                 device: torch.device, group=None, group_rank: int = 0, group_size: int = 1,
                 show: bool = True, start_model: Optional[torch.nn.Module] = None,
                 epochs: Optional[int] = None, stage: str = "member", on_epoch=None, log=None) -> MemberRun:
    """Train member `index` (with DDP inside `group` when the group has several ranks).

    `start_model` continues training an existing model (used by the extra-epochs control);
    `on_epoch(epoch, model, optimizer, scheduler)` is called after each epoch.
    """
    seed = member_seed(cfg, index)
    model = (start_model if start_model is not None else build_member(spec, seed)).to(device)
    torch.manual_seed(seed)
    wrapped = DistributedDataParallel(model, process_group=group) if group_size > 1 else model
    epochs = cfg.epochs if epochs is None else epochs
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, epochs)
    loader = train_loader(splits.train, batch_size, seed, group_size, group_rank)
    val = eval_loader(splits.val, eval_batch)
    run = MemberRun(index, model)
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)
        loss = train_epoch(wrapped, loader, optimizer, device, desc=f"{stage} {index} epoch {epoch}/{epochs}", show=show)
        check_finite(loss, stage, epoch, index)
        scheduler.step()
        record = {"stage": stage, "member": index, "epoch": epoch, "loss": loss,
                  "val_accuracy": evaluate(model, val, device)["accuracy"]}
        run.history.append(record)
        if log:
            log(f"{stage} {index} epoch {epoch}/{epochs}: loss {loss:.4f}, val accuracy {record['val_accuracy']:.4f}")
        if on_epoch:
            on_epoch(epoch, model, optimizer, scheduler)
    return run


def train_members(indices: List[int], spec: dict, cfg: TrainConfig, splits: Splits, batch_size: int,
                  eval_batch: int, device, group=None, group_rank: int = 0, group_size: int = 1,
                  show: bool = True, log=print) -> Dict[int, MemberRun]:
    """Train the members in `indices` one after another on this rank (or rank group)."""
    runs = {}
    for index in indices:
        runs[index] = train_member(index, spec, cfg, splits, batch_size, eval_batch, device, group,
                                   group_rank, group_size, show, log=log)
    return runs
