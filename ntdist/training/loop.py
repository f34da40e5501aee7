"""The training loop: optimiser and LR schedules, loaders, one epoch, evaluation, and the resumable epoch loop.

The loops take a model, data and a device and know nothing about launchers;
data parallelism enters only through the sampler (`num_replicas`, `rank`) and
a `reduce_sum` callable that the distributed code passes in for evaluation.
`ResumableEpochs` is the one per-epoch loop that member training and
fine-tuning share: restore the state, run the epochs, write the state after
each, stop cleanly when preempted.
"""

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, ClassVar, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from ntdist.errors import Preempted, UserError, check_choice
from ntdist.options import opt
from ntdist.training.state import load_state, save_state

SCHEDULES = {   # name -> epoch-wise LR scheduler (stepped once per epoch)
    "none": lambda optimizer, cfg, epochs: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0),
    "step": lambda optimizer, cfg, epochs: torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, cfg.step_size), gamma=cfg.gamma),
    "multistep": lambda optimizer, cfg, epochs: torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma),
    "cosine": lambda optimizer, cfg, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs)),
}


@dataclass
class OptimConfig:
    """SGD with momentum and an LR schedule (shared by member training and fine-tuning)."""

    section: ClassVar[str] = "train"   # the config section, for messages; subclasses add `epochs`
    lr: float = opt(0.05, "learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay")
    schedule: str = opt("step", "LR schedule: " + " | ".join(SCHEDULES))
    step_size: int = opt(10, "step schedule: epochs between LR drops")
    milestones: List[int] = opt([], "multistep schedule: epochs at which the LR drops")
    gamma: float = opt(0.1, "factor of each LR drop")

    def __post_init__(self):
        if self.epochs < 0:
            raise UserError(f"{self.section}.epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise UserError(f"{self.section}.lr must be > 0, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise UserError(f"{self.section}.momentum and {self.section}.weight_decay must be >= 0, "
                            f"got {self.momentum} and {self.weight_decay}")
        check_choice(self.schedule, SCHEDULES, f"{self.section}.schedule")


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: OptimConfig):
    """The epoch-wise LR scheduler of `cfg` over its `epochs`."""
    return SCHEDULES[cfg.schedule](optimizer, cfg, cfg.epochs)


def train_loader(data: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
    """A loader whose order depends only on `seed` and the epoch (call `loader.sampler.set_epoch`).

    With `num_replicas` ranks each rank sees every `num_replicas`-th sample of the
    same permutation, so W ranks with batch B see the same samples per step as one
    process with batch W*B.
    """
    sampler = DistributedSampler(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
    return DataLoader(data, batch_size=batch_size, sampler=sampler)


def eval_loader(data: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0):
    """Rank r evaluates samples r, r+W, ...: every sample is counted exactly once across ranks."""
    if num_replicas > 1:
        data = Subset(data, list(range(rank, len(data), num_replicas)))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def train_epoch(model, loader, optimizer, device, loss_fn: Optional[Callable] = None,
                desc: str = "train", progress: bool = True, engine=None) -> float:
    """One pass over `loader`; returns the mean training loss.

    `loss_fn(logits, x, y)` may replace cross-entropy; `engine` (see training.engines)
    replaces the plain zero_grad / backward / step of `optimizer`.
    """
    model.train()
    total, count = 0.0, 0
    # Bars only on a terminal: in batch logs (SLURM, CI) they would print a line per update.
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = loss_fn(logits, x, y) if loss_fn else F.cross_entropy(logits, y)
        if engine is None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            engine.zero_grad()
            engine.backward(loss)
            engine.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model, loader, device, reduce_sum: Optional[Callable] = None) -> dict:
    """Loss and accuracy of `model`; `reduce_sum` sums the counts across ranks when given."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)   # loss sum, correct, count
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        stats[0] += F.cross_entropy(logits, y, reduction="sum").item()
        stats[1] += (logits.argmax(1) == y).sum().item()
        stats[2] += len(y)
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    n = max(stats[2].item(), 1)
    return {"loss": stats[0].item() / n, "accuracy": stats[1].item() / n}


def check_finite(loss: float, stage: str, epoch: int) -> None:
    """Stop with a clear message when training diverged (`stage` names what was trained)."""
    if not math.isfinite(loss):
        raise UserError(f"loss became {loss} in {stage} at epoch {epoch}; lower the learning rate "
                        "(train.lr / finetune.lr) or check the data for NaN values")


@torch.no_grad()
def predict(model, data: Dataset, batch_size: int, device) -> torch.Tensor:
    """Logits of `model` on every sample of `data`, in order, on the CPU."""
    model.eval()
    outs = [model(x.to(device)).float().cpu() for x, _ in DataLoader(data, batch_size=batch_size, shuffle=False)]
    return torch.cat(outs)


def labels_of(data: Dataset) -> torch.Tensor:
    return torch.cat([y for _, y in DataLoader(data, batch_size=4096, shuffle=False)])


class ResumableEpochs:
    """Epochs 1..`epochs` of one model, resumable after any of them.

    Construct it before wrapping the model (DDP, an engine): with `resume` and an
    existing state file the model, optimizer, scheduler and RNG are restored here.
    `run(one_epoch, should_stop)` calls `one_epoch(epoch) -> record` for each
    remaining epoch, writes the state after each (when `writer`), and raises
    `Preempted` at an epoch boundary once `should_stop()` is true.
    """

    def __init__(self, what: str, epochs: int, model, optimizer, scheduler, spec, state_path: Optional[str],
                 writer: bool, resume: bool):
        self.what, self.epochs, self.spec = what, epochs, spec
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.state_path = state_path if writer else None
        self.start, self.history = 1, []
        if resume and state_path and os.path.exists(state_path):
            done, self.history = load_state(state_path, model, optimizer, scheduler, epochs)
            self.start = done + 1

    def run(self, one_epoch: Callable[[int], dict], should_stop: Callable[[], bool]) -> List[dict]:
        for epoch in range(self.start, self.epochs + 1):
            self.history.append(one_epoch(epoch))
            if self.state_path:
                save_state(self.state_path, self.model, self.spec, self.optimizer, self.scheduler, epoch,
                           self.history)
            if epoch < self.epochs and should_stop():
                raise Preempted(f"preempted during {self.what} after epoch {epoch}; "
                                "the state is saved: rerun the same command with --resume")
        return self.history
