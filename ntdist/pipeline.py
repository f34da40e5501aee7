"""`ntdist run`: train members -> evaluate -> fuse with each method -> fine-tune -> results.

`run` prepares the run directory and writes the results; `run_stages` below
reads as the table of contents. What never changes during a run (config, world,
member layout, data, model spec, run directory) travels as one frozen `Run`;
what changes (the members a rank holds, fused models, results) is passed and
returned explicitly. The same code runs in one process or on many
ranks: the `World` and the `MemberLayout` decide who trains, holds and fuses what.
"""

import copy
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from ntdist.config import Config, to_yaml
from ntdist.distributed.comm import (all_gather_records, broadcast_model, destroy_groups, new_groups,
                                     sum_counts)
from ntdist.distributed.devices import synchronize
from ntdist.distributed.tree import fusion_device, gather_fuse, ot_reduce, reduce_average, tree_fuse
from ntdist.distributed.world import World
from ntdist.errors import UserError
from ntdist.fusion import reestimate_bn, reestimates_bn
from ntdist.records.checkpoint import load_model, save_checkpoint
from ntdist.records.files import remove_if_present
from ntdist.records.results import RESULTS_FILE, ControlResult, MethodResult, RunResults
from ntdist.records.rundir import finetuned_name
from ntdist.stages.context import Run, finetune_part, make_run
from ntdist.stages.evaluate import evaluate_members
from ntdist.stages.finetune import distill_teacher, evaluate_splits, finetune
from ntdist.stages.given import check_not_overwritten, load_members
from ntdist.stages.members import train_members
from ntdist.stages.sync import sync_stage
from ntdist.training.batches import feed, train_batches
from ntdist.training.hardware import fit_threads
from ntdist.training.config import CONTROL_SEED, FUSED_SEED, run_seed
from ntdist.training.loop import set_deterministic
from ntdist.training.state import finished_history, finished_info

CONTROL_LABEL = "best-member"   # the control (the best member fine-tuned) in metrics and checkpoint names


def run(cfg: Config, world: World, resume: bool = False, overwrite: bool = False):
    """The whole NT workflow; returns the results (identical on every rank)."""
    started = time.time()
    r = make_run(cfg, world, resume)
    fit_threads(world, r.spec.build, (cfg.data.batch_size, *r.splits.in_shape))
    prepare_rundir(r, overwrite)
    try:
        results = run_stages(r)
        results.wall_seconds = time.time() - started
        r.rundir.write_results(results)
    finally:
        r.rundir.close()     # the trackers' files
        r.rundir.release()   # the run directory's lock
    return results


def run_stages(r: Run):
    """Train, evaluate, fuse and fine-tune (or periodic-sync SGD); returns the results."""
    cfg, world = r.cfg, r.world
    set_deterministic(cfg.train.deterministic)
    if cfg.mode == "sync":
        results = sync_stage(r)
    else:
        world.barrier()
        train_start = time.perf_counter()
        held = train_stage(r)
        train_seconds = time.perf_counter() - train_start
        results = evaluate_members(r, held)
        results.train_seconds = train_seconds
        results.control = control_stage(r, held, results.best_member_index)
        for method in cfg.fusion.methods:
            fused, seconds, merged = fuse_stage(r, held, method)
            results.fusion[method] = finetune_stage(r, held, fused, method, seconds)
            results.fusion[method].merged = merged
        results.add_kept_gains()
        world.print0(summary_table(results, r.rundir.path))
    return results


def prepare_rundir(r: Run, overwrite: bool) -> None:
    """Every rank checks the directory before rank 0 creates and locks it, so all stop together on a mistake."""
    if overwrite:
        check_not_overwritten(r.cfg.fusion.members, r.rundir.path)
    r.rundir.check(r.resume, overwrite)
    r.world.wait_for("loading the data")
    problem = None
    try:
        r.rundir.prepare(r.resume, overwrite, r.cfg.fusion.k, [CONTROL_LABEL, *r.cfg.fusion.methods])
        r.rundir.write_config(to_yaml(r.cfg), r.resume)
    except UserError as err:   # rank 0 alone prepares; every rank raises its error
        problem = str(err)
    problem = all_gather_records(r.world, [problem])[0]
    if problem is not None:
        r.rundir.release()
        raise UserError(problem)


def train_stage(r: Run) -> Dict[int, torch.nn.Module]:
    """Train this rank's members (in parallel across rank groups); returns the members this rank holds.

    A member whose final checkpoint exists is loaded instead of trained when resuming; members given in
    `fusion.members` are loaded from their files instead of trained.
    """
    world, layout = r.world, r.layout
    if r.cfg.fusion.members:
        world.print0(f"members: the {layout.num_members} files of fusion.members, not trained here")
        return load_members(r.cfg.fusion.members, r.spec, layout.held_by(world.rank), world.device)
    groups = new_groups(world, [layout.group_ranks(m) for m in range(layout.num_members)]) \
        if layout.group_size > 1 else {}
    held, histories, finished = {}, [], {}
    for i in layout.members_of(world.rank):
        final = r.rundir.member_checkpoint(i)
        history = finished_history(final, r.member_owner(i), r.rundir.owners_recorded()) if r.resume else None
        if history is not None:
            finished[i] = (load_model(final, expect_spec=r.spec)[0].to(world.device), history)
    trained = train_members(r, [i for i in layout.members_of(world.rank) if i not in finished], groups)
    destroy_groups(groups)
    for i in layout.members_of(world.rank):
        model, history = finished[i] if i in finished else trained[i]
        if world.rank == layout.holder(i) and i in trained:
            save_checkpoint(r.rundir.member_checkpoint(i), model, r.spec,
                            info=finished_info(r.member_owner(i), history, stage="member", member=i))
            remove_if_present(r.rundir.member_state(i))
        if world.rank == layout.holder(i):
            held[i] = model
            histories.append(history)
    world.wait_for("training their members")   # k % W != 0, or members loaded instantly on --resume
    for history in sorted(all_gather_records(world, histories), key=lambda h: h[0]["member"] if h else -1):
        for record in history:
            r.rundir.log(record)
    return held


def control_stage(r: Run, held: Dict[int, torch.nn.Module], best: int):
    """The best member fine-tuned for the same epochs with the same recipe as the fused models (distilled from the
    members when they are): a fair baseline."""
    if not r.cfg.finetune.control or r.cfg.finetune.epochs == 0:
        return None
    model = copy.deepcopy(held[best]) if best in held else r.template()
    model = broadcast_model(r.world, model.cpu(), r.layout.holder(best))
    distill = r.cfg.finetune.distill
    teacher = distill_teacher(r, held) if distill else None
    history = resumable_finetune(r, model, CONTROL_LABEL, run_seed(r.cfg.train, CONTROL_SEED), teacher)
    return ControlResult(member=best, distilled=distill, finetune=[h["test_accuracy"] for h in history],
                         finetune_val=[h["val_accuracy"] for h in history])


def resumable_finetune(r: Run, model: torch.nn.Module, label: str, seed: int, teacher) -> List[dict]:
    """Fine-tune `model` (state after every epoch), or load the finished result when resuming."""
    final = r.rundir.finetuned_checkpoint(label)
    owner = r.owner(finetune_part(label), seed, r.cfg.finetune.epochs)
    history = finished_history(final, owner, r.rundir.owners_recorded()) if r.resume else None
    if history is not None:
        model.load_state_dict(load_model(final, expect_spec=r.spec)[0].state_dict())
    else:
        history = finetune(r, model, label, seed, teacher)
        if r.world.is_main:
            save_checkpoint(final, model.cpu(), r.spec,
                            info=finished_info(owner, history, stage="finetune", method=label))
            remove_if_present(r.rundir.finetune_state(label))
        r.world.wait_for(f"writing the checkpoint {finetuned_name(label)} on rank 0")
    for record in history:
        r.rundir.log(record)
    return history


def fuse_stage(r: Run, held: Dict[int, torch.nn.Module], method: str) -> Tuple[torch.nn.Module, float, Optional[dict]]:
    """Fuse with `method`; every rank gets the fused model, the seconds taken, NT dedup's merges (or None)."""
    fc, world = r.cfg.fusion, r.world
    device = fusion_device(world)   # on a GPU with NCCL: where the members are; the traces run there too
    merged, notes, examples = {}, [], r.example_inputs().to(device)
    args = fc.method_args(method, merged, notes)     # each method's own options
    tree = method == "nt" and fc.schedule == "recursive"
    gathered = fc.gathers(method)     # avg and ot repaired: fused on rank 0, from all members
    if (method == "nt" and fc.repair != "none") or gathered:   # the tree repairs on every rank's draw, summed
        share = (world.rank, world.size) if tree else (0, 1)
        args["calibration"] = r.calibration_inputs(*share).to(device)
    world.barrier()
    start = time.perf_counter()
    fusing = {i: m.to(device) for i, m in held.items()}
    if tree:
        fused = tree_fuse(world, fusing, r.layout.holders, r.template, example_inputs=examples, **args)
    elif method == "avg" and fc.schedule == "flat" and not gathered:
        fused = reduce_average(world, fusing, r.layout.holders, r.template)
    elif method == "ot" and fc.schedule == "flat" and not gathered:
        fused = ot_reduce(world, fusing, r.layout.holders, r.template, examples, **args)
    else:
        fused = gather_fuse(world, fusing, r.layout.holders, r.template, method=method, schedule=fc.schedule,
                            example_inputs=examples, **args)
    synchronize(device)
    seconds = time.perf_counter() - start
    for note in dict.fromkeys(all_gather_records(world, notes) if "notes" in args else []):   # each once
        world.print0(note, file=sys.stderr)      # the layers the repair left as they were
    repaired = "calibration" in args and fc.nt_options().repairs(args["calibration"], method)
    if reestimates_bn(fc.bn_reestimate, fused, repaired):
        torch.manual_seed(run_seed(r.cfg.train, FUSED_SEED))   # the passes run in train mode: dropout draws
        batches = train_batches(r.splits.train, r.cfg.data.batch_size, r.cfg.train.seed,
                                **feed(r.cfg.data, world.device))
        reestimate_bn(fused.to(world.device), batches, fc.bn_batches)
    for model in held.values():
        model.to(world.device)
    return fused, seconds, (sum_counts(world, merged) if method == "nt" and fc.dedup else None)


def finetune_stage(r: Run, held: Dict[int, torch.nn.Module], fused: torch.nn.Module, method: str,
                   seconds: float) -> MethodResult:
    """Evaluate right after fusion, fine-tune (or distil), save the fused model; returns its results."""
    post = evaluate_splits(r, fused.to(r.world.device))
    r.world.print0(f"{method}: right after fusion val {post['val']:.4f}, test {post['test']:.4f}")
    r.rundir.log({"stage": "fusion", "method": method, "epoch": 0, "val_accuracy": post["val"],
                  "test_accuracy": post["test"], "fuse_seconds": seconds})
    teacher = distill_teacher(r, held) if r.cfg.finetune.distill else None
    history = resumable_finetune(r, fused, method, run_seed(r.cfg.train, FUSED_SEED), teacher)
    return MethodResult(post_fusion=post["test"], post_fusion_val=post["val"],
                        finetune=[h["test_accuracy"] for h in history],
                        finetune_val=[h["val_accuracy"] for h in history], fuse_seconds=seconds,
                        sparsity=sparsity(r, held, fused) if method == "nt" else None)


def _first_layer(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)))


def sparsity(r: Run, held: Dict[int, torch.nn.Module], fused: torch.nn.Module) -> float:
    """1 - kept units / (k * member units) of the first hidden layer (the x-axis of the paper's Fig. 4)."""
    width = torch.zeros(1, dtype=torch.float64)
    if 0 in held:
        width[0] = _first_layer(held[0]).weight.shape[0]
    member_width = r.world.reduce_sum(width).item()
    return 1.0 - _first_layer(fused).weight.shape[0] / (r.cfg.fusion.k * member_width)


def summary_table(results: RunResults, path: str) -> str:
    lines = [f"{'':14s}{'after fusion':>14s}{'after finetune':>16s}{'kept gain fusion/ft':>20s}",
             f"{'best member':14s}{results.best_member * 100:13.2f}%{'':16s}",
             f"{'ensemble':14s}{results.ensemble * 100:13.2f}%{'':16s}"]
    if results.control:
        lines.append(f"{'member+extra':14s}{'':14s}{results.control.finetune[-1] * 100:15.2f}%")
    for method, m in results.fusion.items():
        last = f"{m.finetune[-1] * 100:15.2f}%" if m.finetune else f"{'-':>16s}"
        gains = m.kept_gain or {}
        kept = "  ".join(f"{gains[s]:+.2f}" if s in gains else "-" for s in ("post_fusion", "finetune")) \
            if gains else "n/a"   # the ensemble is not ahead of the best member: no gain to keep
        lines.append(f"{method:14s}{m.post_fusion * 100:13.2f}%{last}{kept:>20s}")
    lines.append(f"results: {os.path.join(path, RESULTS_FILE)}")
    return "\n".join(lines)
