"""`ntdist bench train`: samples/s of ntdist's member training against a tight loop measured in the same run.

For each workload (model, data, batch size) and k members on one rank, three timings of the same
epochs, interleaved so that every side sees the same background load:

- `floor`: the tightest plain PyTorch loop over preloaded tensors (k models one after another,
  same model, SGD, batch and steps; no evaluation, no state files);
- `ntdist`: ntdist's member training as `ntdist run` calls it (`train.vectorize=auto`), including its
  per-epoch validation and state files;
- `one by one`: the same with `train.vectorize=off`;
- `epoch loop`: ntdist's epoch function alone (`train_epoch` over its resident batches, the k models one
  after another): the same work as the floor, without validation and state files;
- `DataLoader`: `one by one` with the data kept off the device (`data.resident_max_mb=0`), the loop ntdist
  had before its data became tensor-resident (which also synced with the host at every step: this side
  is, if anything, faster than that old loop).

Every side runs with member training's TF32 setting (`train.tf32`, on by default; it matters on a GPU
only) and first trains one epoch untimed (the process's one-off warm-up). Figures are medians of
`repeats`; the ratios are the floor's seconds over the other side's (above 1: faster than the floor),
`ntdist / one by one` is what training the k members at once gains, and `ntdist / DataLoader` what it
gains over a DataLoader loop. Each row carries the
machine's 1-minute load average when it was taken: on a shared machine, compare rows of similar load.
The training's own log lines are held back: each case prints one progress line, the end a compact table
(the CSV holds every column) and where the CSV went. `QUICK` measures fewer cases with the same code.
"""

import contextlib
import io
import os
import statistics
import tempfile
import time
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from ntdist.commands.bench import check_out_csv, progress, write_csv, wrote
from ntdist.config import load_config
from ntdist.distributed.devices import synchronize
from ntdist.distributed.world import World
from ntdist.errors import UserError
from ntdist.training.batches import feed, resident, train_batches
from ntdist.training.hardware import tf32
from ntdist.training.optim import make_optimizer
from ntdist.training.loop import train_epoch
from ntdist.models.weights import build_member
from ntdist.stages.members import train_members
from ntdist.training.config import member_seed

KS, BATCHES, EPOCHS, REPEATS = (1, 2, 8), (32, 256), 3, 3           # `ntdist bench train`: about 10 minutes
QUICK = {"workloads": ("mlp-digits",), "ks": (1, 2), "batches": (256,), "epochs": 1, "repeats": 1}   # seconds
TABLE = ("workload", "batch", "k", "floor samples/s", "ntdist samples/s", "ntdist / floor", "ntdist / one by one",
         "load average")   # the columns printed at the end

WORKLOADS = {   # name -> config overrides
    "mlp-digits": ["data.name=digits", "model.name=mlp", "model.kwargs.width=32"],
    "mlp-mnist1d": ["data.name=mnist1d", "model.name=mlp", "model.kwargs.width=32"],
    "lenet-synthetic32": ["data.name=synthetic", "data.synthetic_shape=[3,32,32]", "data.synthetic_samples=2048",
                          "model.name=lenet"],
}


def _tight_loop(r, k: int, epochs: int) -> None:
    """k models trained one after another by the plainest loop over preloaded tensors, with the TF32 setting
    that ntdist's member training uses (`train.tf32`), so that every side computes alike on a GPU."""
    with tf32(r.cfg.train.tf32, r.world.device):
        _tight_epochs(r, k, epochs)
    synchronize(r.world.device)


def _tight_epochs(r, k: int, epochs: int) -> None:
    x, y = resident(r.splits.train, r.world.device, 1e9)
    batch = r.cfg.data.batch_size
    for i in range(k):
        model = build_member(r.spec, member_seed(r.cfg.train, i), r.initial).to(r.world.device).train()
        optimizer = make_optimizer(model, r.cfg.train)
        g = torch.Generator().manual_seed(i)
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g).to(y.device)
            for start in range(0, len(y), batch):
                take = order[start:start + batch]
                loss = F.cross_entropy(model(x[take]), y[take])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def _epoch_loop(r, k: int, epochs: int) -> None:
    """ntdist's `train_epoch` over its tensor-resident batches, k models one after another (no validation,
    no state files): what separates ntdist's epoch from the floor's. TF32 as in `_tight_loop`."""
    loader = train_batches(r.splits.train, r.cfg.data.batch_size, r.cfg.train.seed, **feed(r.cfg.data, r.world.device))
    with tf32(r.cfg.train.tf32, r.world.device):
        for i in range(k):
            model = build_member(r.spec, member_seed(r.cfg.train, i), r.initial).to(r.world.device)
            optimizer = make_optimizer(model, r.cfg.train)
            for epoch in range(1, epochs + 1):
                loader.set_epoch(epoch)
                train_epoch(model, loader, optimizer, r.world.device, progress=False)
    synchronize(r.world.device)


def _make_run(workload: str, k: int, batch: int, epochs: int, vectorize: str, out: str, extra=()):
    from ntdist.stages.context import make_run

    cfg = load_config(None, WORKLOADS[workload] + [f"fusion.k={max(k, 2)}", f"data.batch_size={batch}",
                                                  f"train.epochs={epochs}", f"train.vectorize={vectorize}",
                                                  "train.schedule=none", f"output.dir={out}", *extra])
    run = make_run(cfg, World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    run.rundir.prepare(resume=False, overwrite=True)
    return run


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_train(workloads: Sequence[str] = tuple(WORKLOADS), ks: Sequence[int] = KS,
                batches: Sequence[int] = BATCHES, epochs: int = EPOCHS, repeats: int = REPEATS,
                out_csv: str = "bench_train.csv") -> List[Dict]:
    """Run every combination, print the table, write `out_csv`; returns the rows."""
    for name in workloads:
        if name not in WORKLOADS:
            raise UserError(f"unknown workload '{name}'; choose from {list(WORKLOADS)}")
    if epochs < 1 or repeats < 1 or min(ks) < 1 or min(batches) < 1:
        raise UserError(f"--epochs, --repeats, every --ks and every --batches value must be at least 1; got "
                        f"epochs {epochs}, repeats {repeats}, ks {list(ks)}, batches {list(batches)}")
    check_out_csv(out_csv)
    rows = []
    total = len(workloads) * len(batches) * len(ks)
    with tempfile.TemporaryDirectory() as tmp:
        for name in workloads:
            for batch in batches:
                for k in ks:
                    with contextlib.redirect_stdout(io.StringIO()):   # the members' epoch lines
                        rows.append(_case(name, batch, k, epochs, repeats, tmp))
                    row = rows[-1]
                    progress(len(rows), total, f"{name} batch {batch} k {k}: floor {row['floor samples/s']} "
                                               f"samples/s, ntdist {row['ntdist samples/s']} "
                                               f"({row['ntdist / floor']}x)")
    write_csv(out_csv, rows, list(rows[0]))
    print(table(rows))
    wrote(out_csv)
    return rows


def table(rows: List[Dict]) -> str:
    """The rows' TABLE columns as aligned text."""
    widths = [max(len(col), *(len(str(r[col])) for r in rows)) for col in TABLE]
    lines = ["  ".join(col.rjust(w) for col, w in zip(TABLE, widths))]
    lines += ["  ".join(str(r[col]).rjust(w) for col, w in zip(TABLE, widths)) for r in rows]
    return "\n".join(lines)


def _case(name: str, batch: int, k: int, epochs: int, repeats: int, tmp: str) -> Dict:
    """One row: every side's samples/s and the ratios, for `k` members of workload `name` at `batch`."""
    runs = {v: _make_run(name, k, batch, epochs, v, f"{tmp}/{name}-{batch}-{k}-{v}")
            for v in ("auto", "off")}
    runs["loader"] = _make_run(name, k, batch, epochs, "off", f"{tmp}/{name}-{batch}-{k}-loader",
                               ["data.resident_max_mb=0"])
    sides = {"floor": lambda e: _tight_loop(runs["off"], k, e),
             "epoch loop": lambda e: _epoch_loop(runs["off"], k, e),
             "ntdist": lambda e: train_members(_epochs(runs["auto"], e), list(range(k)), {}),
             "one by one": lambda e: train_members(_epochs(runs["off"], e), list(range(k)), {}),
             "DataLoader": lambda e: train_members(_epochs(runs["loader"], e), list(range(k)), {})}
    for side in sides.values():
        side(1)   # warm-up
    times = {s: [] for s in sides}
    for _ in range(repeats):
        for s, side in sides.items():
            times[s].append(_seconds(lambda: side(epochs)))
    samples = k * len(runs["off"].splits.train) * epochs
    row = {"workload": name, "batch": batch, "k": k}
    for s in sides:
        row[f"{s} samples/s"] = round(samples / statistics.median(times[s]))
    for s in ("epoch loop", "ntdist", "one by one", "DataLoader"):
        row[f"{s} / floor"] = round(row[f"{s} samples/s"] / row["floor samples/s"], 2)
    for s in ("one by one", "DataLoader"):
        row[f"ntdist / {s}"] = round(row["ntdist samples/s"] / row[f"{s} samples/s"], 2)
    row["load average"] = round(os.getloadavg()[0], 2)
    return row


def _epochs(r, epochs: int):
    """The same run with `epochs` training epochs (state files of an earlier call are not resumed)."""
    import dataclasses

    return dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, train=dataclasses.replace(r.cfg.train, epochs=epochs)))
