"""One layer as a regression: its input and target outputs as rows, in bounded chunks, and the solution written back.

A Linear layer's rows are its input vectors (every leading position of a
channels-last input is a row); a convolution's rows are its input patches (the
receptive field of each output position, padding applied as the layer applies it),
split by group. Positions are subsampled per input (`positions` of them, drawn
without replacement from a seeded generator).

Rows never exist all at once: `row_chunks` yields them in chunks of at most
`chunk_rows(d)` rows, each gathered straight from the layer's input (a convolution's
patches are indexed out of the unpadded input, the padding mode mapped onto the
indices), so the rows of a chunk hold about as many entries as the d x d Gram
matrix they are summed into (`CHUNK_FLOOR` for small layers), whatever the number
of positions and inputs.

`install` writes coefficients back into the layer's own weight and bias, so the
model keeps its class and every shape. A layer without a bias that feeds a
BatchNorm directly gets its intercept folded into that BatchNorm's running mean
(BN(y + c) with mean mu equals BN(y) with mean mu - c), which is exact. `layer_note` says whether a layer of
the analysis is refitted, and why not when it cannot be (`why_not`).
"""

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ntdist.fusion.analysis.plan import Plan

CHUNK_FLOOR = 1 << 20        # entries of a chunk of rows for layers whose d^2 is smaller (8 MiB of float64)
REFIT = {"linear": nn.Linear, "conv": (nn.Conv1d, nn.Conv2d), "dwconv": (nn.Conv1d, nn.Conv2d),
         "gconv": (nn.Conv1d, nn.Conv2d)}   # the analysis' layer kinds that are refitted, and their modules
SILENT = ("bn", "ln", "lnf", "param")   # carried: each kept unit's own parameters, already exact

Rows = Tuple[torch.Tensor, torch.Tensor]     # rows [G, m, d] and targets [G, m, o]


def why_not(module: nn.Module, kind: str) -> str:
    """Why a layer of this analysis kind cannot be refitted, or '' when it can."""
    if kind not in REFIT:
        return f"{kind} layer ({type(module).__name__}) is not refitted"
    if not isinstance(module, REFIT[kind]):
        return f"{type(module).__name__} (a {kind} layer) is not refitted: only Linear, Conv1d and Conv2d are"
    if getattr(module, "transposed", False):
        return "a transposed convolution is not refitted"
    return ""


def _is_output(plan: Plan, name: str) -> bool:
    return any(spec.module == name and spec.role == "output" for spec in plan.tensors.values())


def layer_note(plan: Plan, name: str, module: nn.Module, twice: set, attention: Dict[str, str],
               through_bn: bool = False) -> Optional[str]:
    """None: refit it; '': nothing to refit; otherwise why it is left as NT pruned it. `attention`: each
    MultiheadAttention's `call_reason` (its out_proj reads the heads, so it is refitted even on the model input).
    `through_bn`: its target is an averaged BatchNorm output taken back through the fused BatchNorm (never exact
    unless refitted)."""
    layer = plan.layers[name]
    if layer.kind in SILENT or (layer.inp is None and layer.kind != "mha" and not through_bn):
        return ""      # inp None: reads only the model input, so its kept (or averaged) outputs are already exact
    if layer.out is None and not _is_output(plan, name):
        return ""      # neither reads nor writes a widened space
    reason = attention[name] if layer.kind == "mha" else why_not(module, layer.kind)
    if not reason and name in twice:
        reason = "forward calls it more than once"
    return reason or None


def chunk_rows(d: int) -> int:
    """Rows per chunk for a regression on `d` inputs: d of them (as many entries as the Gram matrix), more for
    small layers, up to `CHUNK_FLOOR` entries."""
    return max(d, CHUNK_FLOOR // max(1, d))


def _picked(n: int, length: int, positions: int, generator: torch.Generator, device) -> torch.Tensor:
    """[n, p] output positions per input: `positions` drawn without replacement, or all `length` of them."""
    if positions <= 0 or length <= positions:
        return torch.arange(length, device=device).expand(n, length)
    return torch.rand(n, length, generator=generator).argsort(1)[:, :positions].to(device)


def _chunks(take: torch.Tensor, rows: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(input index, position) of every row, input by input, `rows` at a time."""
    n, p = take.shape
    flat = take.reshape(-1)
    for lo in range(0, n * p, rows):
        index = torch.arange(lo, min(lo + rows, n * p), device=take.device)
        yield index // p, flat[lo:lo + rows]


def linear_rows(x: torch.Tensor, y: torch.Tensor, positions: int, generator: torch.Generator) -> Iterator[Rows]:
    """Chunks of rows [1, m, in] and targets [1, m, out] of a Linear layer (channels last, any leading dims)."""
    n = x.shape[0]
    x, y = x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])
    take = _picked(n, x.shape[1], positions, generator, x.device)
    for inputs, at in _chunks(take, chunk_rows(x.shape[-1] + 1)):
        yield x[inputs, at][None], y[inputs, at][None]


def _source(index: torch.Tensor, size: int, mode: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Where padded coordinates `index` read in an unpadded axis of `size`, and (zero padding) which are inside."""
    if mode == "zeros":
        inside = (index >= 0) & (index < size)
        return index.clamp(0, size - 1), inside
    if mode == "replicate":
        return index.clamp(0, size - 1), None
    if mode == "circular":
        return index.remainder(size), None
    period = max(1, 2 * size - 2)                          # reflect: the edge is not repeated
    folded = index.remainder(period)
    return torch.where(folded < size, folded, period - folded), None


def _pads(conv: nn.Module):
    """The padding before each spatial axis (string paddings resolved as torch resolves them)."""
    if conv.padding == "same":
        return [d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation)]
    if conv.padding == "valid":
        return [0] * len(conv.kernel_size)
    return list(conv.padding)


def _two_d(values) -> Tuple[int, int]:
    values = tuple(values)
    return (1, values[0]) if len(values) == 1 else values


def conv_rows(conv: nn.Module, x: torch.Tensor, y: torch.Tensor, positions: int, generator: torch.Generator
              ) -> Iterator[Rows]:
    """Chunks of rows [G, m, in/G * kernel] and targets [G, m, out/G] of a Conv1d/Conv2d (G = its groups)."""
    groups, n = conv.groups, x.shape[0]
    x4 = x.unsqueeze(2) if x.dim() == 3 else x                            # [n, C, H, W]
    out = y.reshape(n, y.shape[1], -1)                                     # [n, O, L]
    (kh, kw), (dh, dw), (sh, sw) = _two_d(conv.kernel_size), _two_d(conv.dilation), _two_d(conv.stride)
    ph, pw = _two_d(_pads(conv)) if len(conv.kernel_size) == 2 else (0, _pads(conv)[0])
    width = y.shape[-1]
    mode = conv.padding_mode
    d = x4.shape[1] * kh * kw
    take = _picked(n, out.shape[2], positions, generator, x.device)
    for inputs, at in _chunks(take, chunk_rows(d // groups + 1)):
        rows, cols = _source((at // width * sh - ph)[:, None] + dh * torch.arange(kh, device=x.device),
                             x4.shape[2], mode), \
            _source((at % width * sw - pw)[:, None] + dw * torch.arange(kw, device=x.device), x4.shape[3], mode)
        patch = x4[inputs[:, None, None], :, rows[0][:, :, None], cols[0][:, None, :]]     # [m, kh, kw, C]
        if rows[1] is not None:
            patch = patch * (rows[1][:, :, None] & cols[1][:, None, :])[..., None].to(patch.dtype)
        m = patch.shape[0]
        patch = patch.permute(0, 3, 1, 2).reshape(m, groups, -1).transpose(0, 1)    # [G, m, C/G * kh * kw]
        yield patch, out[inputs, :, at].reshape(m, groups, -1).transpose(0, 1)


def row_chunks(module: nn.Module, x: torch.Tensor, y: torch.Tensor, positions: int, generator: torch.Generator
               ) -> Iterator[Rows]:
    """The regression rows of `module`, given its input `x` and the outputs `y` it should produce, in chunks."""
    if isinstance(module, nn.Linear):
        return linear_rows(x, y, positions, generator)
    return conv_rows(module, x, y, positions, generator)


def foldable(bn: Optional[nn.Module]) -> bool:
    """Whether an intercept can be folded into this BatchNorm (it normalises with running statistics)."""
    return isinstance(bn, _BatchNorm) and bn.running_mean is not None and not bn.training


def coefficients(module: nn.Module, bias: bool) -> torch.Tensor:
    """The layer's own weights (and bias, zero without one, when `bias`) as float64 coefficients [G, d(+1), o],
    the layout `install` writes back."""
    groups, out = module.groups if hasattr(module, "groups") else 1, module.weight.shape[0]
    weight = module.weight.detach().to(torch.float64).reshape(groups, out // groups, -1).transpose(1, 2)
    if not bias:
        return weight
    b = module.bias.detach() if module.bias is not None else module.weight.new_zeros(out)
    return torch.cat([weight, b.to(torch.float64).reshape(groups, 1, out // groups)], 1)


@torch.no_grad()
def install(module: nn.Module, coef: torch.Tensor, bn: Optional[nn.Module] = None) -> None:
    """Write coefficients [G, d(+1), o] from `solve` into `module` (and an intercept into `bn`, see above)."""
    groups, rows, per_group = coef.shape
    d = module.weight[0].numel()
    solution = coef[:, :d].transpose(1, 2)                                 # [G, o, d]: [out, in/G, *kernel]
    if module.weight.is_contiguous():     # copied and cast straight from the solution, no intermediate copy
        module.weight.view(groups, per_group, d).copy_(solution)
    else:                                 # e.g. channels_last
        module.weight.copy_(solution.reshape(module.weight.shape))
    if rows == d:
        return
    intercept = coef[:, d].reshape(groups * per_group)
    if module.bias is not None:
        module.bias.copy_(intercept.to(module.bias.dtype))
    elif foldable(bn):
        bn.running_mean.sub_(intercept.to(bn.running_mean.dtype))
    else:
        raise ValueError("install: an intercept was fitted for a layer without a bias or a BatchNorm to fold it into")
