"""The optimisers and LR schedules of member training and fine-tuning, and their config (`OptimConfig`).

`OptimConfig` holds what both stages share (optimizer, LR and its schedule, warm-up,
loss, precision, clipping, in-epoch checkpoints); `make_optimizer` and
`make_scheduler` build torch's objects from it. What each optimizer keeps per
parameter (`state_buffers`, `state_scalars`) is what the dry run's memory estimate
and state-file sizes count.
"""

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import torch

from ntdist.errors import UserError, check_choice
from ntdist.options import opt

LR_SCHEDULES = {   # name -> epoch-wise LR scheduler (stepped once per epoch)
    "none": lambda optimizer, cfg, epochs: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0),
    "step": lambda optimizer, cfg, epochs: torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, cfg.step_size), gamma=cfg.gamma),
    "multistep": lambda optimizer, cfg, epochs: torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma),
    "cosine": lambda optimizer, cfg, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs)),
}

OPTIMIZERS = {   # name -> optimizer over the parameter groups of `param_groups`
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                                   weight_decay=cfg.weight_decay),
}
OPTIMIZER_BUFFERS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}   # torch's state tensors
#                     of a parameter's shape that each keeps per parameter (sgd: only with momentum > 0)
OPTIMIZER_SCALARS = {"sgd": (), "adamw": ("step",)}   # and its one-value tensors per parameter (float32)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # name -> autocast dtype


@dataclass
class OptimConfig:
    """The optimiser, its LR schedule and the loss (shared by member training and fine-tuning)."""

    section: ClassVar[str] = "train"   # the config section, for messages; subclasses add `epochs`
    optimizer: str = opt("sgd", "optimizer: " + " | ".join(OPTIMIZERS))
    lr: float = opt(0.05, "learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    betas: List[float] = opt([0.9, 0.999], "adamw: decay rates of the running means of the gradient and its square")
    weight_decay: float = opt(5e-4, "weight decay: sgd's L2 term on every parameter; adamw's decoupled decay on "
                                    "the weights only (parameters with ndim <= 1, normalisation weights and "
                                    "biases, get none)")
    schedule: str = opt("step", "LR schedule: " + " | ".join(LR_SCHEDULES))
    warmup_epochs: int = opt(0, "epochs of linear LR warm-up before the schedule: epoch e of W trains at "
                                "lr x e/(W+1); the schedule then runs over the remaining epochs (its step_size "
                                "and milestones counted from the warm-up's end)")
    label_smoothing: float = opt(0.0, "label smoothing of the training cross-entropy (torch's; 0: off); "
                                      "evaluation reports the plain cross-entropy")
    grad_clip: Optional[float] = opt(None, "clip the gradients to this global norm before each step "
                                           "(torch.nn.utils.clip_grad_norm_; null or 0: off)")
    step_size: int = opt(10, "step schedule: epochs between LR drops")
    milestones: List[int] = opt([], "multistep schedule: epochs at which the LR drops")
    gamma: float = opt(0.1, "factor of each LR drop")
    precision: str = opt("fp32", "fp32 | bf16 | fp16: autocast of forward and loss (fp16 with a grad scaler); "
                                 "weights and optimizer stay fp32")
    compile: bool = opt(False, "torch.compile the model for training (the first steps pay the compilation)")
    checkpoint_every_steps: int = opt(0, "also write the state every this many batches inside an epoch, where a "
                                         "SIGTERM is honoured too (0: at epoch ends only); pick it so that these "
                                         "batches and one write fit in the scheduler's warning time")

    @property
    def state_buffers(self) -> tuple:
        """The names of the buffers of a parameter's shape the optimizer keeps per parameter: AdamW's two
        moments, SGD's momentum, none for SGD without momentum."""
        if self.optimizer == "sgd" and self.momentum == 0:
            return ()
        return OPTIMIZER_BUFFERS[self.optimizer]

    @property
    def state_scalars(self) -> tuple:
        """The names of the one-value tensors the optimizer keeps per parameter: AdamW's step count."""
        return OPTIMIZER_SCALARS[self.optimizer]

    def __post_init__(self):
        if self.epochs < 0:
            raise UserError(f"{self.section}.epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise UserError(f"{self.section}.lr must be > 0, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise UserError(f"{self.section}.momentum and {self.section}.weight_decay must be >= 0, "
                            f"got {self.momentum} and {self.weight_decay}")
        check_choice(self.optimizer, OPTIMIZERS, f"{self.section}.optimizer")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"{self.section}.betas must be two numbers in [0, 1), e.g. [0.9,0.999]; got {self.betas}")
        check_choice(self.schedule, LR_SCHEDULES, f"{self.section}.schedule")
        if self.warmup_epochs < 0 or 0 < self.epochs < self.warmup_epochs:
            raise UserError(f"{self.section}.warmup_epochs must be in 0..{self.section}.epochs ({self.epochs}), "
                            f"got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"{self.section}.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise UserError(f"{self.section}.grad_clip must be > 0 (or 0 / null: off), got {self.grad_clip}")
        check_choice(self.precision, PRECISIONS, f"{self.section}.precision")
        if self.checkpoint_every_steps < 0:
            raise UserError(f"{self.section}.checkpoint_every_steps must be >= 0 (0: at epoch ends only), "
                            f"got {self.checkpoint_every_steps}")


def param_groups(model: torch.nn.Module, cfg: OptimConfig, stacked: bool = False) -> list:
    """The parameter groups of `cfg.optimizer`: sgd decays all parameters alike; adamw decays the weights and
    leaves those of ndim <= 1 (normalisation weights, biases) undecayed. With `stacked`, each parameter holds
    the members along a leading dimension, which does not count."""
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return params
    flat = [p.ndim - int(stacked) <= 1 for p in params]
    groups = [{"params": [p for p, f in zip(params, flat) if not f]},
              {"params": [p for p, f in zip(params, flat) if f], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, stacked: bool = False) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` over `model`'s parameters (see `param_groups` for `stacked`)."""
    return OPTIMIZERS[cfg.optimizer](param_groups(model, cfg, stacked), cfg)


def make_scheduler(optimizer, cfg: OptimConfig):
    """The epoch-wise LR scheduler of `cfg`: its `warmup_epochs`, then its schedule over the remaining epochs."""
    warmup = cfg.warmup_epochs
    schedule = LR_SCHEDULES[cfg.schedule](optimizer, cfg, cfg.epochs - warmup)
    if warmup == 0:
        return schedule
    ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (e + 1) / (warmup + 1))
    # the schedule starts at the milestone from its own epoch 0 (the full LR), whatever the ramp left
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, schedule], milestones=[warmup])
