"""`FusionConfig`: the `fusion:` section of an ntdist run config."""

from dataclasses import dataclass
from typing import List, Optional

from ntdist.errors import UserError, check_choice
from ntdist.fusion.dedup.merge import DEDUP_THRESHOLD
from ntdist.fusion.dedup.choice import OVERFLOWS
from ntdist.fusion.dedup.activations import CRITERIA
from ntdist.fusion.pruning.importance import DEFAULT_IMPORTANCE, IMPORTANCES
from ntdist.fusion.nt import METHODS, ORDERS
from ntdist.fusion.schedule import SCHEDULES
from ntdist.fusion.pruning.torch_pruning import DEFAULT_PRUNER, PRUNERS, check_pruner
from ntdist.options import opt


@dataclass
class FusionConfig:
    """How the k trained members are fused into one model."""

    k: int = opt(2, "number of ensemble members to train and fuse (at least 2)")
    methods: List[str] = opt(["nt"], "fusion methods to run and compare: " + " | ".join(METHODS))
    schedule: str = opt("recursive", "how k models are combined: flat (all at once) | iterative | recursive (pairwise tree)")
    order: str = opt("merge_prune", "NT order: merge_prune (concat then prune) | prune_merge (prune members, then concat)")
    importance: str = opt(DEFAULT_IMPORTANCE, "NT unit importance for pruning: " + " | ".join(IMPORTANCES))
    pruner: str = opt(DEFAULT_PRUNER, "NT pruner: " + " | ".join(PRUNERS) + ". ntdist never builds the wide "
                                      "model; torch_pruning builds it and prunes it with Torch-Pruning, as the "
                                      "authors' code does (needs the torch-pruning package, importance group_l2)")
    keep_ratio: Optional[float] = opt(None, "fused width relative to one member's, in (0, k]; default 1")
    width: Optional[int] = opt(None, "fused width of the first hidden layer (others scaled alike); overrides the default")
    bn_reestimate: bool = opt(False, "re-estimate BatchNorm statistics of the fused model on training batches")
    bn_batches: int = opt(10, "training batches used to re-estimate BatchNorm statistics")
    dedup: bool = opt(False, "NT: off | on. On merges a unit whose incoming weights nearly duplicate a kept "
                             "unit's into it (outgoing weights added) instead of keeping both")
    dedup_threshold: float = opt(DEDUP_THRESHOLD, "similarity in (0, 1) (see fusion.dedup_criterion) above which "
                                                  "fusion.dedup merges two units")
    dedup_overflow: str = opt("drop", "NT dedup: what becomes of units that duplicate no kept unit once the slots "
                                      "are full: drop (as plain NT) | merge (each into its most similar kept unit) | "
                                      "match (units of different members joined, most similar pair first, until "
                                      "the classes fit the slots: averaging for aligned replicas)")
    dedup_criterion: str = opt("weights", "NT dedup: what makes two units duplicates: weights (cosine of their "
                                          "incoming parameters) | activations (cosine of their outputs on the first "
                                          "fusion.dedup_samples training inputs)")
    dedup_samples: int = opt(256, "training inputs whose outputs fusion.dedup_criterion activations compares")

    def __post_init__(self):
        if self.k < 2:
            raise UserError(f"fusion.k must be at least 2 (an ensemble of one cannot be fused), got {self.k}")
        if not self.methods:
            raise UserError(f"fusion.methods is empty; list at least one of {list(METHODS)}")
        for method in self.methods:
            check_choice(method, METHODS, "fusion method")
        check_choice(self.schedule, SCHEDULES, "fusion.schedule")
        check_choice(self.order, ORDERS, "fusion.order")
        check_choice(self.importance, IMPORTANCES, "fusion.importance")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= self.k:
            raise UserError(f"fusion.keep_ratio must be in (0, k] = (0, {self.k}] (1 keeps one member's width), "
                            f"got {self.keep_ratio}")
        if self.width is not None and self.width < 1:
            raise UserError(f"fusion.width must be a positive number of units, got {self.width}; "
                            "leave it unset to keep the members' width")
        if not 0 < self.dedup_threshold < 1:
            raise UserError(f"fusion.dedup_threshold must be in (0, 1) (a cosine similarity, e.g. 0.9), "
                            f"got {self.dedup_threshold}")
        if self.dedup and self.order != "merge_prune":
            raise UserError(f"fusion.dedup needs fusion.order merge_prune (it merges while selecting from all "
                            f"members at once), got {self.order}")
        check_pruner(self.pruner, "nt", self.order, self.dedup, self.importance, where="fusion.pruner")
        if self.pruner != DEFAULT_PRUNER and "nt" not in self.methods:
            raise UserError(f"fusion.pruner '{self.pruner}' only prunes for method nt, which fusion.methods "
                            f"{self.methods} does not list; leave fusion.pruner at '{DEFAULT_PRUNER}'")
        check_choice(self.dedup_overflow, OVERFLOWS, "fusion.dedup_overflow")
        check_choice(self.dedup_criterion, CRITERIA, "fusion.dedup_criterion")
        if self.dedup_samples < 2:
            raise UserError(f"fusion.dedup_samples must be at least 2 (units are compared over the samples), "
                            f"got {self.dedup_samples}")
        if self.bn_batches < 1:
            raise UserError(f"fusion.bn_batches must be at least 1, got {self.bn_batches}")

    def dedup_args(self, merged: Optional[dict] = None) -> dict:
        """The dedup keyword arguments of `fuse` / `fuse_pair`; `merged` receives the merge counts."""
        return dict(dedup=self.dedup, dedup_threshold=self.dedup_threshold, dedup_overflow=self.dedup_overflow,
                    dedup_criterion=self.dedup_criterion, merged=merged)

    def nt_args(self, merged: Optional[dict] = None) -> dict:
        """The NT-only keyword arguments of `fuse` / `fuse_pair`: dedup's and the pruner."""
        return dict(self.dedup_args(merged), pruner=self.pruner)

    def example_count(self) -> int:
        """How many training inputs fusion is given: two trace the shapes; the activation criterion needs more."""
        return self.dedup_samples if self.dedup and self.dedup_criterion == "activations" else 2
