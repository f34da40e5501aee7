"""Speed switches of training: CPU threads, TF32 tensor cores and the channels_last memory format.

- `fit_threads(world, build, batch_shape)`: where the job set no thread count (OMP_NUM_THREADS,
  SLURM_CPUS_PER_TASK, distributed.threads_per_rank), torch's intra-op threads follow
  `intra_op_threads`: one thread for a model whose batch costs little (the threads' hand-offs cost
  more than they share), else the cores that the machine's other work leaves idle. On 2 busy cores
  the MNIST-1D demo took 3-7 times longer with 2 threads than with 1 (docs/PERFORMANCE.md).

- `tf32(enabled, device)`: while members train on CUDA, float32 matmuls and cuDNN convolutions may use
  TF32 tensor cores (a 10-bit mantissa for the products, float32 accumulation). It sets the two
  `allow_tf32` flags as torchtitan and Lightning do; on torch 2.14 they keep the newer per-backend
  `fp32_precision` switches consistent (setting only those to "ieee" makes reading
  `torch.backends.cudnn.allow_tf32` raise, checked here). The previous values are put back
  afterwards: fine-tuning keeps PyTorch's defaults.
- `use_channels_last(model, enabled, device)`: conv nets' weights in channels_last (NHWC) memory
  format, which cuDNN's tensor-core kernels prefer, especially under bf16/fp16 autocast; a
  convolution whose weight is channels_last computes in that format and converts its input itself.

The last two do nothing on a CPU; both were reviewed, not measured: no GPU was available (see
docs/PERFORMANCE.md).
"""

import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

SERIAL_FLOPS = 1e8   # a training batch whose forward pass costs fewer FLOPs runs fastest on one thread


def intra_op_threads(load: float, cores: int, work: float) -> int:
    """Torch intra-op threads for a process with `cores` CPUs of its own, under the load average `load` of
    those cores (runnable processes, read before the training starts: the others' work), training with `work`
    FLOPs per batch forward pass: 1 for small work, else the cores the load leaves idle (rounded), at least 1.
    A thread more than the idle cores makes every op wait for its slowest, descheduled thread."""
    if work < SERIAL_FLOPS or cores <= 1:
        return 1
    return max(1, min(cores, int(cores - max(load, 0.0) + 0.5)))


def forward_flops(build: Callable[[], nn.Module], batch_shape: Sequence[int]) -> float:
    """FLOPs of one forward pass of the model `build()` makes on a batch of `batch_shape`, counted on the meta
    device (nothing is computed); infinite when the model does not run there (a user's code may not)."""
    from torch.utils.flop_counter import FlopCounterMode   # here: it imports triton, a tenth of a second

    try:
        with torch.device("meta"):
            model, batch = build(), torch.empty(*batch_shape)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(batch)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - any failure only means the work is unknown: keep the threads
        return float("inf")


def fit_threads(world, build: Callable[[], nn.Module], batch_shape: Sequence[int]) -> int:
    """Set torch's CPU threads by `intra_op_threads` where ntdist chose them (`world.threads_chosen`) on a CPU
    rank, never above `world.threads`; returns the count in use."""
    if world.threads_chosen and world.device.type == "cpu":
        load = os.getloadavg()[0] / max(world.local_size, 1)
        torch.set_num_threads(min(world.threads, intra_op_threads(load, world.threads,
                                                                  forward_flops(build, batch_shape))))
    return torch.get_num_threads()


@contextlib.contextmanager
def tf32(enabled: bool, device) -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions on or off inside the block (CUDA only), restored after."""
    if torch.device(device).type != "cuda":
        yield
        return
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]
    for f in flags:
        f.allow_tf32 = enabled
    try:
        yield
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value


def use_channels_last(model: nn.Module, enabled: bool, device) -> Optional[str]:
    """Put `model`'s 4-d weights in channels_last format when `enabled` on CUDA and it has a 2-d convolution;
    returns None when it did, else a one-line note why not (None too when not `enabled`)."""
    if not enabled:
        return None
    if torch.device(device).type != "cuda":
        return "train.channels_last has no effect on a CPU (it is a CUDA memory format for conv nets)"
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "train.channels_last has no effect: the model has no 2-d convolution"
    model.to(memory_format=torch.channels_last)
    return None
