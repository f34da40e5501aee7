"""Does refitting NT's pruned model to the concatenated model (fusion/repair) keep the ensemble? MNIST-1D.

For each seed, trains k members exactly as `ntdist run` would for the paper configs
(configs/paper/compare_mlp_mnist1d.yaml: MLP 40-64-64-64-10; compare_cnn1d_mnist1d.yaml:
the 1-D CNN; member i of seed s is built and shuffled with seed 1000 s + i, SGD as
configured, ntdist's own training loop), then fuses them by plain NT (`fuse`, flat) and
by NT followed by `repair` on `--calibration` training inputs (a seeded sample), and
prints test accuracy right after fusion: best member (chosen on validation), output
ensemble, NT, NT+repair, with paired differences over seeds (mean ± sample std,
two-sided paired t-test, wins/losses). `--ridges` repairs with several ridges and
prints their validation accuracy too (the ridge is chosen on validation, never test).
Run with one thread:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repair_mnist1d.py [--seeds 10] [--models mlp cnn1d]
        [--calibration 2000] [--ridges 1e-3] [--epochs N] [--out rows.json]
"""

import argparse
import json
import os
import statistics
import time

import torch
from scipy import stats

from ntdist.config import load_config
from ntdist.data import load_splits
from ntdist.fusion import analyze, fuse
from ntdist.fusion.pruning.importance import DEFAULT_IMPORTANCE
from ntdist.fusion.pruning.select import select, targets
from ntdist.fusion.repair import RIDGE, repair
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.models import ModelSpec
from ntdist.models.weights import build_member
from ntdist.records.stats import paired
from ntdist.training.batches import eval_batches, train_batches
from ntdist.training.config import member_seed
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.loop import labels_of, predict, train_epoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"mlp": "configs/paper/compare_mlp_mnist1d.yaml", "cnn1d": "configs/paper/compare_cnn1d_mnist1d.yaml"}


def train_members(cfg, spec, splits):
    """The k members of `cfg.train.seed`, trained one after another as the member stage trains them."""
    members = []
    for i in range(cfg.fusion.k):
        seed = member_seed(cfg.train, i)
        model = build_member(spec, seed)
        torch.manual_seed(seed)
        optimizer, loader = make_optimizer(model, cfg.train), train_batches(splits.train, cfg.data.batch_size, seed)
        scheduler = make_scheduler(optimizer, cfg.train)
        for epoch in range(1, cfg.train.epochs + 1):
            loader.set_epoch(epoch)
            train_epoch(model, loader, optimizer, "cpu", progress=False)
            scheduler.step()
        members.append(model.eval())
    return members


def accuracy(logits, labels) -> float:
    return (logits.argmax(1) == labels).double().mean().item()


def scored_members(cfg, spec, splits):
    """One seed's members, `score(model)` -> {"val": accuracy, "test": accuracy}, the row of the best member (on
    validation) and the ensemble, and the training inputs: what every contestant of these benchmarks starts from."""
    members = train_members(cfg, spec, splits)
    sets = {"val": eval_batches(splits.val, 512), "test": eval_batches(splits.test, 512)}
    labels = {s: labels_of(b) for s, b in sets.items()}

    def score(model):
        return {s: accuracy(predict(model, b, "cpu"), labels[s]) for s, b in sets.items()}

    logits = {s: [predict(m, b, "cpu") for m in members] for s, b in sets.items()}
    best = max(range(len(members)), key=lambda i: accuracy(logits["val"][i], labels["val"]))
    row = {"best member": {s: accuracy(logits[s][best], labels[s]) for s in sets},
           "ensemble": {s: accuracy(torch.stack(logits[s]).mean(0), labels[s]) for s in sets}}
    x_train = torch.stack([torch.as_tensor(splits.train[i][0]) for i in range(len(splits.train))])
    return members, score, row, x_train


def each_seed(args, one_seed, overrides=()):
    """For every model in `args.models` and seed below `args.seeds`: `one_seed(cfg, spec, splits, args)` (a row
    of {"val", "test", ...} per contestant), printed and written to `args.out` as it goes; yields (name, config,
    rows) once a model's seeds are done."""
    everything = {}
    for name in args.models:
        cfg = load_config(os.path.join(ROOT, CONFIGS[name]), list(overrides), extra_keys=("seeds", "sweep"))
        splits = load_splits(cfg.data)
        spec = ModelSpec.for_data(cfg.model, splits.in_shape, splits.num_classes)
        rows = everything[name] = []
        for seed in range(args.seeds):
            cfg.train.seed = seed
            rows.append(one_seed(cfg, spec, splits, args))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(everything, f, indent=1)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {100 * v['test']:.1f}" for k, v in rows[-1].items()),
                  flush=True)
        yield name, cfg, rows


def one_seed(cfg, spec, splits, args):
    """Validation and test accuracies of every contestant for the members of one seed."""
    members, score, row, x_train = scored_members(cfg, spec, splits)
    plan = analyze(members[0], x_train[:2])
    weights = [1.0 / len(members)] * len(members)
    want = targets(plan, plan.space_sizes(tensors_of(members[0])), 1.0)
    keep = select(members, plan, DEFAULT_IMPORTANCE, want, weights)
    plain = fuse(members, method="nt", schedule="flat", example_inputs=x_train[:2])
    mine = assemble(members, plan, weights, keep)
    assert all(torch.equal(t, mine.state_dict()[n]) for n, t in plain.state_dict().items()), "NT differs"
    row["NT"] = score(plain)
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.train.seed))
    calibration = x_train[pick[:args.calibration]]
    for ridge in args.ridges:
        start = time.perf_counter()
        notes = []
        repaired = repair(members, plan, weights, keep, assemble(members, plan, weights, keep), calibration,
                          ridge=ridge, notes=notes)
        row[f"NT+repair {ridge:g}"] = {**score(repaired), "seconds": time.perf_counter() - start}
        assert not notes, notes
    return row


def pct(values) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def compare(rows, a, b) -> str:
    x, y = [r[a]["test"] for r in rows], [r[b]["test"] for r in rows]
    p = paired(x, y)
    t = stats.ttest_rel(x, y).pvalue if len(x) > 1 and p["std"] > 0 else float("nan")
    return (f"| {a} − {b} | {100 * p['mean']:+.1f} ± {100 * p['std']:.1f} | {t:.2g} | "
            f"{p['wins']}/{p['losses']} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--calibration", type=int, default=2000)
    ap.add_argument("--ridges", type=float, nargs="+", default=[RIDGE])
    ap.add_argument("--epochs", type=int, default=None, help="member epochs (default: the config's)")
    ap.add_argument("--out", default=None, help="also write every seed's accuracies to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = [] if args.epochs is None else [f"train.epochs={args.epochs}"]
    for name, cfg, rows in each_seed(args, one_seed, overrides):
        chosen = f"NT+repair {args.ridges[0]:g}"
        print(f"\n{name} ({CONFIGS[name]}), k={cfg.fusion.k}, {cfg.train.epochs} member epochs, {args.seeds} seeds, "
              f"{args.calibration} calibration inputs; test accuracy right after fusion (validation in brackets)\n")
        print("| contestant | test % | val % |\n|---|---|---|")
        for key in rows[0]:
            extra = (f" (repair {statistics.mean(r[key]['seconds'] for r in rows):.2f} s)"
                     if "seconds" in rows[0][key] else "")
            print(f"| {key}{extra} | {pct([r[key]['test'] for r in rows])} | {pct([r[key]['val'] for r in rows])} |")
        print("\n| paired difference (test, points) | mean ± std | paired t-test p | wins/losses |\n|---|---|---|---|")
        for other in ("NT", "best member", "ensemble"):
            print(compare(rows, chosen, other))
        print(flush=True)


if __name__ == "__main__":
    main()
