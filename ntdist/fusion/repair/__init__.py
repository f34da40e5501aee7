"""Repair: refit the pruned model's layers to the concatenated model by least squares (after NT's selection).

`repair(models, plan, weights, keep, pruned, calibration)` is the whole step
(`refit`); the normal equations it accumulates per layer and solves are in
`lstsq` (kept apart so that a distributed caller can sum them across ranks), a
layer's regression rows and the write-back in `rows`, and reading inputs,
outputs and targets from the models in `capture`.
"""

from ntdist.fusion.repair.lstsq import Normal, accumulate, solve
from ntdist.fusion.repair.refit import POSITIONS, RIDGE, repair

__all__ = ["repair", "accumulate", "solve", "Normal", "RIDGE", "POSITIONS"]
