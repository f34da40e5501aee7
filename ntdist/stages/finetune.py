"""Fine-tuning the fused model with data parallelism over all ranks, or distilling the ensemble into it.

Every rank holds the same fused model; the engine (DDP by default) averages
gradients, a DistributedSampler (reshuffled each epoch) splits the data, and
evaluation counts every sample once across ranks. With `finetune.distill` the
loss is the distillation loss against the ensemble's output average, computed
for each rank's batch by the k members as they are (`distill_teacher`): sharded over the ranks, or whole on
each (`finetune.teacher_shard`, see `training.teacher`).
"""

import time
from typing import Callable, Dict, List, Optional

import torch

from ntdist.fusion import distillation_loss
from ntdist.preempt import preempt_requested
from ntdist.stages.context import Run, finetune_part
from ntdist.training.config import FinetuneConfig, scaled_lr
from ntdist.training.engines import ENGINES, make_engine
from ntdist.training.batches import eval_batches, feed, train_batches
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.loop import EpochPosition, Precision, check_finite, epoch_stats, evaluate, step_logger, train_epoch
from ntdist.training.resume import ResumableEpochs
from ntdist.training.teacher import ShardedTeacher, share_members, use_sharded, whole_teacher



def evaluate_splits(r: Run, model) -> dict:
    """Validation and test accuracy, each sample counted once across ranks."""
    world, out = r.world, {}
    for name, data in (("val", r.splits.val), ("test", r.splits.test)):
        loader = eval_batches(data, r.cfg.data.eval_batch_size, world.size, world.rank,
                              **feed(r.cfg.data, world.device))
        out[name] = evaluate(model, loader, world.device, world.reduce_sum)["accuracy"]
    return out


def distill_teacher(r: Run, held: Dict[int, torch.nn.Module]) -> torch.nn.Module:
    """This rank's distillation teacher: the k members as they are, outputs averaged (the concatenated model
    computes the same with k^2 blocks in its dense layers, k times the parameters and FLOPs); sharded over
    the ranks or all k members on every rank, by `finetune.teacher_shard`."""
    if use_sharded(r.cfg.finetune.teacher_shard, r.world.size):
        mine = share_members(r.world, r.layout, held, r.template)
        return ShardedTeacher(r.world, r.layout, mine, capacity=r.cfg.data.batch_size)
    return whole_teacher(r.world, r.layout, held, r.template)


def distill_loss_fn(teacher: torch.nn.Module, cfg: FinetuneConfig) -> Callable:
    teacher.eval()

    def loss_fn(logits, x, y):
        with torch.no_grad():
            target = teacher(x)
        return distillation_loss(logits, target, y, temperature=cfg.temperature, soft_weight=cfg.soft_weight)
    return loss_fn


def finetune(r: Run, model: torch.nn.Module, label: str, seed: int,
             teacher: Optional[torch.nn.Module] = None) -> List[dict]:
    """Fine-tune `model` in place for `finetune.epochs` (rank 0 writes the state after each); one record per epoch."""
    cfg, world = r.cfg.finetune, r.world
    model.to(world.device)
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:   # before the scheduler, which starts from this LR
        group["lr"] = scaled_lr(cfg, world.size)
    scheduler = make_scheduler(optimizer, cfg)
    torch.manual_seed(seed)
    # ZeRO shards the optimizer state: with deepspeed a resumed run restarts this stage instead
    state_path = None if cfg.engine == "deepspeed" else r.rundir.finetune_state(label)
    precision = Precision(ENGINES[cfg.engine].loop_precision(cfg.precision), world.device)
    epochs = ResumableEpochs(finetune_part(label), cfg.epochs, model, optimizer, scheduler, r.spec, state_path,
                             world.is_main, r.resume, cfg.checkpoint_every_steps, precision.scaler,
                             run_id=r.run_id, seed=seed)
    engine = make_engine(cfg, model, optimizer, world, r.cfg.data.batch_size)
    loader = train_batches(r.splits.train, r.cfg.data.batch_size, seed, world.size, world.rank,
                           **feed(r.cfg.data, world.device))
    loss_fn = distill_loss_fn(teacher.to(world.device), cfg) if teacher is not None else None
    model_for_steps = torch.compile(engine.model) if cfg.compile else engine.model
    clip = engine.clipper(cfg.grad_clip)

    def one_epoch(epoch: int, position: EpochPosition) -> dict:
        start = time.perf_counter()
        on_step = step_logger(r.rundir.log, r.cfg.output.log_every_steps, {"stage": "finetune", "method": label},
                              epoch, len(loader), optimizer)
        loss = train_epoch(model_for_steps, loader, optimizer, world.device, loss_fn, engine=engine,
                           desc=f"finetune {label} epoch {epoch}/{cfg.epochs}", progress=world.is_main,
                           precision=precision, on_step=on_step, position=position,
                           label_smoothing=cfg.label_smoothing, clip=clip)
        loss = world.reduce_sum(torch.tensor([loss], dtype=torch.float64)).item() / world.size
        stats = epoch_stats(optimizer, len(r.splits.train), time.perf_counter() - start, world.device)
        check_finite(loss, finetune_part(label), epoch)
        scheduler.step()
        acc = evaluate_splits(r, model)
        world.print0(f"finetune {label} epoch {epoch}: loss {loss:.4f}, val {acc['val']:.4f}, test {acc['test']:.4f}")
        return {"stage": "finetune", "method": label, "epoch": epoch, "loss": loss,
                "val_accuracy": acc["val"], "test_accuracy": acc["test"], **stats}

    history = epochs.train(one_epoch, lambda: world.any(preempt_requested()), loader, world.reduce_sum)
    engine.finish()   # DeepSpeed's bf16/fp16: the fp32 master weights back into the module that is saved
    return history
