"""Fine-tuning engines: plain DDP (default), Hugging Face Accelerate, or DeepSpeed ZeRO 0-2.

Each engine wraps the model and the optimizer of the config (`finetune.optimizer`: SGD or
AdamW, built by `training.optim.make_optimizer`) and exposes the calls the training loop
makes: `zero_grad()`, `backward(loss)`, `step()`, and `clipper(max_norm)` for
`finetune.grad_clip` (DeepSpeed clips inside its step, from its config's `gradient_clipping`).
The data sharding (DistributedSampler) and the epoch-wise LR schedule stay the
same for all engines, so they follow the same accuracy trajectory.
"""

import json
import os
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from ntdist.distributed.world import World, ensure_process_group, export_engine_variables
from ntdist.errors import UserError
from ntdist.training.loop import grad_clipper

ZERO_STAGES = (0, 1, 2)


class Engine:
    """Plain PyTorch: DDP over all ranks when there are several, else the bare model."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World):
        self.model = DistributedDataParallel(model) if world.size > 1 else model
        self.optimizer = optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()

    def clipper(self, max_norm: Optional[float]) -> Optional[Callable[[], None]]:
        """What clips the gradients to the global norm `max_norm` between backward and step (None: off). The
        gradients are the ranks' average by then, so every rank clips alike."""
        return grad_clipper(max_norm, self.model.parameters())

    def finish(self) -> None:
        """After the last step: leave the module as the model spec builds it (dtypes), ready to be saved."""

    @staticmethod
    def loop_precision(precision: str) -> str:
        """The precision the training loop applies itself (autocast, grad scaler) for `finetune.precision`."""
        return precision


class AccelerateEngine(Engine):
    """`accelerate.Accelerator` (on the CPU when there is no CUDA) prepares the model and optimizer."""

    def __init__(self, model, optimizer, world: World):
        try:
            from accelerate import Accelerator
        except ImportError:
            raise UserError("finetune.engine=accelerate needs accelerate: pip install 'ntdist[accelerate]'") from None
        self.accelerator = Accelerator(cpu=world.device.type == "cpu")
        _check_accelerate(self.accelerator.num_processes, self.accelerator.process_index, world)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def clipper(self, max_norm):
        if not max_norm:
            return None
        params = list(self.model.parameters())
        return lambda: self.accelerator.clip_grad_norm_(params, max_norm)


class DeepSpeedEngine(Engine):
    """`deepspeed.initialize` with our optimizer (SGD or AdamW, as torch builds it: the `optimizer` and
    `scheduler` sections of a config file are dropped) and ZeRO stage `finetune.zero_stage` (0, 1 or 2).
    DeepSpeed clips the gradients itself, to `finetune.grad_clip` (its `gradient_clipping`).

    With `finetune.precision` bf16 or fp16 DeepSpeed does the mixed precision itself: it casts the
    module to that dtype (fp16 with its own loss scaler) and keeps fp32 master weights in the
    optimizer. The inputs are cast to the module's dtype here and the logits back to fp32, so the
    loss is computed in fp32 as with the other engines. `finish` puts the master weights back into
    the module in its own dtypes, so the checkpoint holds them, not their bf16/fp16 rounding.
    """

    def __init__(self, model, optimizer, world: World, micro_batch: int, zero_stage: int,
                 config_file: Optional[str] = None, precision: str = "fp32", grad_clip: Optional[float] = None):
        try:
            import deepspeed
        except ImportError:
            raise UserError("finetune.engine=deepspeed needs deepspeed: pip install 'ntdist[deepspeed]'") from None
        config = {}
        if config_file:
            try:
                with open(config_file) as f:
                    config = json.load(f)
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read finetune.deepspeed_config '{config_file}': {err}") from None
        for key in ("optimizer", "scheduler", "_comment"):   # the optimizer and LR schedule come from the config
            config.pop(key, None)
        config.update({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                       "gradient_clipping": float(grad_clip or 0.0)})
        config.setdefault("zero_optimization", {})["stage"] = zero_stage
        config.setdefault("steps_per_print", 10 ** 9)
        config.setdefault("zero_allow_untested_optimizer", True)   # ZeRO 1-2 shard plain torch SGD, AdamW correctly
        if precision != "fp32":   # FinetuneConfig refused a file that enables the other one
            config.setdefault(precision, {})["enabled"] = True
        ensure_process_group(world)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".torch_extensions"))
        self.module, self.precision = model, precision
        self.dtypes = {name: t.dtype for name, t in model.state_dict().items()}   # before DeepSpeed casts
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                                dist_init_required=False)
        self.hooks = []
        if precision != "fp32":   # on the module itself, so that evaluation between epochs casts too
            self.hooks = [model.register_forward_pre_hook(lambda module, args: _cast_floats(args, _dtype_of(module))),
                          model.register_forward_hook(lambda module, args, out: _cast_floats(out, torch.float32))]

    @staticmethod
    def loop_precision(precision: str) -> str:
        return "fp32"   # DeepSpeed's own bf16/fp16: no autocast or grad scaler on top

    def zero_grad(self):
        pass   # DeepSpeed clears gradients inside step()

    def backward(self, loss):
        self.model.backward(loss)

    def step(self):
        self.model.step()

    def clipper(self, max_norm):
        return None   # `gradient_clipping` in the config: DeepSpeed clips inside step(), across its shards

    def finish(self) -> None:
        """With bf16/fp16: every parameter back from DeepSpeed's fp32 master copy, buffers cast back, the cast
        hooks removed. Under ZeRO 1-2 each rank holds a part of the master copy and DeepSpeed assembles it
        (a collective: every rank calls this); at stage 0 its optimizer holds the whole copy."""
        if self.precision == "fp32":
            return
        from deepspeed.utils import safe_get_full_fp32_param
        unlinked = _stage0_masters(self.optimizer)
        restore_dtypes(self.module, self.dtypes, lambda p: safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping")
                       else unlinked.get(id(p)))
        for hook in self.hooks:
            hook.remove()


def _stage0_masters(optimizer) -> dict:
    """id(low-precision parameter) -> its fp32 master, for DeepSpeed's stage-0 optimizers, which keep the masters
    without linking them to the parameters: one fp32 tensor per parameter (FP16_UnfusedOptimizer) or one flat
    tensor per group (FP16_Optimizer); empty for any other optimizer."""
    groups = getattr(optimizer, "fp16_groups", None)
    if not isinstance(groups, list):
        return {}
    if isinstance(getattr(optimizer, "fp32_groups", None), list):
        masters = optimizer.fp32_groups
    elif isinstance(getattr(optimizer, "fp32_groups_flat", None), list):
        from torch._utils import _unflatten_dense_tensors
        masters = [_unflatten_dense_tensors(flat, low) for flat, low in zip(optimizer.fp32_groups_flat, groups)]
    else:
        return {}
    return {id(p): q for low, high in zip(groups, masters) for p, q in zip(low, high)}


def restore_dtypes(model: torch.nn.Module, dtypes: dict, master=lambda p: None) -> None:
    """Give `model`'s state tensors the `dtypes` (name -> dtype) it was built with, each parameter from
    `master(parameter)` where that returns a full-precision copy (else from its own values), in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = master(p)
            p.data = (full if full is not None else p.data).detach().to(p.device, dtypes[name]).clone()
        for name, b in model.named_buffers():
            if name in dtypes and b.dtype != dtypes[name]:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, b.to(dtypes[name]))


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _cast_floats(value, dtype):
    """`value` (a tensor or a tuple of them) with its floating tensors in `dtype`; integer labels stay."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    return value


def deepspeed_precision(config: dict) -> str:
    """fp16, bf16 or fp32: what a DeepSpeed config enables (its `bfloat16` section is an alias of `bf16`)."""
    enabled = [name for name, key in (("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "bfloat16"))
               if isinstance(config.get(key), dict) and config[key].get("enabled") is True]
    return enabled[0] if enabled else "fp32"


ENGINES = {"ddp": Engine, "accelerate": AccelerateEngine, "deepspeed": DeepSpeedEngine}


def _check_accelerate(processes: int, index: int, world: World) -> None:
    if (processes, index) != (world.size, world.rank):
        raise UserError(f"accelerate sees this process as {index} of {processes}, but the {world.launcher} launcher "
                        f"made it rank {world.rank} of {world.size}; start the job with torchrun, srun or mpirun "
                        "and leave RANK, WORLD_SIZE and LOCAL_RANK to ntdist (see launch/README.md)")


def check_engine(cfg, world: World) -> None:
    """Before any training: export the variables the engine of `cfg` (a FinetuneConfig) reads and check
    that it sees the job's ranks, so that a mismatch stops the run now, not after training and fusion."""
    if cfg.engine == "ddp" or cfg.epochs == 0 or world.size == 1:   # alone, accelerate needs no variables
        return
    export_engine_variables(world)
    if cfg.engine == "accelerate":
        from accelerate import PartialState   # the state the Accelerator of the fine-tuning stage will share
        state = PartialState(cpu=world.device.type == "cpu")
        _check_accelerate(state.num_processes, state.process_index, world)


def make_engine(cfg, model, optimizer, world: World, micro_batch: int) -> Engine:
    """The engine `cfg.engine` (a validated FinetuneConfig) around `model` and `optimizer`."""
    if cfg.engine == "deepspeed":
        return DeepSpeedEngine(model, optimizer, world, micro_batch, cfg.zero_stage, cfg.deepspeed_config,
                               cfg.precision, cfg.grad_clip)
    return ENGINES[cfg.engine](model, optimizer, world)
