"""Ridge least squares from sufficient statistics: X^T X and X^T Y summed over batches, solved once.

A layer's refit is a linear regression of its target outputs on its inputs. The
rows never need to be held at once: `accumulate` adds one chunk's X^T X and X^T Y
(float64, a ones column appended when a bias is fitted) to running sums, and
`solve` turns the sums into coefficients. The sums are plain tensors, so a
distributed caller sums them across ranks before solving (`packed` and `unpacked`: one
flat tensor, one all-reduce) and every rank gets the same solution.

Few rows: while a layer has seen fewer rows than it has columns, `accumulate` keeps
the rows themselves instead of summing them (they take less memory than the Gram
matrix), and `solve` fits from them in the dual form, an n x n system instead of a
d x d one: for a layer of 4096 inputs and outputs fitted on 256 rows that is about 1 s
instead of 25 on one core. The first row beyond that, `packed`, or a ridge of 0 sum
them into the Gram matrix.

Groups: a grouped convolution is G independent regressions (each output group reads
only its input group), so every tensor carries a leading group dimension; a Linear
layer or an ordinary convolution has G = 1.

Memory per layer: G (d+1)^2 float64 for the Gram matrix plus G (d+1) o for the
cross term, where d is the input dimension of one group (in_features for a Linear
layer, in_channels / groups * kernel size for a convolution) and o the outputs per
group; nothing grows with the number of calibration rows. `accumulate` adds a chunk
of m rows in place (m x (d+1) float64 beside the sums, and held rows are fewer than
d+1); `rows.row_chunks` keeps m about d, so the peak is a small multiple of the sums.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class Normal:
    """The normal equations of one layer's regression: sums over every row seen so far (float64)."""

    gram: Optional[torch.Tensor]    # [G, d', d']: X^T X, d' = d + 1 with a bias (the ones column is last)
    cross: Optional[torch.Tensor]   # [G, d', o]: X^T Y
    rows: int              # rows seen per group (what a ridge relative to the data would scale with)
    bias: bool             # whether the last column of X is the ones column
    # rows and targets not summed yet: kept while there are fewer rows than columns (gram and cross None till then)
    held: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def shapes(self) -> Tuple[int, int, int]:
        """(groups, columns d', outputs o)."""
        if self.gram is not None:
            return self.gram.shape[0], self.gram.shape[1], self.cross.shape[2]
        x, y = self.held[0]
        return x.shape[0], x.shape[2], y.shape[2]

    def summed(self) -> "Normal":
        """The held rows added into the sums (in place); returns self."""
        if self.gram is None:
            (g, columns, outputs), x = self.shapes(), self.held[0][0]
            self.gram, self.cross = x.new_zeros(g, columns, columns), x.new_zeros(g, columns, outputs)
        for x, y in self.held:
            xt = x.transpose(1, 2)
            self.gram.baddbmm_(xt, x)
            self.cross.baddbmm_(xt, y)
        self.held = []
        return self


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
    columns = rows.shape[2]
    if normal is None:
        normal = Normal(None, None, 0, bias)
    elif normal.bias != bias or normal.shapes() != (g, columns, y.shape[2]):
        raise ValueError("accumulate: rows of another shape than the sums they are added to")
    if normal.gram is None:
        normal.held.append((rows, targets))
        if sum(r.shape[1] for r, _ in normal.held) < columns:
            normal.rows += n
            return normal
        normal.summed()
    else:
        xt = rows.transpose(1, 2)
        normal.gram.baddbmm_(xt, rows)
        normal.cross.baddbmm_(xt, targets)
    normal.rows += n
    return normal


def packed(normal: Normal) -> torch.Tensor:
    """The sums as one flat float64 tensor (Gram, cross, row count): what one all-reduce adds across ranks."""
    normal.summed()
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


def _scale(energy: torch.Tensor, d: int, ridge: float) -> torch.Tensor:
    """`ridge` times the mean squared input per weight column (`energy`: [G] sums of squares), per group."""
    scale = energy / d if d > 0 else torch.zeros_like(energy)
    return ridge * torch.where(scale > 0, scale, torch.ones_like(scale))


def ridge_of(normal: Normal, ridge: float) -> torch.Tensor:
    """Per-group penalty: `ridge` times the mean diagonal of the Gram matrix over the weight columns.

    Relative to the data's own scale, so one `ridge` suits layers whose inputs differ by
    orders of magnitude; the bias column is never penalised. A group whose inputs are all
    zero gets `ridge` itself, which keeps the system positive definite.
    """
    d = normal.shapes()[1] - (1 if normal.bias else 0)
    if normal.gram is None:
        energy = sum(x[:, :, :d].pow(2).sum((1, 2)) for x, _ in normal.held)
    else:
        energy = normal.gram.diagonal(dim1=1, dim2=2)[:, :d].sum(1)
    return _scale(energy, d, ridge)


def _dual(normal: Normal, ridge: float) -> torch.Tensor:
    """The ridge solution from the held rows: centred (the bias is not penalised), then
    B = Xc^T (Xc Xc^T + lambda I)^-1 Yc, which is (Xc^T Xc + lambda I)^-1 Xc^T Yc."""
    x = torch.cat([r for r, _ in normal.held], 1)
    y = torch.cat([t for _, t in normal.held], 1)
    d = x.shape[2] - (1 if normal.bias else 0)
    lam = ridge_of(normal, ridge)
    x = x[:, :, :d]
    if normal.bias:
        x_mean, y_mean = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
        x, y = x - x_mean, y - y_mean
    kernel = x @ x.transpose(1, 2)
    kernel.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    chol, info = torch.linalg.cholesky_ex(kernel)
    alpha = torch.cholesky_solve(y, chol)
    coef = x.new_empty(x.shape[0], d + (1 if normal.bias else 0), y.shape[2])   # written in place: no second copy
    for group in range(x.shape[0]):
        torch.mm(x[group].T, alpha[group], out=coef[group, :d])
        if normal.bias:
            coef[group, d] = y_mean[group, 0] - x_mean[group, 0] @ coef[group, :d]
    return coef if bool((info == 0).all()) else coef.fill_(float("nan"))


def solve(normal: Normal, ridge: float) -> torch.Tensor:
    """Coefficients [G, d', o] minimising |XB - Y|^2 + lambda |B_weights|^2 (lambda from `ridge_of`).

    From held rows (fewer than columns) in the dual form (`_dual`); else Cholesky on
    (X^T X + lambda I); where a group's matrix is not positive definite (ridge 0 and
    collinear inputs) that group falls back to a least-squares solve (minimum norm, on
    the CPU, where torch has the rank-revealing driver).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    if normal.held and ridge > 0:
        coef = _dual(normal, ridge)
        if torch.isfinite(coef).all():
            return coef
    normal.summed()
    g, n, _ = normal.gram.shape
    d = n - (1 if normal.bias else 0)
    a = normal.gram.clone()
    a.diagonal(dim1=1, dim2=2)[:, :d] += ridge_of(normal, ridge)[:, None]
    chol, info = torch.linalg.cholesky_ex(a)
    coef = torch.cholesky_solve(normal.cross, chol)
    del chol
    bad = (info != 0) | ~torch.isfinite(coef).all(2).all(1)
    for i in bad.nonzero().flatten().tolist():
        fallback = torch.linalg.lstsq(a[i].cpu(), normal.cross[i].cpu(), driver="gelsd").solution
        coef[i] = fallback.to(coef.device)
    return coef
