"""The members' evaluation, between training and fusion: each member's accuracy, the ensemble's, and their diversity.

Each member is evaluated on the rank that holds it; one sum per tensor across ranks gives every rank every
member's predictions and the ensemble's summed logits, never the [k, N, classes] logits themselves
(`member_outputs`). The best member is chosen on validation accuracy; with `output.diversity` the members'
disagreement and near-duplicate units are reported (`fusion.diversity`, `distributed.diagnostics`).
"""

import sys
from typing import Dict, Tuple

import torch

from ntdist.distributed.diagnostics import duplicate_units_across_ranks
from ntdist.distributed.world import gather_world_info
from ntdist.fusion.diversity import summarize
from ntdist.records.results import RunResults
from ntdist.stages.context import Run
from ntdist.stages.given import repeated_files
from ntdist.training.batches import eval_batches, feed
from ntdist.training.loop import labels_of, predict


def evaluate_members(r: Run, held: Dict[int, torch.nn.Module]) -> RunResults:
    """Each member's val/test accuracy and the accuracy of their output average (the ensemble)."""
    k, world, splits, batch = r.cfg.fusion.k, r.world, r.splits, r.cfg.data.eval_batch_size
    data = feed(r.cfg.data, world.device)
    val, test = eval_batches(splits.val, batch, **data), eval_batches(splits.test, batch, **data)
    val_sum, val_pred = member_outputs(held, val, (k, len(splits.val), splits.num_classes), world.device)
    test_sum, test_pred = member_outputs(held, test, (k, len(splits.test), splits.num_classes), world.device)
    # Each member's outputs live on its holder; one sum per tensor gives every rank all of them.
    world.wait_for("evaluating their members")
    val_sum, val_pred, test_sum, test_pred = (world.reduce_sum(t) for t in (val_sum, val_pred, test_sum, test_pred))
    val_y, test_y = labels_of(val), labels_of(test)
    members_val = (val_pred == val_y).double().mean(1)
    members = (test_pred == test_y).double().mean(1).tolist()
    best = int(torch.argmax(members_val).item())   # chosen on validation accuracy
    results = RunResults(k=k, seed=r.cfg.train.seed, members=members, members_val=members_val.tolist(),
                         best_member=members[best], best_member_index=best,
                         ensemble=((test_sum / k).argmax(1) == test_y).double().mean().item(),
                         ensemble_val=((val_sum / k).argmax(1) == val_y).double().mean().item())
    world.print0(f"members test accuracy {[round(a, 4) for a in members]}, ensemble {results.ensemble:.4f}")
    if r.cfg.output.diversity:
        results.diversity = diversity_stage(r, held, test_pred)
    results.world = gather_world_info(world)
    return results


def member_outputs(held: Dict[int, torch.nn.Module], batches, shape: Tuple[int, int, int],
                   device) -> Tuple[torch.Tensor, torch.Tensor]:
    """For `shape` = (k members, N samples, classes): (the held members' logits summed in float64 [N, classes],
    every member's predicted class [k, N], zeros for the members held elsewhere), on the CPU. That is all the
    ensemble, the members' accuracies and the disagreement need; all logits ([k, N, classes] float64) would
    be k times the memory and the traffic. k float32 values within a factor of about 2^25 of each other add
    exactly in float64, in any order, so the sum over ranks is what the mean over all logits summed."""
    k, n, classes = shape
    summed = torch.zeros(n, classes, dtype=torch.float64)
    predicted = torch.zeros(k, n, dtype=torch.int64)
    for i in sorted(held):
        logits = predict(held[i], batches, device).double()
        summed += logits
        predicted[i] = logits.argmax(1)
    return summed, predicted


def diversity_stage(r: Run, held: Dict[int, torch.nn.Module], test_pred: torch.Tensor) -> dict:
    """Disagreement and near-duplicate units of the members; warns when NT would lose information."""
    out = r.cfg.output
    duplicates = duplicate_units_across_ranks(r.world, held, r.layout.holders, r.template, out.duplicate_threshold,
                                              out.duplicate_max_units or None)   # sampled rows only travel
    summary = summarize(list(test_pred), duplicates, out.duplicate_threshold)   # the same on every rank
    if summary["warning"]:
        summary["warning"] += repeated_files(r.cfg.fusion.members)
        r.world.print0(f"ntdist: warning: {summary['warning']}", file=sys.stderr)
    return summary
