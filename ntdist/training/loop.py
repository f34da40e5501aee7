"""The training loop: precision, one epoch, evaluation, and the resumable epoch loop (optimisers: `training.optim`).

The loops take a model, batches (`training.batches`) and a device and know nothing
about launchers; data parallelism enters only through the batches (`num_replicas`,
`rank`) and a `reduce_sum` callable that the distributed code passes in for evaluation.
`EpochPosition` is how far an epoch got; `training.resume.ResumableEpochs`
runs the epochs around `train_epoch` and writes the states.
"""

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ntdist.errors import UserError
from ntdist.training.optim import PRECISIONS

BAR_LOSS_EVERY_S = 1.0   # a progress bar's loss is read (a host sync) at most this often



class Precision:
    """Autocast for forward and loss, and for fp16 a grad scaler (kept for the whole run, not per epoch)."""

    def __init__(self, name: str, device):
        self.device_type = torch.device(device).type
        self.dtype = PRECISIONS[name]
        self.scaler = torch.amp.GradScaler(self.device_type) if name == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward_step(self, loss: torch.Tensor, optimizer, engine=None,
                      clip: Optional[Callable[[], None]] = None) -> None:
        """zero_grad, backward and step of `optimizer` (or of `engine`), through the scaler for fp16; `clip`
        (see `grad_clipper`) runs on the true gradients between backward and step."""
        if engine is not None and self.scaler is None:
            engine.zero_grad()
            engine.backward(loss)
            if clip is not None:
                clip()
            engine.step()
            return
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if clip is not None:
                clip()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if clip is not None:
                self.scaler.unscale_(optimizer)   # the true gradients; step then skips a second unscale
                clip()
            self.scaler.step(optimizer)
            self.scaler.update()


FP32 = Precision("fp32", "cpu")


def set_deterministic(on: bool) -> None:
    """torch's deterministic mode for this process (`train.deterministic`): deterministic kernels only (an error
    where an operation has none), cuDNN without autotuning, and the cuBLAS workspace setting its reproducible
    matmuls need. The variable is read when cuBLAS starts, so this runs before any training. Off, cuDNN
    autotunes its convolutions (`cudnn.benchmark`: each new input shape is timed once, then the fastest
    kernel runs), as it cannot while results must repeat."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # the setting torch's docs name
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def grad_clipper(max_norm: Optional[float], parameters) -> Optional[Callable[[], None]]:
    """What clips the gradients of `parameters` to the global norm `max_norm` (None when that is None or 0)."""
    params = list(parameters)
    return (lambda: torch.nn.utils.clip_grad_norm_(params, max_norm)) if max_norm else None


@dataclass
class EpochPosition:
    """How far an epoch got: what a state written inside it holds, and what `train_epoch` continues from."""

    step: int = 0             # batches of the epoch already trained
    loss_sum: Any = 0.0       # their summed loss x batch size (float64; a device tensor while training)
    count: int = 0            # their samples
    at_step: Optional[Callable[["EpochPosition"], None]] = None   # called after every batch (mid-epoch states)


def train_epoch(model, loader, optimizer, device, loss_fn: Optional[Callable] = None,
                desc: str = "train", progress: bool = True, engine=None, precision: Precision = FP32,
                on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
                position: Optional[EpochPosition] = None, label_smoothing: float = 0.0,
                clip: Optional[Callable[[], None]] = None) -> float:
    """One pass over `loader` (from `position` on, when given); returns the mean training loss.

    `loss_fn(logits, x, y)` may replace cross-entropy (with `label_smoothing`); `engine` (see
    training.engines) replaces the plain zero_grad / backward / step of `optimizer`; `clip` clips the
    gradients before each step (`grad_clipper`); `precision` sets autocast
    (and the fp16 grad scaler); `on_step(index, loss)` is called after every batch with the
    loss still on the device (see `step_logger`), then `position.at_step(position)`. The loss
    is summed on the device: the host waits for it once per epoch, for a logged step, and at most
    once per `BAR_LOSS_EVERY_S` seconds for the loss shown on a progress bar.
    """
    model.train()
    position = position or EpochPosition()
    total = torch.tensor(position.loss_sum, dtype=torch.float64, device=device)
    count = position.count
    # Bars only on a terminal: in batch logs (SLURM, CI) they would print a line per update.
    shown = progress and sys.stderr.isatty()
    bar = tqdm(loader, desc=desc, leave=False, disable=not shown, dynamic_ncols=True)
    shown_at = -math.inf
    for index, (x, y) in enumerate(bar, start=position.step):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
            loss = loss_fn(logits, x, y) if loss_fn else F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        precision.backward_step(loss, optimizer, engine, clip)
        total.add_(loss.detach(), alpha=len(y))   # one op: the float32 loss is summed in float64
        count += len(y)
        if shown and time.monotonic() - shown_at >= BAR_LOSS_EVERY_S:   # reading the loss waits for the GPU
            bar.set_postfix(loss=f"{loss.item():.4f}")
            shown_at = time.monotonic()
        if on_step is not None:
            on_step(index, loss.detach())
        if position.at_step is not None:
            position.step, position.loss_sum, position.count = index + 1, total, count
            position.at_step(position)
    return total.item() / max(count, 1)


def step_logger(log: Callable[[dict], None], every: int, labels: dict, epoch: int, steps_per_epoch: int,
                optimizer) -> Optional[Callable[[int, torch.Tensor], None]]:
    """An `on_step` for `train_epoch` that logs this rank's batch loss and the lr every `every` steps
    (counted from the stage's start), or None when `every` is 0. Only logged steps wait for the device."""
    if every <= 0:
        return None

    def on_step(index: int, loss: torch.Tensor) -> None:
        step = (epoch - 1) * steps_per_epoch + index + 1
        if step % every == 0:
            log({**labels, "epoch": epoch, "step": step, "loss": float(loss), "lr": optimizer.param_groups[0]["lr"]})
    return on_step


def epoch_stats(optimizer, samples: int, seconds: float, device) -> dict:
    """The lr of the epoch just trained (read before the scheduler steps), samples per second and, on CUDA,
    the peak memory allocated since the last call."""
    stats = {"lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples / max(seconds, 1e-9)}
    if torch.device(device).type == "cuda":
        stats["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
    return stats


@torch.no_grad()
def evaluate(model, batches, device, reduce_sum: Optional[Callable] = None) -> dict:
    """Loss and accuracy of `model` over `batches`; `reduce_sum` sums the counts across ranks when given."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, correct, count
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        stats[0] += F.cross_entropy(logits, y, reduction="sum").double()
        stats[1] += (logits.argmax(1) == y).sum()
        stats[2] += len(y)
    stats = stats.cpu()
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
def predict(model, batches, device) -> torch.Tensor:
    """Logits of `model` on every sample of `batches` (from `eval_batches`, in order), on the CPU."""
    model.eval()
    return torch.cat([model(x.to(device)).float().cpu() for x, _ in batches])


def labels_of(batches) -> torch.Tensor:
    """The labels of `batches` (from `eval_batches`), in order, on the CPU."""
    return torch.cat([torch.as_tensor(y).cpu() for _, y in batches])
