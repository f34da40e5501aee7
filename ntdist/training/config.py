"""The sections of the config that configure training: members (`train`), fine-tuning (`finetune`) and
periodic-sync SGD (`sync`), with their vocabularies and the run's seed arithmetic.

They live here, below the stages that read them, so that `ntdist.config` assembles the config tree
without importing any stage.
"""

import importlib.util
import json
import math
from dataclasses import dataclass
from typing import ClassVar, List, Optional

from ntdist.errors import UserError, check_choice
from ntdist.options import opt
from ntdist.training.engines import ENGINES, ZERO_STAGES, deepspeed_precision
from ntdist.training.optim import LR_SCHEDULES, OptimConfig
from ntdist.training.teacher import TEACHER_SHARD

VECTORIZE = ("auto", "on", "off")   # train.vectorize


@dataclass
class TrainConfig(OptimConfig):
    """How each ensemble member is trained."""

    section: ClassVar[str] = "train"
    epochs: int = opt(10, "training epochs per member")
    seed: int = opt(0, "base seed; member i uses 1000 * seed + i (its initialisation and data order)")
    identical_members: bool = opt(False, "train every member with member 0's seed: the paper's self-fusion failure case")
    vectorize: str = opt("auto", "train all members of a rank at once as one vectorised model: auto (where faster) "
                                 "| on | off")
    deterministic: bool = opt(False, "deterministic kernels for the whole run (torch.use_deterministic_algorithms, "
                                     "cuDNN without autotuning, CUBLAS_WORKSPACE_CONFIG): what bit-identical resume "
                                     "needs on a GPU; slower, and an error where an operation has no such kernel")
    tf32: bool = opt(True, "CUDA: float32 matmuls and convolutions of member training on TF32 tensor cores "
                           "(no effect on a CPU)")
    channels_last: bool = opt(False, "CUDA: conv nets' weights in channels_last memory format (members trained "
                                     "one after another; no effect on a CPU)")

    def __post_init__(self):
        super().__post_init__()
        # YAML reads a bare on/off as a boolean, which the str field then holds as 'True'/'False'
        self.vectorize = {"True": "on", "False": "off"}.get(self.vectorize, self.vectorize)
        check_choice(self.vectorize, VECTORIZE, "train.vectorize")
        if self.channels_last and self.vectorize == "on":
            raise UserError("train.channels_last=true trains members one after another, but train.vectorize=on; "
                            "set train.vectorize=auto or off, or train.channels_last=false")


CONTROL_SEED, FUSED_SEED = 998, 999   # offsets of the fine-tuning seeds; members use 0 .. k-1


def run_seed(cfg: TrainConfig, offset: int) -> int:
    """1000 * train.seed + offset: the factor keeps runs with neighbouring seeds (a sweep) from sharing seeds."""
    return 1000 * cfg.seed + offset


def member_seed(cfg: TrainConfig, index: int) -> int:
    """Member i's seed (its initialisation and data order): offset i, or 0 for all with `train.identical_members`.

    Fine-tuning uses the offsets CONTROL_SEED (the best member's control run) and FUSED_SEED (fused models).
    """
    return run_seed(cfg, 0 if cfg.identical_members else index)


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
    schedule: str = opt("none", "LR schedule: " + " | ".join(LR_SCHEDULES))
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
            clip = ds_config.get("gradient_clipping") or 0.0
            if self.engine == "deepspeed" and clip != (self.grad_clip or 0.0):
                raise UserError(f"finetune.deepspeed_config '{self.deepspeed_config}' sets gradient_clipping {clip} "
                                f"but finetune.grad_clip={self.grad_clip}; set finetune.grad_clip={clip} (ntdist "
                                "passes it to DeepSpeed), or drop it from the file")
        if self.distill and self.label_smoothing > 0:
            raise UserError("finetune.label_smoothing applies to plain fine-tuning's cross-entropy, not to the loss "
                            "of finetune.distill=true; set finetune.label_smoothing=0 or finetune.distill=false")
        if not self.temperature > 0:
            raise UserError(f"finetune.temperature must be > 0 (it divides the logits), got {self.temperature}")
        if self.zero_stage not in ZERO_STAGES:
            raise UserError(f"finetune.zero_stage must be one of {list(ZERO_STAGES)}, got {self.zero_stage}")


def scaled_lr(cfg: FinetuneConfig, ranks: int) -> float:
    """finetune.lr for data-parallel steps on `ranks` ranks, by finetune.lr_scaling."""
    return cfg.lr * LR_SCALING[cfg.lr_scaling](ranks)


SYNC_METHODS = ("none", "avg", "nt")
SYNC_UNITS = ("epoch", "step")


@dataclass
class SyncConfig:
    """Periodic-sync SGD: `mode: sync` trains fusion.k replicas and merges them periodically."""

    methods: List[str] = opt(list(SYNC_METHODS), "what to compare: none (one replica alone) | avg | nt")
    every: int = opt(1, "merge every this many units")
    unit: str = opt("epoch", " | ".join(SYNC_UNITS))

    def __post_init__(self):
        for method in self.methods:
            check_choice(method, SYNC_METHODS, "sync method")
        check_choice(self.unit, SYNC_UNITS, "sync.unit")
        if self.every < 1:
            raise UserError(f"sync.every must be >= 1, got {self.every}")
