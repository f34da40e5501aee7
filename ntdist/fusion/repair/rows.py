"""One layer as a regression: its input and target outputs as rows, and the solution written back.

A Linear layer's rows are its input vectors (every leading position of a
channels-last input is a row); a convolution's rows are its input patches (the
unfolded receptive field of each output position, padding applied as the layer
applies it), split by group. Positions are subsampled per input (`positions` of
them, drawn without replacement from a seeded generator) and inputs unfolded a few
at a time, so a batch never holds more than about `UNFOLD_ELEMENTS` patch entries
beyond the rows it keeps.

`install` writes coefficients back into the layer's own weight and bias, so the
model keeps its class and every shape. A layer without a bias that feeds a
BatchNorm directly gets its intercept folded into that BatchNorm's running mean
(BN(y + c) with mean mu equals BN(y) with mean mu - c), which is exact.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

UNFOLD_ELEMENTS = 1 << 24   # patch entries unfolded at once per convolution (64 MiB of float32)
REFIT = {"linear": nn.Linear, "conv": (nn.Conv1d, nn.Conv2d), "dwconv": (nn.Conv1d, nn.Conv2d),
         "gconv": (nn.Conv1d, nn.Conv2d)}   # the analysis' layer kinds that are refitted, and their modules


def why_not(module: nn.Module, kind: str) -> str:
    """Why a layer of this analysis kind cannot be refitted, or '' when it can."""
    if kind not in REFIT:
        return f"{kind} layer ({type(module).__name__}) is not refitted"
    if not isinstance(module, REFIT[kind]):
        return f"{type(module).__name__} (a {kind} layer) is not refitted: only Linear, Conv1d and Conv2d are"
    if getattr(module, "transposed", False):
        return "a transposed convolution is not refitted"
    return ""


def _pick(n: int, length: int, positions: int, generator: torch.Generator, device) -> Optional[torch.Tensor]:
    """[n, p] positions drawn per input without replacement, or None to keep all `length` of them."""
    if positions <= 0 or length <= positions:
        return None
    return torch.rand(n, length, generator=generator).argsort(1)[:, :positions].to(device)


def linear_rows(x: torch.Tensor, y: torch.Tensor, positions: int, generator: torch.Generator
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows [1, n, in] and targets [1, n, out] of a Linear layer (channels last, any leading dimensions)."""
    n = x.shape[0]
    x, y = x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])
    take = _pick(n, x.shape[1], positions, generator, x.device)
    if take is not None:
        x = x.gather(1, take[:, :, None].expand(-1, -1, x.shape[2]))
        y = y.gather(1, take[:, :, None].expand(-1, -1, y.shape[2]))
    return x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])


def _padded(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` padded as `conv` pads it (string paddings and every padding mode), as a 2-D image."""
    if conv.padding == "same":
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    elif conv.padding == "valid":
        pads = [0, 0] * len(conv.kernel_size)
    else:
        pads = [p for p in reversed(conv.padding) for _ in range(2)]
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    return x.unsqueeze(2) if x.dim() == 3 else x


def _two_d(values) -> Tuple[int, int]:
    values = tuple(values)
    return (1, values[0]) if len(values) == 1 else values


def conv_rows(conv: nn.Module, x: torch.Tensor, y: torch.Tensor, positions: int, generator: torch.Generator
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows [G, n*p, in/G * kernel] and targets [G, n*p, out/G] of a Conv1d/Conv2d (G = its groups)."""
    groups, n = conv.groups, x.shape[0]
    patch = x.shape[1] * conv.weight[0, 0].numel()
    length = y[0, 0].numel()
    step = max(1, UNFOLD_ELEMENTS // max(1, patch * length))
    xs, ys = [], []
    for lo in range(0, n, step):
        cols = F.unfold(_padded(conv, x[lo:lo + step]), _two_d(conv.kernel_size), dilation=_two_d(conv.dilation),
                        stride=_two_d(conv.stride))                        # [b, C * kernel, L]
        out = y[lo:lo + step].reshape(cols.shape[0], y.shape[1], -1)      # [b, O, L]
        if cols.shape[2] != out.shape[2]:
            raise ValueError(f"unfolded {cols.shape[2]} positions for {out.shape[2]} outputs")
        take = _pick(cols.shape[0], out.shape[2], positions, generator, x.device)
        if take is not None:
            cols = cols.gather(2, take[:, None, :].expand(-1, cols.shape[1], -1))
            out = out.gather(2, take[:, None, :].expand(-1, out.shape[1], -1))
        b, p = cols.shape[0], cols.shape[2]
        xs.append(cols.reshape(b, groups, -1, p).permute(1, 0, 3, 2).reshape(groups, b * p, -1))
        ys.append(out.reshape(b, groups, -1, p).permute(1, 0, 3, 2).reshape(groups, b * p, -1))
    return torch.cat(xs, 1), torch.cat(ys, 1)


def rows_of(module: nn.Module, x: torch.Tensor, y: torch.Tensor, positions: int, generator: torch.Generator
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The regression rows of `module` given its input `x` and the outputs `y` it should produce."""
    if isinstance(module, nn.Linear):
        return linear_rows(x, y, positions, generator)
    return conv_rows(module, x, y, positions, generator)


def foldable(bn: Optional[nn.Module]) -> bool:
    """Whether an intercept can be folded into this BatchNorm (it normalises with running statistics)."""
    return isinstance(bn, _BatchNorm) and bn.running_mean is not None and not bn.training


@torch.no_grad()
def install(module: nn.Module, coef: torch.Tensor, bn: Optional[nn.Module] = None) -> None:
    """Write coefficients [G, d(+1), o] from `solve` into `module` (and an intercept into `bn`, see above)."""
    groups, rows, per_group = coef.shape
    d = module.weight[0].numel()
    weight = coef[:, :d].transpose(1, 2).reshape(module.weight.shape)      # [G, o, d] -> [out, in/G, *kernel]
    module.weight.copy_(weight.to(module.weight.dtype))
    if rows == d:
        return
    intercept = coef[:, d].reshape(groups * per_group)
    if module.bias is not None:
        module.bias.copy_(intercept.to(module.bias.dtype))
    elif foldable(bn):
        bn.running_mean.sub_(intercept.to(bn.running_mean.dtype))
    else:
        raise ValueError("install: an intercept was fitted for a layer without a bias or a BatchNorm to fold it into")
