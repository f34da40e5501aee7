"""`FusionConfig`: the `fusion:` section of an ntdist run config."""

from dataclasses import dataclass
from typing import List, Optional

from ntdist.options import opt


@dataclass
class FusionConfig:
    """How the k trained members are fused into one model."""

    k: int = opt(2, "number of ensemble members to train and fuse (at least 2)")
    methods: List[str] = opt(["nt"], "fusion methods to run and compare: nt | avg | ot")
    schedule: str = opt("recursive", "how k models are combined: flat (all at once) | iterative | recursive (pairwise tree)")
    order: str = opt("merge_prune", "NT order: merge_prune (concat then prune) | prune_merge (prune members, then concat)")
    importance: str = opt("l2", "NT unit importance for pruning: l2 | group_l2 | l1")
    keep_ratio: Optional[float] = opt(None, "fused width relative to one member's, in (0, k]; default 1")
    width: Optional[int] = opt(None, "fused width of the first hidden layer (others scaled alike); overrides the default")
    bn_reestimate: bool = opt(False, "re-estimate BatchNorm statistics of the fused model on training batches")
    bn_batches: int = opt(10, "training batches used to re-estimate BatchNorm statistics")
