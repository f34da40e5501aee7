"""Periodic-sync SGD (experimental): k replicas train and are merged every `sync.every` steps or epochs.

`sync.methods` compares, in one run:
- `none`: replica 0 trained alone (the single-replica baseline);
- `avg`: the replicas are averaged (local SGD);
- `nt`: the replicas are fused by NT-recursive through the same tree of collectives as `ntdist run`.
After a sync every replica continues from the merged weights with its own optimizer state,
seed and data order. The paper reports that NT as the sync step fails: once the replicas
have been merged they are near-identical, so every later fusion keeps duplicate copies of the
strongest units and throws away the rest, and accuracy collapses while averaging trains well.
"""

import time
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from ntdist.dist.comm import all_gather_records
from ntdist.dist.layout import MemberLayout
from ntdist.dist.tree import gather_fuse, tree_fuse
from ntdist.dist.world import World, gather_world_info
from ntdist.errors import UserError
from ntdist.members import build_member, member_seed
from ntdist.options import opt
from ntdist.train import check_finite, eval_loader, evaluate, make_optimizer, make_scheduler, train_loader

SYNC_METHODS = ["none", "avg", "nt"]


@dataclass
class SyncConfig:
    """Periodic-sync SGD: `mode: sync` trains fusion.k replicas and merges them periodically."""

    methods: List[str] = opt(["none", "avg", "nt"], "what to compare: none (one replica alone) | avg | nt")
    every: int = opt(1, "merge every this many units")
    unit: str = opt("epoch", "epoch | step")


def run_sync(cfg, world: World, splits, spec, rundir, example_inputs) -> dict:
    """Train with each sync method in turn; returns the results dict."""
    started = time.time()
    if world.size > cfg.fusion.k:
        raise UserError(f"sync mode runs at most one replica per rank: {world.size} ranks for fusion.k="
                        f"{cfg.fusion.k} replicas; use at most {cfg.fusion.k} ranks or raise fusion.k")
    layout = MemberLayout(cfg.fusion.k, world.size)
    results = {"mode": "sync", "k": cfg.fusion.k, "seed": cfg.train.seed, "world": gather_world_info(world),
               "sync": {}}
    for method in cfg.sync.methods:
        history = train_synced(cfg, world, layout, splits, spec, method, example_inputs)
        for record in history:
            rundir.log(record)
        results["sync"][method] = {"test": [r["test_accuracy"] for r in history],
                                   "val": [r["val_accuracy"] for r in history],
                                   "final": history[-1]["test_accuracy"] if history else None}
        world.print0(f"sync {method}: final test accuracy {results['sync'][method]['final']:.4f}")
    results["wall_seconds"] = time.time() - started
    rows = [f"{m:6s} {r['final'] * 100:6.2f}%" for m, r in results["sync"].items() if r["final"] is not None]
    world.print0("sync method, final test accuracy:\n" + "\n".join(rows))
    return results


def train_synced(cfg, world, layout, splits, spec, method: str, example_inputs) -> List[dict]:
    """One periodic-sync training run; every rank steps its replicas in lockstep with the others."""
    mine = layout.held_by(world.rank) if method != "none" else ([0] if world.rank == 0 else [])
    replicas = {i: build_member(spec, member_seed(cfg.train, i)).to(world.device) for i in mine}
    optimizers = {i: make_optimizer(m, cfg.train) for i, m in replicas.items()}
    schedulers = {i: make_scheduler(o, cfg.train, cfg.train.epochs) for i, o in optimizers.items()}
    loaders = {i: train_loader(splits.train, cfg.data.batch_size, member_seed(cfg.train, i)) for i in mine}
    every, steps, history = max(1, cfg.sync.every), 0, []
    for epoch in range(1, cfg.train.epochs + 1):
        iters = {i: iter(_epoch(loader, epoch)) for i, loader in loaders.items()}
        losses = []
        for batches in zip(*iters.values()):   # every replica has the same number of steps per epoch
            for i, (x, y) in zip(iters, batches):
                losses.append(_step(replicas[i], optimizers[i], x, y, world.device))
            steps += 1
            if method != "none" and cfg.sync.unit == "step" and steps % every == 0:
                _merge(world, layout, replicas, spec, method, example_inputs)
        for scheduler in schedulers.values():
            scheduler.step()
        if method != "none" and cfg.sync.unit == "epoch" and epoch % every == 0:
            _merge(world, layout, replicas, spec, method, example_inputs)
        loss = sum(losses) / max(len(losses), 1)
        check_finite(loss, f"sync training ({method})", epoch)
        history.append(_evaluate(world, replicas.get(0), splits, cfg, method, epoch, loss))
    return history


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return loader


def _step(model, optimizer, x, y, device) -> float:
    model.train()
    loss = F.cross_entropy(model(x.to(device)), y.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _merge(world, layout, replicas: Dict[int, torch.nn.Module], spec, method, example_inputs) -> None:
    """Replace every replica's weights by the merged model, in place (optimizer state is kept)."""
    holders = [layout.holder(i) for i in range(layout.num_members)]
    template = lambda: build_member(spec, 0)  # noqa: E731
    held = {i: m.cpu() for i, m in replicas.items()}
    if method == "nt":
        merged = tree_fuse(world, held, holders, template, example_inputs=example_inputs)
    else:
        merged = gather_fuse(world, held, holders, template, method="avg", schedule="flat")
    with torch.no_grad():
        for model in replicas.values():
            model.load_state_dict(merged.state_dict())
            model.to(world.device)


def _evaluate(world, model, splits, cfg, method, epoch, loss) -> dict:
    """Accuracy of replica 0 (all replicas are equal right after a merge), shared with every rank."""
    record = None
    if model is not None:
        val = evaluate(model, eval_loader(splits.val, cfg.data.eval_batch_size), world.device)["accuracy"]
        test = evaluate(model, eval_loader(splits.test, cfg.data.eval_batch_size), world.device)["accuracy"]
        record = {"stage": "sync", "method": method, "epoch": epoch, "loss": loss,
                  "val_accuracy": val, "test_accuracy": test}
        world.print0(f"sync {method} epoch {epoch}: loss {loss:.4f}, val {val:.4f}, test {test:.4f}")
    return [r for r in all_gather_records(world, [record]) if r is not None][0]
