"""Training and evaluation loops, optimiser and LR schedules, and their config.

The loops take a model, data and a device and know nothing about launchers;
data parallelism enters only through the sampler (`num_replicas`, `rank`) and
a `reduce_sum` callable that the distributed code passes in for evaluation.
"""

import math
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from ntdist.errors import UserError
from ntdist.options import opt

SCHEDULES = ["none", "step", "multistep", "cosine"]


@dataclass
class OptimConfig:
    """SGD with momentum and an LR schedule (shared by member training and fine-tuning)."""

    lr: float = opt(0.05, "learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay")
    schedule: str = opt("step", "LR schedule: none | step | multistep | cosine")
    step_size: int = opt(10, "step schedule: epochs between LR drops")
    milestones: List[int] = opt([], "multistep schedule: epochs at which the LR drops")
    gamma: float = opt(0.1, "factor of each LR drop")


@dataclass
class TrainConfig(OptimConfig):
    """How each ensemble member is trained."""

    epochs: int = opt(10, "training epochs per member")
    seed: int = opt(0, "base seed; member i uses 1000 * seed + i (its initialisation and data order)")
    identical_members: bool = opt(False, "train every member with member 0's seed: the paper's self-fusion failure case")


@dataclass
class FinetuneConfig(OptimConfig):
    """How the fused model is fine-tuned (or distilled from the ensemble)."""

    epochs: int = opt(3, "fine-tuning epochs after fusion")
    lr: float = opt(0.01, "learning rate")
    schedule: str = opt("none", "LR schedule: none | step | multistep | cosine")
    engine: str = opt("ddp", "ddp | accelerate | deepspeed")
    zero_stage: int = opt(0, "deepspeed engine: ZeRO stage 0, 1 or 2")
    deepspeed_config: Optional[str] = opt(None, "deepspeed engine: extra JSON config (e.g. launch/deepspeed.json)")
    distill: bool = opt(False, "distil the ensemble into the fused model instead of plain fine-tuning")
    temperature: float = opt(2.0, "distillation temperature")
    soft_weight: float = opt(1.0, "weight of the soft-target loss in distillation")
    control: bool = opt(True, "also fine-tune the best member for the same epochs (a fair baseline)")


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: OptimConfig, epochs: int):
    """An epoch-wise LR scheduler (stepped once per epoch)."""
    if cfg.schedule == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.step_size), gamma=cfg.gamma)
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    raise UserError(f"unknown LR schedule '{cfg.schedule}'; choose one of {SCHEDULES}")


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
                desc: str = "train", show: bool = True, engine=None) -> float:
    """One pass over `loader`; returns the mean training loss.

    `loss_fn(logits, x, y)` may replace cross-entropy; `engine` (see ntdist.engines)
    replaces the plain zero_grad / backward / step of `optimizer`.
    """
    model.train()
    total, count = 0.0, 0
    # Bars only on a terminal: in batch logs (SLURM, CI) they would print a line per update.
    bar = tqdm(loader, desc=desc, leave=False, disable=not (show and sys.stderr.isatty()), dynamic_ncols=True)
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


def check_finite(loss: float, stage: str, epoch: int, member: Optional[int] = None) -> None:
    """Stop with a clear message when training diverged."""
    if not math.isfinite(loss):
        who = f" of member {member}" if member is not None else ""
        raise UserError(f"loss became {loss} in {stage}{who} at epoch {epoch}; lower the learning rate "
                        "(train.lr / finetune.lr) or check the data for NaN values")


@torch.no_grad()
def predict(model, data: Dataset, batch_size: int, device) -> torch.Tensor:
    """Logits of `model` on every sample of `data`, in order, on the CPU."""
    model.eval()
    outs = [model(x.to(device)).float().cpu() for x, _ in DataLoader(data, batch_size=batch_size, shuffle=False)]
    return torch.cat(outs)


def labels_of(data: Dataset) -> torch.Tensor:
    return torch.cat([y for _, y in DataLoader(data, batch_size=4096, shuffle=False)])
