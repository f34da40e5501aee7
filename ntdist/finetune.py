"""Fine-tuning the fused model with data parallelism over all ranks, or distilling the ensemble into it.

Every rank holds the same fused model; DistributedDataParallel averages gradients,
a DistributedSampler (reshuffled each epoch) splits the data, and evaluation
counts every sample once across ranks. With `finetune.distill` the loss is the
distillation loss against the concatenated wide model, which computes exactly
the ensemble's output average.
"""

import os
from typing import Callable, List, Optional

import torch

from ntdist.data import Splits
from ntdist.dist.world import World
from ntdist.engines import make_engine
from ntdist.fusion import distillation_loss
from ntdist.resume import Preempted, load_state, preempt_requested, save_state
from ntdist.train import (FinetuneConfig, check_finite, eval_loader, evaluate, make_optimizer, make_scheduler,
                          train_epoch, train_loader)


def evaluate_splits(model, splits: Splits, world: World, batch_size: int) -> dict:
    """Validation and test accuracy, each sample counted once across ranks."""
    out = {}
    for name, data in (("val", splits.val), ("test", splits.test)):
        loader = eval_loader(data, batch_size, world.size, world.rank)
        out[name] = evaluate(model, loader, world.device, world.reduce_sum)["accuracy"]
    return out


def distill_loss_fn(teacher: torch.nn.Module, cfg: FinetuneConfig) -> Callable:
    teacher.eval()

    def loss_fn(logits, x, y):
        with torch.no_grad():
            target = teacher(x)
        return distillation_loss(logits, target, y, temperature=cfg.temperature, soft_weight=cfg.soft_weight)
    return loss_fn


def finetune(model: torch.nn.Module, cfg: FinetuneConfig, splits: Splits, world: World, batch_size: int,
             eval_batch: int, seed: int, label: str, teacher: Optional[torch.nn.Module] = None,
             log=print, spec: Optional[dict] = None, state_path: Optional[str] = None,
             resume: bool = False) -> List[dict]:
    """Fine-tune `model` in place for `cfg.epochs`; returns one record per epoch.

    With `state_path` rank 0 writes the state after every epoch; `resume` restores it first.
    """
    model.to(world.device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs)
    torch.manual_seed(seed)
    if cfg.engine == "deepspeed":
        state_path = None   # ZeRO shards the optimizer state: a resumed run restarts this stage instead
    history: List[dict] = []
    start = 1
    if resume and state_path and os.path.exists(state_path):
        done, history = load_state(state_path, model, optimizer, scheduler)
        start = done + 1
    engine = make_engine(cfg.engine, model, optimizer, world, batch_size, cfg.zero_stage, cfg.deepspeed_config)
    loader = train_loader(splits.train, batch_size, seed, world.size, world.rank)
    loss_fn = distill_loss_fn(teacher.to(world.device), cfg) if teacher is not None else None
    for epoch in range(start, cfg.epochs + 1):
        loader.sampler.set_epoch(epoch)
        loss = train_epoch(engine.model, loader, optimizer, world.device, loss_fn,
                           desc=f"finetune {label} epoch {epoch}/{cfg.epochs}", show=world.is_main, engine=engine)
        loss = world.reduce_sum(torch.tensor([loss], dtype=torch.float64)).item() / world.size
        check_finite(loss, f"fine-tuning ({label})", epoch)
        scheduler.step()
        acc = evaluate_splits(model, splits, world, eval_batch)
        record = {"stage": "finetune", "method": label, "epoch": epoch, "loss": loss,
                  "val_accuracy": acc["val"], "test_accuracy": acc["test"]}
        history.append(record)
        log(f"finetune {label} epoch {epoch}: loss {loss:.4f}, val {acc['val']:.4f}, test {acc['test']:.4f}")
        if state_path and world.is_main:
            save_state(state_path, model, spec, optimizer, scheduler, epoch, history)
        if epoch < cfg.epochs and world.any(preempt_requested()):
            raise Preempted(f"preempted during fine-tuning ({label}) after epoch {epoch}; "
                            "the state is saved: rerun the same command with --resume")
    return history
