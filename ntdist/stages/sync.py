"""Periodic-sync SGD (experimental): k replicas train and are merged every `sync.every` steps or epochs.

`sync.methods` compares, in one run:
- `none`: replica 0 trained alone (the single-replica baseline);
- `avg`: the replicas are averaged (local SGD);
- `nt`: the replicas are fused by NT-recursive through the same tree of collectives as `ntdist run`.
After a sync every replica continues from the merged weights with its own optimizer state,
seed and data order. The paper reports that NT as the sync step fails: once the replicas
have been merged they are near-identical, so every later fusion keeps duplicate copies of the
strongest units and throws away the rest, and accuracy collapses while averaging trains well.
With `fusion.dedup: on`, NT merges a replica's unit into its near-copy in another replica
(outgoing weights added) instead of keeping both, so the slots go to units that differ.
"""

from typing import Dict, List

import torch
import torch.nn.functional as F

from ntdist.distributed.comm import all_gather_records, sum_counts
from ntdist.distributed.tree import fusion_device, reduce_average, tree_fuse
from ntdist.distributed.world import gather_world_info
from ntdist.errors import Preempted, UserError
from ntdist.models.weights import build_member
from ntdist.preempt import preempt_requested
from ntdist.records.results import SyncMethodResult, SyncResults
from ntdist.training.batches import eval_batches, feed, train_batches
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.loop import check_finite, evaluate
from ntdist.stages.context import Run
from ntdist.training.config import member_seed


PREEMPT_CHECK = 10   # steps between the ranks' checks for SIGTERM


def sync_stage(r: Run) -> SyncResults:
    """Train with each sync method in turn; returns the results."""
    cfg, world = r.cfg, r.world
    if world.size > cfg.fusion.k:
        raise UserError(f"sync mode runs at most one replica per rank: {world.size} ranks for fusion.k="
                        f"{cfg.fusion.k} replicas; use at most {cfg.fusion.k} ranks or raise fusion.k")
    results = SyncResults(k=cfg.fusion.k, seed=cfg.train.seed, world=gather_world_info(world))
    for method in cfg.sync.methods:
        merged = {}
        history = train_synced(r, method, merged)
        for record in history:
            r.rundir.log(record)
        dedup = method == "nt" and cfg.fusion.dedup
        results.sync[method] = SyncMethodResult(test=[h["test_accuracy"] for h in history],
                                                val=[h["val_accuracy"] for h in history],
                                                final=history[-1]["test_accuracy"] if history else None,
                                                merged=sum_counts(world, merged) if dedup else None)
        world.print0(f"sync {method}: final test accuracy {results.sync[method].final:.4f}")
    rows = [f"{m:6s} {s.final * 100:6.2f}%" for m, s in results.sync.items() if s.final is not None]
    world.print0("sync method, final test accuracy:\n" + "\n".join(rows))
    return results


def train_synced(r: Run, method: str, merged: Dict[str, int]) -> List[dict]:
    """One periodic-sync training run; every rank steps its replicas in lockstep with the others.

    `merged` receives the units NT dedup merged on this rank, per layer, summed over the syncs.
    """
    cfg, world = r.cfg, r.world
    mine = r.layout.held_by(world.rank) if method != "none" else ([0] if world.rank == 0 else [])
    replicas = {i: build_member(r.spec, member_seed(cfg.train, i), r.initial, cfg.model.reinit).to(world.device)
                for i in mine}
    optimizers = {i: make_optimizer(m, cfg.train) for i, m in replicas.items()}
    schedulers = {i: make_scheduler(o, cfg.train) for i, o in optimizers.items()}
    loaders = {i: train_batches(r.splits.train, cfg.data.batch_size, member_seed(cfg.train, i),
                                **feed(cfg.data, world.device)) for i in mine}
    every, steps, history = cfg.sync.every, 0, []
    for epoch in range(1, cfg.train.epochs + 1):
        iters = {i: iter(_epoch(loader, epoch)) for i, loader in loaders.items()}
        losses = []   # on the device: the host reads them once per epoch
        for batches in zip(*iters.values()):   # every replica has the same number of steps per epoch
            for i, (x, y) in zip(iters, batches):
                losses.append(_step(replicas[i], optimizers[i], x, y, world.device))
            steps += 1
            # every rank asks at the same steps and stops together; on several ranks every PREEMPT_CHECK steps,
            # so the question costs one small all-reduce per PREEMPT_CHECK steps, not one per step
            if steps % (1 if world.size == 1 else PREEMPT_CHECK) == 0 and world.any(preempt_requested()):
                raise Preempted(f"sync mode ({method}) stopped at step {steps} of epoch {epoch} on SIGTERM; it "
                                "keeps no state, so a rerun (or --resume) starts the sync runs over")
            if method != "none" and cfg.sync.unit == "step" and steps % every == 0:
                _merge(r, replicas, method, merged)
        for scheduler in schedulers.values():
            scheduler.step()
        if method != "none" and cfg.sync.unit == "epoch" and epoch % every == 0:
            _merge(r, replicas, method, merged)
        values = torch.stack(losses).tolist() if losses else []
        loss = sum(values) / max(len(values), 1)
        check_finite(loss, f"sync training ({method})", epoch)
        history.append(_evaluate(r, replicas.get(0), method, epoch, loss))
    return history


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return loader


def _step(model, optimizer, x, y, device) -> torch.Tensor:
    model.train()
    loss = F.cross_entropy(model(x.to(device)), y.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _merge(r: Run, replicas: Dict[int, torch.nn.Module], method: str, counts: Dict[str, int]) -> None:
    """Replace every replica's weights by the merged model, in place (optimizer state is kept)."""
    device = fusion_device(r.world)   # the training device, except under gloo on a GPU: the CPU
    held = {i: m.to(device) for i, m in replicas.items()}
    if method == "nt":      # with fusion.dedup, near-identical replicas' units are merged, not kept twice
        merged = tree_fuse(r.world, held, r.layout.holders, r.template, r.cfg.fusion.nt_options(),
                           example_inputs=r.example_inputs().to(device), merged=counts)
    else:
        merged = reduce_average(r.world, held, r.layout.holders, r.template)
    with torch.no_grad():
        for model in replicas.values():
            model.load_state_dict(merged.state_dict())
            model.to(r.world.device)


def _evaluate(r: Run, model, method: str, epoch: int, loss: float) -> dict:
    """Accuracy of replica 0 (all replicas are equal right after a merge), shared with every rank."""
    record, world = None, r.world
    if model is not None:
        batch, data = r.cfg.data.eval_batch_size, feed(r.cfg.data, world.device)
        val = evaluate(model, eval_batches(r.splits.val, batch, **data), world.device)["accuracy"]
        test = evaluate(model, eval_batches(r.splits.test, batch, **data), world.device)["accuracy"]
        record = {"stage": "sync", "method": method, "epoch": epoch, "loss": loss,
                  "val_accuracy": val, "test_accuracy": test}
        world.print0(f"sync {method} epoch {epoch}: loss {loss:.4f}, val {val:.4f}, test {test:.4f}")
    world.wait_for(f"the epoch of sync method {method}")   # with method none, rank 0 trains alone
    return [h for h in all_gather_records(world, [record]) if h is not None][0]
