"""`ntdist run`: train members -> evaluate -> fuse with each method -> fine-tune -> results.

Each step is one function with explicit inputs and outputs; `run` below reads as
the table of contents. The same code runs in one process or on many ranks: the
`World` and the `MemberLayout` decide who trains, holds and fuses what.
"""

import copy
import os
import sys
import time
from typing import Dict

import torch

from ntdist.checkpoint import load_model, save_checkpoint
from ntdist.config import Config, to_yaml
from ntdist.data import Splits, load_splits
from ntdist.dist.comm import all_gather_records, broadcast_model, gather_models, new_groups
from ntdist.dist.layout import MemberLayout
from ntdist.dist.tree import gather_fuse, tree_fuse
from ntdist.dist.world import World, gather_world_info
from ntdist.diversity import diversity_summary
from ntdist.finetune import evaluate_splits, finetune
from ntdist.fusion import concat, reestimate_bn
from ntdist.members import build_member, train_member
from ntdist.models import complete_kwargs
from ntdist.resume import finished_history, preempt_requested
from ntdist.rundir import RunDir
from ntdist.sync import run_sync
from ntdist.train import labels_of, predict, train_loader


def run(cfg: Config, world: World, resume: bool = False, overwrite: bool = False) -> dict:
    """The whole NT workflow; returns the results dict (identical on every rank)."""
    started = time.time()
    splits = load_splits(cfg.data)                   # everything that can fail on bad input comes first,
    spec = model_spec(cfg, splits)                   # so a mistake leaves no half-made run directory
    build_member(spec, 0)
    layout = MemberLayout(cfg.fusion.k, world.size)
    rundir = RunDir(cfg.output.dir, writer=world.is_main)
    rundir.check(resume, overwrite)
    world.barrier()
    rundir.prepare(resume, overwrite)
    world.barrier()
    rundir.write_config(to_yaml(cfg), resume)
    if cfg.mode == "sync":
        results = run_sync(cfg, world, splits, spec, rundir, example_inputs(splits))
        rundir.write_results(results)
        return results

    world.barrier()
    train_start = time.perf_counter()
    held = train_stage(cfg, world, layout, splits, spec, rundir, resume)
    train_seconds = time.perf_counter() - train_start
    results = evaluate_members(cfg, world, layout, splits, spec, held)
    results["world"] = gather_world_info(world)
    results["train_seconds"] = train_seconds
    results["control"] = control_stage(cfg, world, layout, splits, spec, held, results, rundir, resume)
    results["fusion"] = {}
    for method in cfg.fusion.methods:
        fused, seconds = fuse_stage(cfg, world, layout, splits, spec, held, method)
        results["fusion"][method] = finetune_stage(cfg, world, layout, splits, spec, held, fused, method,
                                                   seconds, rundir, resume)
    results["wall_seconds"] = time.time() - started
    rundir.write_results(results)
    world.print0(summary_table(results, rundir.path))
    return results


def model_spec(cfg: Config, splits: Splits) -> dict:
    """The full `{name, kwargs}` spec, with input shape and class count filled in from the data."""
    kwargs = complete_kwargs(cfg.model.name, dict(cfg.model.kwargs), splits.in_shape, splits.num_classes)
    return {"name": cfg.model.name, "kwargs": kwargs}


def example_inputs(splits: Splits) -> torch.Tensor:
    return torch.stack([splits.train[i][0] for i in range(min(2, len(splits.train)))])


def train_stage(cfg, world, layout, splits, spec, rundir, resume) -> Dict[int, torch.nn.Module]:
    """Train this rank's members (in parallel across rank groups); returns the members this rank holds.

    A member whose final checkpoint exists is loaded instead of trained when resuming.
    """
    ranks = [layout.group_ranks(m) for m in range(layout.num_members)]
    groups = new_groups(world, ranks) if layout.group_size > 1 else {}
    held, histories = {}, []
    for i in layout.members_of(world.rank):
        final = rundir.file("checkpoints", f"member{i}.safetensors")
        history = finished_history(final, cfg.train.epochs) if resume else None
        if history is not None:
            model = load_model(final, expect_spec=spec)[0].to(world.device)
        else:
            group = groups.get(i)
            stop = (lambda g=group: world.any(preempt_requested(), g)) if group is not None else preempt_requested
            run = train_member(i, spec, cfg.train, splits, cfg.data.batch_size, cfg.data.eval_batch_size,
                               world.device, group, world.rank % layout.group_size, layout.group_size,
                               show=world.is_main, log=print_if(world.is_main),
                               state_path=rundir.file("checkpoints", f"member{i}.state.safetensors"),
                               resume=resume, should_stop=stop)
            model, history = run.model, run.history
            if world.rank == layout.holder(i):
                save_checkpoint(final, model, spec, info={"stage": "member", "member": i,
                                                          "epochs": cfg.train.epochs, "history": history})
                remove(rundir.file("checkpoints", f"member{i}.state.safetensors"))
        if world.rank == layout.holder(i):
            held[i] = model
            histories.append(history)
    for history in sorted(all_gather_records(world, histories), key=lambda h: h[0]["member"] if h else -1):
        for record in history:
            rundir.log(record)
    return held


def evaluate_members(cfg, world, layout, splits, spec, held) -> dict:
    """Each member's val/test accuracy and the accuracy of their output average (the ensemble)."""
    k = cfg.fusion.k
    table = torch.zeros(k, 2, dtype=torch.float64)
    val_logits = torch.zeros(k, len(splits.val), splits.num_classes, dtype=torch.float64)
    test_logits = torch.zeros(k, len(splits.test), splits.num_classes, dtype=torch.float64)
    for i, model in held.items():
        val_logits[i] = predict(model, splits.val, cfg.data.eval_batch_size, world.device).double()
        test_logits[i] = predict(model, splits.test, cfg.data.eval_batch_size, world.device).double()
    # Each member's logits live on its holder; one sum gives every rank all of them.
    val_logits, test_logits = world.reduce_sum(val_logits), world.reduce_sum(test_logits)
    val_y, test_y = labels_of(splits.val), labels_of(splits.test)
    table[:, 0] = (val_logits.argmax(2) == val_y).double().mean(1)
    table[:, 1] = (test_logits.argmax(2) == test_y).double().mean(1)
    acc = {"val": (val_logits.mean(0).argmax(1) == val_y).double().mean().item(),
           "test": (test_logits.mean(0).argmax(1) == test_y).double().mean().item()}
    members = table[:, 1].tolist()
    best = int(torch.argmax(table[:, 0]).item())   # chosen on validation accuracy
    results = {"k": k, "seed": cfg.train.seed, "members": members, "members_val": table[:, 0].tolist(),
               "best_member": members[best], "best_member_index": best, "ensemble": acc["test"],
               "ensemble_val": acc["val"]}
    world.print0(f"members test accuracy {[round(a, 4) for a in members]}, ensemble {acc['test']:.4f}")
    if cfg.output.diversity:
        results["diversity"] = diversity_stage(cfg, world, layout, spec, held, test_logits)
    return results


def diversity_stage(cfg, world, layout, spec, held, test_logits) -> dict:
    """Disagreement and near-duplicate units of the members; warns when NT would lose information."""
    template = lambda: build_member(spec, 0)  # noqa: E731
    members = gather_models(world, {i: m.cpu() for i, m in held.items()},
                            [layout.holder(i) for i in range(cfg.fusion.k)], template, root=0)
    summary = None
    if world.is_main:
        summary = diversity_summary([members[i] for i in range(cfg.fusion.k)], list(test_logits),
                                    cfg.output.duplicate_threshold)
        if summary["warning"]:
            print(f"ntdist: warning: {summary['warning']}", file=sys.stderr, flush=True)
    for model in held.values():
        model.to(world.device)
    return all_gather_records(world, [summary])[0]


def control_stage(cfg, world, layout, splits, spec, held, results, rundir, resume):
    """The best member fine-tuned for the same epochs as the fused model: a fair baseline."""
    if not cfg.finetune.control or cfg.finetune.epochs == 0:
        return None
    best = results["best_member_index"]
    model = copy.deepcopy(held[best]) if best in held else build_member(spec, 0)
    model = broadcast_model(world, model.cpu(), layout.holder(best))
    history = resumable_finetune(cfg, world, splits, spec, model, "best-member", 1000 * cfg.train.seed + 998,
                                 None, rundir, resume)
    return {"method": "best_member_extra_epochs", "member": best,
            "finetune": [r["test_accuracy"] for r in history], "finetune_val": [r["val_accuracy"] for r in history]}


def resumable_finetune(cfg, world, splits, spec, model, label, seed, teacher, rundir, resume) -> list:
    """Fine-tune `model` (state after every epoch), or load the finished result when resuming."""
    final = rundir.file("checkpoints", f"finetuned_{label}.safetensors")
    history = finished_history(final, cfg.finetune.epochs) if resume else None
    if history is not None:
        model.load_state_dict(load_model(final, expect_spec=spec)[0].state_dict())
    else:
        history = finetune(model, cfg.finetune, splits, world, cfg.data.batch_size, cfg.data.eval_batch_size,
                           seed, label, teacher, log=print_if(world.is_main), spec=spec,
                           state_path=rundir.file("checkpoints", f"finetune_{label}.state.safetensors"),
                           resume=resume)
        if world.is_main:
            save_checkpoint(final, model.cpu(), spec, info={"stage": "finetune", "method": label,
                                                            "epochs": cfg.finetune.epochs, "history": history})
            remove(rundir.file("checkpoints", f"finetune_{label}.state.safetensors"))
        world.barrier()
    for record in history:
        rundir.log(record)
    return history


def fuse_stage(cfg, world, layout, splits, spec, held, method):
    """Fuse the members with `method`; every rank ends with the same fused model."""
    fc = cfg.fusion
    holders = [layout.holder(i) for i in range(fc.k)]
    template = lambda: build_member(spec, 0)  # noqa: E731  (weights are overwritten on receipt)
    options = dict(importance=fc.importance, order=fc.order, width=fc.width, keep_ratio=fc.keep_ratio,
                   example_inputs=example_inputs(splits))
    world.barrier()
    start = time.perf_counter()
    cpu_held = {i: m.cpu() for i, m in held.items()}
    if method == "nt" and fc.schedule == "recursive":
        fused = tree_fuse(world, cpu_held, holders, template, **options)
    else:
        fused = gather_fuse(world, cpu_held, holders, template, method=method, schedule=fc.schedule, **options)
    seconds = time.perf_counter() - start
    if fc.bn_reestimate:
        reestimate_bn(fused, train_loader(splits.train, cfg.data.batch_size, cfg.train.seed), fc.bn_batches)
    for model in held.values():
        model.to(world.device)
    return fused, seconds


def finetune_stage(cfg, world, layout, splits, spec, held, fused, method, seconds, rundir, resume) -> dict:
    """Evaluate right after fusion, fine-tune (or distil), save the fused model; returns its results."""
    post = evaluate_splits(fused.to(world.device), splits, world, cfg.data.eval_batch_size)
    world.print0(f"{method}: right after fusion val {post['val']:.4f}, test {post['test']:.4f}")
    rundir.log({"stage": "fusion", "method": method, "epoch": 0, "val_accuracy": post["val"],
                "test_accuracy": post["test"], "fuse_seconds": seconds})
    teacher = None
    if cfg.finetune.distill:
        template = lambda: build_member(spec, 0)  # noqa: E731
        members = gather_models(world, {i: m.cpu() for i, m in held.items()},
                                [layout.holder(i) for i in range(cfg.fusion.k)], template, root=None)
        teacher = concat([members[i] for i in range(cfg.fusion.k)], example_inputs=example_inputs(splits))
    history = resumable_finetune(cfg, world, splits, spec, fused, method, 1000 * cfg.train.seed + 999, teacher,
                                 rundir, resume)
    return {"post_fusion": post["test"], "post_fusion_val": post["val"],
            "finetune": [r["test_accuracy"] for r in history], "finetune_val": [r["val_accuracy"] for r in history],
            "fuse_seconds": seconds,
            **({"sparsity": sparsity(held, fused, world, layout, cfg.fusion.k)} if method == "nt" else {})}


def sparsity(held, fused, world, layout, k) -> float:
    """1 - kept units / (k * member units) of the first hidden layer (the x-axis of the paper's Fig. 4)."""
    first = next(m for m in fused.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)))
    return 1.0 - first.weight.shape[0] / (k * _first_width(held, world, layout))


def _first_width(held, world, layout) -> float:
    width = torch.zeros(1, dtype=torch.float64)
    if 0 in held:
        width[0] = next(m for m in held[0].modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))).weight.shape[0]
    return world.reduce_sum(width).item()


def summary_table(results: dict, path: str) -> str:
    lines = [f"{'':14s}{'after fusion':>14s}{'after finetune':>16s}",
             f"{'best member':14s}{results['best_member'] * 100:13.2f}%{'':16s}",
             f"{'ensemble':14s}{results['ensemble'] * 100:13.2f}%{'':16s}"]
    if results.get("control"):
        lines.append(f"{'member+extra':14s}{'':14s}{results['control']['finetune'][-1] * 100:15.2f}%")
    for method, r in results["fusion"].items():
        last = f"{r['finetune'][-1] * 100:15.2f}%" if r["finetune"] else f"{'-':>16s}"
        lines.append(f"{method:14s}{r['post_fusion'] * 100:13.2f}%{last}")
    lines.append(f"results: {os.path.join(path, 'results.json')}")
    return "\n".join(lines)


def remove(path: str) -> None:
    """Delete a state file once the stage's final checkpoint has replaced it."""
    if os.path.exists(path):
        os.unlink(path)


def print_if(flag: bool):
    return (lambda *a, **k: print(*a, **k, flush=True)) if flag else (lambda *a, **k: None)
