"""`FusionConfig`: the `fusion:` section of an ntdist run config (and the keys `ntdist fuse` takes).

Its NT fields are `NTOptions`' fields under the same names, with the same defaults
and help texts (taken from there); `nt_options()` turns them into one validated
`NTOptions` whose errors name the keys `fusion.*`.
"""

import glob
import os
import re
from dataclasses import dataclass
from typing import List, Optional

from ntdist.errors import UserError, check_choice
from ntdist.fusion.baselines import BN_REESTIMATES, bn_reestimate_setting
from ntdist.fusion.nt import METHODS
from ntdist.fusion.options import NTOptions
from ntdist.fusion.ot import OT_MODES, check_ot
from ntdist.fusion.schedule import DEFAULT_SCHEDULE, SCHEDULES
from ntdist.options import opt

PREFIX = "fusion."


def _nt(name: str):
    """NT option `name` as a config field: its default and help text from `NTOptions`."""
    return NTOptions.config_field(name, "NT: ")


@dataclass
class FusionConfig:
    """How the k trained members are fused into one model."""

    k: int = opt(2, "number of ensemble members to train and fuse (at least 2); with fusion.members, the number "
                    "of files")
    members: List[str] = opt([], "members trained elsewhere, fused instead of training k: .safetensors or torch "
                                 "state dicts (also ntdist checkpoints and Lightning .ckpt) of model.name with "
                                 "model.kwargs, paths relative to the current directory; a pattern ('runs/*.pt', quoted) "
                                 "stands for its files, sorted")
    methods: List[str] = opt(["nt"], "fusion methods to run and compare: " + " | ".join(METHODS))
    schedule: str = opt(DEFAULT_SCHEDULE, "how k models are combined: flat (all at once) | iterative | recursive (pairwise tree)")
    order: str = _nt("order")
    importance: str = _nt("importance")
    pruner: str = _nt("pruner")
    keep_ratio: Optional[float] = _nt("keep_ratio")
    width: Optional[int] = _nt("width")
    bn_reestimate: str = opt("auto", "recompute the fused model's BatchNorm running statistics on training inputs "
                                     "(the members' are stale for it): " + " | ".join(BN_REESTIMATES) + "; auto: "
                                     "every method except after its repair, wherever data is given")
    bn_batches: int = opt(10, "training batches used to re-estimate BatchNorm statistics (ntdist run)")
    dedup: bool = _nt("dedup")
    dedup_threshold: float = _nt("dedup_threshold")
    dedup_overflow: str = _nt("dedup_overflow")
    dedup_criterion: str = _nt("dedup_criterion")
    dedup_samples: int = opt(256, "training inputs whose outputs fusion.dedup_criterion activations compares")
    repair: str = _nt("repair")
    repair_ridge: float = _nt("repair_ridge")
    calibration_samples: int = opt(2000, "training inputs (drawn with the seed) that the repair fits on, per "
                                         "rank: a step of the distributed tree fits on those of all its ranks")
    ot_mode: str = opt("weights", "OT: what a unit's cost compares: " + " | ".join(OT_MODES) + " (weights: incoming "
                                  "weight rows; activations: outputs on fusion.dedup_samples training inputs)")
    ot_reg: float = opt(0.0, "OT: 0 for exact transport (POT's emd); > 0 for entropic Sinkhorn transport with "
                             "this regularisation, relative to the largest cost")

    def __post_init__(self):
        if self.members and self.k != len(self.members):   # config.load_config sets k to the count unless given
            raise UserError(f"fusion.k={self.k} but fusion.members lists {len(self.members)} files; fusion.k is the "
                            "number of members: drop it, or list that many files")
        if self.k < 2:
            raise UserError(f"fusion.k must be at least 2 (an ensemble of one cannot be fused), got {self.k}"
                            + (" (the number of fusion.members)" if self.members else ""))
        if not self.methods:
            raise UserError(f"fusion.methods is empty; list at least one of {list(METHODS)}")
        for method in self.methods:
            check_choice(method, METHODS, "fusion method")
        check_choice(self.schedule, SCHEDULES, "fusion.schedule")
        options = self.nt_options()
        if self.keep_ratio is not None and self.keep_ratio > self.k:
            raise UserError(f"fusion.keep_ratio must be in (0, k] = (0, {self.k}] (1 keeps one member's width), "
                            f"got {self.keep_ratio}")
        options.check_methods(self.methods, PREFIX)
        if self.dedup_samples < 2:
            raise UserError(f"fusion.dedup_samples must be at least 2 (units are compared over the samples), "
                            f"got {self.dedup_samples}")
        if self.calibration_samples < 1:
            raise UserError(f"fusion.calibration_samples must be at least 1, got {self.calibration_samples}")
        check_ot(self.ot_mode, self.ot_reg, PREFIX)
        if (self.ot_mode, self.ot_reg) != ("weights", 0.0) and "ot" not in self.methods:
            raise UserError("fusion.ot_mode and fusion.ot_reg are OT's options, but fusion.methods has no ot: "
                            "add ot to fusion.methods, or drop them")
        self.bn_reestimate = bn_reestimate_setting(self.bn_reestimate)
        if self.bn_batches < 1:
            raise UserError(f"fusion.bn_batches must be at least 1, got {self.bn_batches}")

    def nt_options(self) -> NTOptions:
        """The NT options of this section, validated (errors name the keys fusion.*)."""
        return NTOptions(**{name: getattr(self, name) for name in NTOptions.names()}, prefix=PREFIX)

    def gathers(self, method: str) -> bool:
        """Whether `method` is avg or ot with their repair on: the repair fits to all members at once, so
        `ntdist run` gathers them on rank 0 instead of averaging them by an all-reduce."""
        return method != "nt" and self.nt_options().repairs(True, method)

    def method_args(self, method: str, merged: dict, notes: list) -> dict:
        """What `fuse` takes for `method` beside the models and inputs: NT's options (`merged` receives dedup's
        counts), OT's mode; avg's and ot's repair options where `gathers`; `notes` receives the repair's."""
        args = {"nt": dict(options=self.nt_options(), merged=merged, notes=notes),
                "ot": dict(ot_mode=self.ot_mode, ot_reg=self.ot_reg)}.get(method, {})
        if self.gathers(method):
            args.update(options=self.nt_options(), notes=notes)
        return args

    def example_count(self) -> int:
        """How many training inputs fusion is given: two trace the shapes; the activation criterion needs more."""
        compares = (self.dedup and self.dedup_criterion == "activations") or self.ot_mode == "activations"
        return self.dedup_samples if compares else 2


def expand_members(paths: list) -> list:
    """fusion.members with each shell pattern ('runs/mine/*.pt') replaced by the files it matches, sorted; a path
    that exists is taken as it is, and a pattern that matches nothing is a UserError."""
    out = []
    for path in paths:
        if not isinstance(path, str) or not re.search(r"[*?[]", path) or os.path.lexists(path):
            out.append(path)
            continue
        matches = sorted(glob.glob(path))
        if not matches:
            raise UserError(f"fusion.members: '{path}' matches no file (relative to {os.getcwd()}); "
                            "check the pattern, or list the files")
        out += matches
    return out
