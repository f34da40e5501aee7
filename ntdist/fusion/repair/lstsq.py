"""Ridge least squares from sufficient statistics: X^T X and X^T Y summed over batches, solved once.

A layer's refit is a linear regression of its target outputs on its inputs. The
rows never need to be held at once: `accumulate` adds one batch's X^T X and X^T Y
(float64, a ones column appended when a bias is fitted) to running sums, and
`solve` turns the sums into coefficients. The sums are plain tensors, so a
distributed caller sums them across ranks before solving (`packed` and `unpacked`: one
flat tensor, one all-reduce) and every rank gets the same solution.

Groups: a grouped convolution is G independent regressions (each output group reads
only its input group), so every tensor carries a leading group dimension; a Linear
layer or an ordinary convolution has G = 1.

Memory per layer: G (d+1)^2 float64 for the Gram matrix plus G (d+1) o for the
cross term, where d is the input dimension of one group (in_features for a Linear
layer, in_channels / groups * kernel size for a convolution) and o the outputs per
group; nothing grows with the number of calibration rows. `accumulate` adds a chunk
of m rows in place (m x (d+1) float64 beside the sums); `rows.row_chunks` keeps m
about d, so the peak is a small multiple of the sums themselves.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Normal:
    """The normal equations of one layer's regression: sums over every row seen so far (float64)."""

    gram: torch.Tensor     # [G, d', d']: X^T X, d' = d + 1 with a bias (the ones column is last)
    cross: torch.Tensor    # [G, d', o]: X^T Y
    rows: int              # rows summed per group (what a ridge relative to the data would scale with)
    bias: bool             # whether the last column of X is the ones column


def accumulate(normal: Optional[Normal], x: torch.Tensor, y: torch.Tensor, bias: bool) -> Normal:
    """Add the rows `x` [G, n, d] with targets `y` [G, n, o] to `normal` (a new one when None).

    Summation is in float64 whatever the inputs' dtype, so the order in which batches
    arrive changes the sums only by float64 rounding. Beyond the sums it holds one
    float64 copy of the rows and targets (with the ones column), so callers pass rows
    in chunks (`rows.row_chunks`).
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"rows must be [groups, n, d] and targets [groups, n, o], got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    g, n, d = x.shape
    rows = torch.empty(g, n, d + (1 if bias else 0), dtype=torch.float64, device=x.device)
    rows[:, :, :d] = x
    if bias:
        rows[:, :, d] = 1.0
    targets = y.to(torch.float64)
    if normal is None:
        normal = Normal(rows.new_zeros(g, rows.shape[2], rows.shape[2]), rows.new_zeros(g, rows.shape[2], y.shape[2]),
                        0, bias)
    elif normal.bias != bias or normal.gram.shape[1] != rows.shape[2] or normal.cross.shape[2] != y.shape[2] \
            or normal.gram.shape[0] != g:
        raise ValueError("accumulate: rows of another shape than the sums they are added to")
    xt = rows.transpose(1, 2)
    normal.gram.baddbmm_(xt, rows)
    normal.cross.baddbmm_(xt, targets)
    normal.rows += n
    return normal


def packed(normal: Normal) -> torch.Tensor:
    """The sums as one flat float64 tensor (Gram, cross, row count): what one all-reduce adds across ranks."""
    count = torch.tensor([float(normal.rows)], dtype=torch.float64, device=normal.gram.device)
    return torch.cat([normal.gram.reshape(-1), normal.cross.reshape(-1), count])


def unpacked(flat: torch.Tensor, like: Normal) -> Normal:
    """The `Normal` of the shapes of `like` whose sums are `flat` (from `packed`, summed)."""
    grams, crosses = like.gram.numel(), like.cross.numel()
    return Normal(flat[:grams].reshape(like.gram.shape).clone(),
                  flat[grams:grams + crosses].reshape(like.cross.shape).clone(),
                  int(round(flat[-1].item())), like.bias)


def same(normal: Normal) -> Normal:
    """The reduction of a repair in one process: the sums as they are."""
    return normal


def ridge_of(normal: Normal, ridge: float) -> torch.Tensor:
    """Per-group penalty: `ridge` times the mean diagonal of the Gram matrix over the weight columns.

    Relative to the data's own scale, so one `ridge` suits layers whose inputs differ by
    orders of magnitude; the bias column is never penalised. A group whose inputs are all
    zero gets `ridge` itself, which keeps the system positive definite.
    """
    d = normal.gram.shape[1] - (1 if normal.bias else 0)
    diag = normal.gram.diagonal(dim1=1, dim2=2)[:, :d]
    scale = diag.mean(1) if d > 0 else normal.gram.new_zeros(normal.gram.shape[0])
    return ridge * torch.where(scale > 0, scale, torch.ones_like(scale))


def solve(normal: Normal, ridge: float) -> torch.Tensor:
    """Coefficients [G, d', o] minimising |XB - Y|^2 + lambda |B_weights|^2 (lambda from `ridge_of`).

    Cholesky on (X^T X + lambda I); where a group's matrix is not positive definite
    (ridge 0 and collinear inputs) that group falls back to a least-squares solve
    (minimum norm, on the CPU, where torch has the rank-revealing driver).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    g, n, _ = normal.gram.shape
    d = n - (1 if normal.bias else 0)
    penalty = torch.zeros(g, n, dtype=normal.gram.dtype, device=normal.gram.device)
    penalty[:, :d] = ridge_of(normal, ridge)[:, None]
    a = normal.gram + torch.diag_embed(penalty)
    chol, info = torch.linalg.cholesky_ex(a)
    coef = torch.cholesky_solve(normal.cross, chol)
    bad = (info != 0) | ~torch.isfinite(coef).all(2).all(1)
    for i in bad.nonzero().flatten().tolist():
        fallback = torch.linalg.lstsq(a[i].cpu(), normal.cross[i].cpu(), driver="gelsd").solution
        coef[i] = fallback.to(coef.device)
    return coef
