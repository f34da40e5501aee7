"""Repair: refit the pruned model's layers to the concatenated model by least squares (after NT's selection).

`repair(models, plan, weights, keep, pruned, calibration)` is the whole step
(`refit`; with `keep` None it refits an average, after averaging or OT, to the
aligned members' averaged outputs instead); the normal equations it accumulates per layer and solves are in
`lstsq` (kept apart so that a distributed caller can sum them across ranks:
`repair(..., reduce=...)` with `packed`/`unpacked`), a
layer's regression rows and the write-back in `rows`, `nn.MultiheadAttention`
(its projections, then `out_proj` on the recomputed context) in `attention`,
reading inputs, outputs and targets from the models in `capture`, and the
calibration inputs a user passes, checked and batched, in `inputs`.
"""

from ntdist.fusion.repair.lstsq import Normal, accumulate, packed, same, solve, unpacked
from ntdist.fusion.repair.refit import POSITIONS, RIDGE, Reduce, repair

__all__ = ["repair", "accumulate", "solve", "Normal", "Reduce", "packed", "unpacked", "same", "RIDGE", "POSITIONS"]
