"""Model fusion: Neuron Transplantation (concat + prune), weight averaging and OT fusion.

`fuse(models, method="nt")` returns one model of the members' architecture;
`concat(models)` the wide model computing exactly the members' average output;
`fuse_pair` / `recursive_plan` let a distributed tree reproduce `fuse(...,
schedule="recursive")` bit for bit. `NTOptions` holds NT's options (importance,
order, width, pruner, dedup...), given to `fuse` as one object or as keywords.
This package never uses torch.distributed.

Where is...
- the model seen as channel spaces (which units are coupled)? `analysis/` (`graph.analyze` -> `plan.Plan`;
  one rule per fx operation in `ops`, reshapes and concatenations in `shapes`, the trace in `capture`)
- the concat made exact for attention heads? `analysis/attention` (heads as units), `analysis/windows` (Swin),
  `wide/norms` (each member's LayerNorm block), `wide/widegraph` (shuffles, constant channel counts)
- the wide model built? `wide/assemble` (also what writes the pruned model: `assemble(..., keep)`)
- the choice of the units that stay? `pruning/importance` (scores), `pruning/select` (per space, per member share)
- the pruned model refitted to the concatenated one (after the selection)? `repair/` (`refit.repair`, the
  normal equations in `lstsq`, a layer's regression rows in `rows`, hooks and targets in `capture`); an
  average refitted to the aligned members (after avg and OT)? the same, `keep=None` (`nt.average_step`)
- the merge of duplicate units? `dedup/merge` (the walk), `dedup/choice` (kept, merged, dropped), `dedup/activations`
- the NT step and method dispatch? `nt`; its options? `options` (`NTOptions`); the pairwise tree's arithmetic?
  `schedule`
- the baselines? `baselines` (averaging, the ensemble, distillation loss, BatchNorm re-estimation), `ot`
"""

from ntdist.fusion.baselines import Ensemble, average, distillation_loss, reestimate_bn, reestimates_bn
from ntdist.fusion.config import FusionConfig
from ntdist.fusion.analysis.graph import Plan, analyze
from ntdist.fusion.pruning.importance import DEFAULT_IMPORTANCE, IMPORTANCES, SpaceView, group_l2, l1, l2
from ntdist.fusion.ot import ot_fuse
from ntdist.fusion.pruning.select import prune
from ntdist.fusion.nt import METHODS, concat, fuse, fuse_pair
from ntdist.fusion.options import ORDERS, NTOptions
from ntdist.fusion.schedule import SCHEDULES, recursive_pairs, recursive_plan
from ntdist.fusion.pruning.torch_pruning import DEFAULT_PRUNER, PRUNERS

__all__ = ["concat", "fuse", "fuse_pair", "NTOptions", "recursive_pairs", "recursive_plan", "prune", "average",
           "ot_fuse", "Ensemble", "distillation_loss", "reestimate_bn", "reestimates_bn", "FusionConfig",
           "IMPORTANCES", "SpaceView", "l2", "l1", "group_l2", "DEFAULT_IMPORTANCE", "analyze", "Plan", "METHODS",
           "SCHEDULES", "ORDERS", "PRUNERS", "DEFAULT_PRUNER"]
