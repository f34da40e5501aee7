"""CUDA speed switches of member training: TF32 tensor cores and the channels_last memory format.

- `tf32(enabled, device)`: while members train on CUDA, float32 matmuls and cuDNN convolutions may use
  TF32 tensor cores (a 10-bit mantissa for the products, float32 accumulation). It sets the two
  `allow_tf32` flags as torchtitan and Lightning do; on torch 2.14 they keep the newer per-backend
  `fp32_precision` switches consistent (setting only those to "ieee" makes reading
  `torch.backends.cudnn.allow_tf32` raise, checked here). The previous values are put back
  afterwards: fine-tuning keeps PyTorch's defaults.
- `use_channels_last(model, enabled, device)`: conv nets' weights in channels_last (NHWC) memory
  format, which cuDNN's tensor-core kernels prefer, especially under bf16/fp16 autocast; a
  convolution whose weight is channels_last computes in that format and converts its input itself.

Neither does anything on a CPU. Both were reviewed, not measured: no GPU was available (see
docs/PERFORMANCE.md).
"""

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn


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
