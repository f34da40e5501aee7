"""Training every member a rank holds at once, as one vectorised model (torch.func).

When a rank trains several members (fewer ranks than members: the laptop and single-GPU case),
their parameters and buffers are stacked (`stack_module_state`) and one `vmap` over
`functional_call` runs all k forward passes per step, each member on its own batch from its own
data order (one gather for all k: `batches.stacked_batches`). The summed loss gives each member
exactly its own gradient, and one optimizer over the stacked tensors is element-wise the k separate
optimizers (SGD's momentum, AdamW's moments and its no-decay group, weight decay included);
gradient clipping scales each member's slice by that member's own global norm. Each member keeps
its seed, initialisation, data order, LR schedule, state file and checkpoint: after every epoch one
vectorised pass gives every member's validation accuracy, and the stacked tensors are copied back
into the members, which are saved as the sequential loop would. The result equals training them one
after another up to floating-point summation order (tested to 1e-5 in float64).
"""

import copy
import time
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from ntdist.preempt import preempt_requested
from ntdist.stages.context import Run, member_part
from ntdist.training.batches import TensorBatches, eval_batches, feed, stacked_batches, train_batches
from ntdist.training.optim import OptimConfig, make_optimizer, make_scheduler
from ntdist.training.loop import EpochPosition, Precision, check_finite, epoch_stats, step_logger
from ntdist.training.resume import LockstepEpochs, ResumableEpochs


AUTO_MAX_PARAMS_CPU = 100_000   # on a CPU, vmap loses to the plain loop for wider members (docs/PERFORMANCE.md)
AUTO_MIN_MEMBERS_CPU = 4        # ... and for 2 members (k=2: 0.78-0.80x, k=8: 1.4-2.4x of one after another)
RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def why_not(r: Run, models: List[nn.Module], batches: list) -> Optional[str]:
    """None when these members can be trained together, else the reason (one line) they cannot."""
    mode = r.cfg.train.vectorize
    if mode == "off" or len(models) < 2:
        return "off" if mode == "off" else "one member"
    if r.layout.group_size > 1:
        return "each member is trained by a group of ranks (DDP)"
    if r.shards is not None:
        return f"each member trains on a shard of its own (data.member_split={r.cfg.data.member_split})"
    if not all(isinstance(b, TensorBatches) for b in batches):
        return f"the training data exceeds data.resident_max_mb={r.cfg.data.resident_max_mb}"
    if r.cfg.train.compile:
        return "train.compile is on (the vectorised step is not compiled)"
    if r.cfg.train.checkpoint_every_steps > 0:
        return "train.checkpoint_every_steps is set (vectorised training writes its states at epoch ends only)"
    if r.cfg.train.channels_last:
        return "train.channels_last is on (stacked weights keep the default memory format)"
    if r.cfg.train.precision == "fp16":
        return "train.precision is fp16 (each member needs a grad scaler of its own, which skips only its steps)"
    if any(isinstance(m, RANDOM_MODULES) and m.p > 0 for m in models[0].modules()):
        return "the model uses dropout, whose random draws a vectorised model cannot reproduce per member"
    params = sum(p.numel() for p in models[0].parameters())
    if mode == "auto" and r.world.device.type == "cpu" and params > AUTO_MAX_PARAMS_CPU:
        return f"on a CPU members of {params} parameters train faster one after another (auto)"
    if mode == "auto" and r.world.device.type == "cpu" and len(models) < AUTO_MIN_MEMBERS_CPU:
        return f"on a CPU fewer than {AUTO_MIN_MEMBERS_CPU} members train faster one after another (auto)"
    return None


SHARED_STATE = ("step",)   # optimizer state that is one value for all members (AdamW's step count), not a slice


def _group_params(optimizer) -> list:
    """The parameters of `optimizer` in the order of its groups (the order of its state_dict)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _copy_back(stacked: Dict[str, torch.Tensor], optimizer, model: nn.Module, member_optimizer, n: int) -> None:
    """Member `n`'s slice of the stacked tensors and of the stacked optimizer state (momentum, AdamW's
    moments; the shared step count as it is), into `model` and `member_optimizer`."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.copy_(stacked[name][n])
    for q, p in zip(_group_params(member_optimizer), _group_params(optimizer)):
        member_optimizer.state[q] = {key: value.clone() if key in SHARED_STATE else value[n].clone()
                                     for key, value in optimizer.state[p].items()}


def member_clipper(max_norm: Optional[float], params: List[torch.Tensor]):
    """`loop.grad_clipper` for stacked parameters: each member's gradients scaled by its own global norm, as
    `torch.nn.utils.clip_grad_norm_` scales them when that member trains alone; None when clipping is off."""
    if not max_norm:
        return None

    @torch.no_grad()
    def clip() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)   # [k]
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
    return clip


def stacked_forward(base: nn.Module):
    """forward(params, buffers, x [k, B, ...]) -> [k, B, ...]: `base` (on the meta device) run with each member's
    stacked tensors on its own inputs. Without re-tying weights (a per-step cost): a tied alias that
    `stack_module_state` dropped stays a meta tensor, fails the `probe` and sends the model to the plain loop."""
    return vmap(lambda p, b, x: functional_call(base, (p, b), (x,), tie_weights=False))


@torch.no_grad()
def stacked_accuracy(base: nn.Module, params: dict, buffers: dict, val) -> List[float]:
    """Every member's accuracy on the batches `val`, from one vectorised forward per batch (evaluation mode:
    BatchNorm reads its running statistics and updates nothing), as `loop.evaluate` counts it."""
    base.eval()
    forward = vmap(lambda p, b, x: functional_call(base, (p, b), (x,), tie_weights=False), in_dims=(0, 0, None))
    device = next(iter(params.values())).device
    correct, count = torch.zeros(len(next(iter(params.values()))), dtype=torch.float64, device=device), 0
    for x, y in val:
        y = y.to(device)
        correct += (forward(params, buffers, x.to(device)).argmax(2) == y).sum(1)
        count += len(y)
    return (correct / max(count, 1)).tolist()


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device: its structure without its memory."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def probe(models: List[nn.Module], batches: List[TensorBatches], optim: OptimConfig) -> Optional[str]:
    """None when one vectorised training step of these models runs, else why it does not (one line).

    The step is a real one: every member on a full batch, with gradients and room for the state of the
    optimizer `optim` configures (`OptimConfig.state_buffers`: AdamW's two moments, SGD's momentum, none for SGD
    without momentum), so on a GPU it is also the memory check (a step that does not fit raises
    torch.OutOfMemoryError; what it had allocated is freed before the members train one after another)."""
    x, _ = next(iter(batches[0]))
    try:
        _one_step(models, x, len(optim.state_buffers))
    except torch.OutOfMemoryError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = f"one vectorised step of {len(models)} members on a batch of {len(x)} does not fit ({first[:160]})"
    except Exception as err:  # noqa: BLE001 - any failure means: train this model the plain way
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = f"torch.func cannot vectorise this model ({type(err).__name__}: {first[:200]})"
    else:
        return None
    if x.device.type == "cuda":   # the step's tensors died with its frame: give their cached blocks back
        torch.cuda.empty_cache()
    return reason


def _one_step(models: List[nn.Module], x: torch.Tensor, state_buffers: int) -> None:
    """Forward and backward of the stacked `models` on `x` for each, beside `state_buffers` empty optimizer
    buffers per parameter: the memory of a training step (its tensors are freed on return, or with the frame
    when it raises)."""
    params, buffers = stack_module_state(models)   # the stacked copy that training makes
    state = [torch.empty_like(p) for p in params.values() for _ in range(state_buffers)]  # noqa: F841 - held
    out = stacked_forward(meta_copy(models[0]).train())(params, buffers, torch.stack([x] * len(models)))
    out.sum().backward()


def train_together(r: Run, indices: List[int], seeds: List[int], models: List[nn.Module],
                   batches: List[TensorBatches]) -> Optional[Dict[int, Tuple[nn.Module, List[dict]]]]:
    """Train `models` (members `indices`, freshly built from `seeds`) in lockstep; {index: (model, history)}.

    None, before any training, when their state files stand at different epochs or inside an epoch (resume
    them one by one).
    """
    cfg, world = r.cfg, r.world
    optimizers = [make_optimizer(m, cfg.train) for m in models]
    schedulers = [make_scheduler(o, cfg.train) for o in optimizers]
    states = [ResumableEpochs(member_part(i), cfg.train.epochs, m, o, s, r.spec, r.rundir.member_state(i),
                              True, r.resume, run_id=r.run_id, seed=seed)
              for i, m, o, s, seed in zip(indices, models, optimizers, schedulers, seeds)]
    if not LockstepEpochs.aligned(states):   # e.g. started one after another, resumed here
        return None
    epochs = LockstepEpochs(f"training of members {indices}", states, seeds)
    params, buffers = stack_module_state(models)
    stacked = {**params, **buffers}
    optimizer, scheduler = _stacked_optimizer(cfg.train, params, models, optimizers, schedulers[0])
    clip = member_clipper(cfg.train.grad_clip, list(params.values()))
    base = meta_copy(models[0])
    forward = stacked_forward(base)
    precision = Precision(cfg.train.precision, world.device)
    val = eval_batches(r.splits.val, cfg.data.eval_batch_size, **feed(cfg.data, world.device))

    def one_epoch(epoch: int, position: EpochPosition) -> List[dict]:
        base.train()
        total, count = torch.zeros(len(models), dtype=torch.float64, device=world.device), 0
        loggers = [step_logger(r.rundir.log, cfg.output.log_every_steps, {"stage": "member", "member": i}, epoch,
                               len(batches[0]), optimizer) for i in indices]
        start_time = time.perf_counter()
        for step_index, (x, y) in enumerate(stacked_batches(batches)):
            with precision.autocast():
                logits = forward(params, buffers, x)   # [k, B, classes]
                # the loss outside vmap: one cross-entropy kernel instead of its batched decomposition
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1), reduction="none",
                                       label_smoothing=cfg.train.label_smoothing).view(len(y), -1).mean(1)
            precision.backward_step(loss.sum(), optimizer, clip=clip)
            total += loss.detach().double() * y.shape[1]
            count += y.shape[1]
            for n, on_step in enumerate(loggers):
                if on_step is not None:
                    on_step(step_index, loss.detach()[n])
        stats = epoch_stats(optimizer, len(r.splits.train), time.perf_counter() - start_time, world.device)
        scheduler.step()
        for member_scheduler, member_optimizer in zip(schedulers, optimizers):   # what each member's state file holds
            member_scheduler.load_state_dict(scheduler.state_dict())
            for group, stacked_group in zip(member_optimizer.param_groups, optimizer.param_groups):
                group["lr"] = stacked_group["lr"]
        mean = (total / max(count, 1)).tolist()
        accuracy = stacked_accuracy(base, params, buffers, val)
        records = []
        for n, (i, model, member_optimizer) in enumerate(zip(indices, models, optimizers)):
            check_finite(mean[n], f"member training of member {i}", epoch)
            _copy_back(stacked, optimizer, model, member_optimizer, n)
            records.append({"stage": "member", "member": i, "epoch": epoch, "loss": mean[n],
                            "val_accuracy": accuracy[n], **stats})
            world.print0(f"member {i} epoch {epoch}/{cfg.train.epochs}: loss {mean[n]:.4f}, "
                         f"val accuracy {accuracy[n]:.4f}")
        return records

    epochs.train(one_epoch, preempt_requested, batches)
    return {i: (m, state.history) for i, m, state in zip(indices, models, states)}


def _stacked_optimizer(cfg, params: Dict[str, torch.Tensor], models: List[nn.Module], optimizers: list,
                       scheduler) -> tuple:
    """One optimizer over the stacked parameters, and its scheduler, where the members' `optimizers` stand (as
    restored from their states): the LR schedule of `scheduler`, the LR, every member's optimizer state."""
    optimizer = make_optimizer(SimpleNamespace(parameters=lambda: list(params.values())), cfg, stacked=True)
    stacked_scheduler = make_scheduler(optimizer, cfg)
    stacked_scheduler.load_state_dict(scheduler.state_dict())
    for group, saved in zip(optimizer.param_groups, optimizers[0].param_groups):
        group["lr"] = saved["lr"]
    for p, *member_params in zip(_group_params(optimizer), *[_group_params(o) for o in optimizers]):
        states = [o.state.get(q, {}) for o, q in zip(optimizers, member_params)]
        if states[0] and all(s.keys() == states[0].keys() for s in states):
            optimizer.state[p] = {key: states[0][key].clone() if key in SHARED_STATE
                                  else torch.stack([s[key] for s in states]) for key in states[0]}
    return optimizer, stacked_scheduler


def member_batches(r: Run, seeds: List[int]) -> list:
    """Each member's own training batches (its seed fixes its data order)."""
    cfg = r.cfg
    return [train_batches(r.splits.train, cfg.data.batch_size, seed, **feed(cfg.data, r.world.device))
            for seed in seeds]
