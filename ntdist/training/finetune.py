"""Fine-tuning the fused model with data parallelism over all ranks, or distilling the ensemble into it.

Every rank holds the same fused model; the engine (DDP by default) averages
gradients, a DistributedSampler (reshuffled each epoch) splits the data, and
evaluation counts every sample once across ranks. With `finetune.distill` the
loss is the distillation loss against the ensemble's output average, computed
for each rank's batch by the k members as they are (`distill_teacher`): sharded over the ranks, or whole on
each (`finetune.teacher_shard`, see `training.teacher`).
"""

import importlib.util
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Dict, List, Optional

import torch

from ntdist.errors import UserError, check_choice
from ntdist.fusion import distillation_loss
from ntdist.options import opt
from ntdist.preempt import preempt_requested
from ntdist.training.engines import ENGINES, ZERO_STAGES, deepspeed_precision, make_engine
from ntdist.training.batches import eval_batches, feed, train_batches
from ntdist.training.loop import (SCHEDULES, EpochPosition, OptimConfig, Precision, check_finite, epoch_stats,
                                  evaluate, make_optimizer, make_scheduler, step_logger, train_epoch)
from ntdist.training.resume import ResumableEpochs
from ntdist.training.teacher import TEACHER_SHARD, ShardedTeacher, share_members, use_sharded, whole_teacher

if TYPE_CHECKING:   # the run context is defined by the pipeline, which imports this module
    from ntdist.pipeline import Run


LR_SCALING = {   # name -> factor on finetune.lr for W ranks, each with data.batch_size samples per step
    "none": lambda ranks: 1.0,
    "linear": lambda ranks: float(ranks),
    "sqrt": lambda ranks: math.sqrt(ranks),
}


@dataclass
class FinetuneConfig(OptimConfig):
    """How the fused model is fine-tuned (or distilled from the ensemble)."""

    section: ClassVar[str] = "finetune"
    epochs: int = opt(3, "fine-tuning epochs after fusion")
    lr: float = opt(0.01, "learning rate (for one rank's batch; see lr_scaling)")
    lr_scaling: str = opt("none", "how the LR follows the global batch of W ranks x data.batch_size: none (the same "
                                  "LR at any W) | linear (lr x W) | sqrt (lr x sqrt(W))")
    schedule: str = opt("none", "LR schedule: " + " | ".join(SCHEDULES))
    engine: str = opt("ddp", " | ".join(ENGINES))
    zero_stage: int = opt(0, "deepspeed engine: ZeRO stage 0, 1 or 2")
    deepspeed_config: Optional[str] = opt(None, "deepspeed engine: extra JSON config (e.g. launch/deepspeed.json)")
    distill: bool = opt(False, "distil the ensemble into the fused model instead of plain fine-tuning")
    temperature: float = opt(2.0, "distillation temperature")
    soft_weight: float = opt(1.0, "weight of the soft-target loss in distillation")
    teacher_shard: str = opt("auto", "distillation teacher: on (each rank keeps at most ceil(k/W) members; per "
                                     "batch one all-gather of the inputs, one reduce-scatter of the logits) | off "
                                     "(all k members on every rank) | auto (on with several ranks)")
    control: bool = opt(True, "also fine-tune the best member for the same epochs (a fair baseline)")

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.engine, ENGINES, "finetune.engine")
        check_choice(self.lr_scaling, LR_SCALING, "finetune.lr_scaling")
        # YAML reads a bare on / off as a boolean, which reaches this string field as "True" / "False"
        self.teacher_shard = {"True": "on", "False": "off"}.get(str(self.teacher_shard), self.teacher_shard)
        check_choice(self.teacher_shard, TEACHER_SHARD, "finetune.teacher_shard")
        if self.precision == "fp16" and self.engine == "accelerate":
            raise UserError("finetune.precision=fp16 needs finetune.engine=ddp (its grad scaler) or deepspeed (its "
                            "loss scaler); with accelerate use bf16")
        if self.engine != "ddp" and importlib.util.find_spec(self.engine) is None:
            raise UserError(f"finetune.engine={self.engine} needs {self.engine}: pip install 'ntdist[{self.engine}]'")
        if self.deepspeed_config is not None:
            try:
                with open(self.deepspeed_config, encoding="utf-8") as f:
                    ds_config = json.loads(f.read(1 << 20))
                if not isinstance(ds_config, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as err:
                raise UserError(f"finetune.deepspeed_config '{self.deepspeed_config}' is not a readable JSON object "
                                f"({err}); give a file such as launch/deepspeed.json, or leave it unset") from None
            in_file = deepspeed_precision(ds_config)
            if self.engine == "deepspeed" and in_file not in ("fp32", self.precision):
                raise UserError(f"finetune.deepspeed_config '{self.deepspeed_config}' enables {in_file} but "
                                f"finetune.precision={self.precision}; set finetune.precision={in_file} (DeepSpeed then "
                                "casts the inputs too), or disable it in the file")
        if not self.temperature > 0:
            raise UserError(f"finetune.temperature must be > 0 (it divides the logits), got {self.temperature}")
        if self.zero_stage not in ZERO_STAGES:
            raise UserError(f"finetune.zero_stage must be one of {list(ZERO_STAGES)}, got {self.zero_stage}")


def scaled_lr(cfg: FinetuneConfig, ranks: int) -> float:
    """finetune.lr for data-parallel steps on `ranks` ranks, by finetune.lr_scaling."""
    return cfg.lr * LR_SCALING[cfg.lr_scaling](ranks)


def evaluate_splits(r: "Run", model) -> dict:
    """Validation and test accuracy, each sample counted once across ranks."""
    world, out = r.world, {}
    for name, data in (("val", r.splits.val), ("test", r.splits.test)):
        loader = eval_batches(data, r.cfg.data.eval_batch_size, world.size, world.rank,
                              **feed(r.cfg.data, world.device))
        out[name] = evaluate(model, loader, world.device, world.reduce_sum)["accuracy"]
    return out


def distill_teacher(r: "Run", held: Dict[int, torch.nn.Module]) -> torch.nn.Module:
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


def finetune(r: "Run", model: torch.nn.Module, label: str, seed: int,
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
    state_path = None if cfg.engine == "deepspeed" else r.rundir.checkpoint(f"finetune_{label}.state")
    precision = Precision(ENGINES[cfg.engine].loop_precision(cfg.precision), world.device)
    epochs = ResumableEpochs(f"fine-tuning ({label})", cfg.epochs, model, optimizer, scheduler, r.spec, state_path,
                             world.is_main, r.resume, cfg.checkpoint_every_steps, precision.scaler)
    engine = make_engine(cfg, model, optimizer, world, r.cfg.data.batch_size)
    loader = train_batches(r.splits.train, r.cfg.data.batch_size, seed, world.size, world.rank,
                           **feed(r.cfg.data, world.device))
    loss_fn = distill_loss_fn(teacher.to(world.device), cfg) if teacher is not None else None
    model_for_steps = torch.compile(engine.model) if cfg.compile else engine.model

    def one_epoch(epoch: int, position: EpochPosition) -> dict:
        start = time.perf_counter()
        on_step = step_logger(r.rundir.log, r.cfg.output.log_every_steps, {"stage": "finetune", "method": label},
                              epoch, len(loader), optimizer)
        loss = train_epoch(model_for_steps, loader, optimizer, world.device, loss_fn, engine=engine,
                           desc=f"finetune {label} epoch {epoch}/{cfg.epochs}", progress=world.is_main,
                           precision=precision, on_step=on_step, position=position)
        loss = world.reduce_sum(torch.tensor([loss], dtype=torch.float64)).item() / world.size
        stats = epoch_stats(optimizer, len(r.splits.train), time.perf_counter() - start, world.device)
        check_finite(loss, f"fine-tuning ({label})", epoch)
        scheduler.step()
        acc = evaluate_splits(r, model)
        world.print0(f"finetune {label} epoch {epoch}: loss {loss:.4f}, val {acc['val']:.4f}, test {acc['test']:.4f}")
        return {"stage": "finetune", "method": label, "epoch": epoch, "loss": loss,
                "val_accuracy": acc["val"], "test_accuracy": acc["test"], **stats}

    return epochs.run(one_epoch, lambda: world.any(preempt_requested()), loader, world.reduce_sum)
