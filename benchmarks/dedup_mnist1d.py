"""Does NT with duplicate merging (fusion.dedup) help on diverse members? MNIST-1D, several seeds.

Trains `k` MLPs 40-W-W-10 per seed (the demo's architecture; member i of seed s
uses seed 1000 * s + i, SGD with momentum 0.9), fuses them by plain NT and by NT
with dedup at each threshold and criterion (the activation criterion compares
the units' outputs on the first 256 training inputs), and prints test accuracy
right after fusion and after a short fine-tuning (lr 0.01), with the units merged
per layer. Members are trained once per seed and shared by every variant. Run:
    .venv/bin/python benchmarks/dedup_mnist1d.py [--seeds 5] [--thresholds 0.9 0.95 0.99 0.999]
        [--criteria weights activations] [--overflow drop]
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from ntdist.data import DataConfig, load_splits
from ntdist.fusion import NTOptions, fuse
from ntdist.fusion.dedup.activations import CRITERIA
from ntdist.fusion.dedup.choice import OVERFLOWS
from ntdist.records.stats import paired
from ntdist.models import build_model
from tiny_training import accuracy, sgd, train


def tensors(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs]), torch.as_tensor(ys)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--finetune", type=int, default=3)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.99, 0.999])
    ap.add_argument("--criteria", nargs="+", default=[NTOptions.default("dedup_criterion")], choices=CRITERIA)
    ap.add_argument("--overflow", default=NTOptions.default("dedup_overflow"), choices=OVERFLOWS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = load_splits(DataConfig(name="mnist1d"))
    xtr, ytr = tensors(splits.train)
    xte, yte = tensors(splits.test)
    spec = {"input_dim": xtr[0].numel(), "width": args.width, "depth": 2, "num_classes": splits.num_classes}
    variants = [("nt", {})] + [(f"dedup {c} {t:g}", {"dedup": True, "dedup_threshold": t, "dedup_criterion": c,
                                                   "dedup_overflow": args.overflow, "example_inputs": xtr[:256]})
                               for c in args.criteria for t in args.thresholds]
    rows = {name: {"fused": [], "tuned": [], "merged": []} for name, _ in variants}
    members_acc, ensemble_acc = [], []
    for seed in range(args.seeds):
        members = []
        for i in range(args.k):
            torch.manual_seed(1000 * seed + i)
            members.append(train(build_model("mlp", spec), xtr, ytr, args.epochs, 1000 * seed + i, sgd(0.05), batch=32))
        members_acc.append(statistics.mean(accuracy(m, xte, yte) for m in members))
        with torch.no_grad():
            ensemble_acc.append((sum(F.softmax(m(xte), 1) for m in members).argmax(1) == yte).float().mean().item())
        for name, extra in variants:
            merged = {}
            fused = fuse(members, method="nt", schedule="flat", merged=merged, **extra)
            rows[name]["fused"].append(accuracy(fused, xte, yte))
            tuned = train(fused, xtr, ytr, args.finetune, 7 + seed, sgd(0.01), batch=32)
            rows[name]["tuned"].append(accuracy(tuned, xte, yte))
            rows[name]["merged"].append(sum(merged.values()))
        print(f"seed {seed}: " + ", ".join(f"{n} {100 * r['fused'][-1]:.1f}/{100 * r['tuned'][-1]:.1f}"
                                          for n, r in rows.items()), flush=True)

    def pct(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"
    print(f"\nk={args.k}, 40-{args.width}-{args.width}-10, {args.epochs} epochs, {args.seeds} seeds; "
          f"member {pct(members_acc)}, ensemble {pct(ensemble_acc)}")
    def versus_nt(values, key):
        p = paired(values, rows["nt"][key])
        return f"{100 * p['mean']:+.1f} ± {100 * p['std']:.1f} ({p['wins']}/{p['losses']})"
    print("| variant | after fusion | − plain NT (wins/losses) | after fine-tuning | − plain NT (wins/losses) "
          "| units merged (all layers) |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {pct(r['fused'])} | {versus_nt(r['fused'], 'fused')} | {pct(r['tuned'])} | "
              f"{versus_nt(r['tuned'], 'tuned')} | {statistics.mean(r['merged']):.1f} |")


if __name__ == "__main__":
    main()
