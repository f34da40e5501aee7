"""Does the repair help averaging and OT as it helps NT? MNIST-1D, one-shot, paired over seeds.

For each seed, trains k members exactly as benchmarks/repair_mnist1d.py does (the member stage's
seeds and loop; configs/paper/compare_mlp_mnist1d.yaml and compare_cnn1d_mnist1d.yaml), and prints
test accuracy right after fusion (validation in brackets) of: the best member (chosen on
validation), the output ensemble, weight averaging with and without repair, OT (weights mode,
exact transport) with and without repair, OT in activations mode with and without repair (256
training inputs compare the units, as `fusion.dedup_samples` in `ntdist run`), and NT + repair;
every repair is `fuse(..., repair="lstsq", calibration=x)` on `--calibration` training inputs
drawn with the seed (the default ridge). Then paired differences over seeds (mean ± sample std,
two-sided paired t-test, seeds ahead/behind). Run with one thread:
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/repair_baselines.py [--seeds 10]
        [--models mlp cnn1d] [--calibration 2000] [--samples 256] [--epochs N] [--out rows.json]
"""

import argparse
import time

import torch

from benchmarks.repair_mnist1d import CONFIGS, compare, each_seed, pct, scored_members
from ntdist.fusion import fuse

# name -> fuse() keywords, the calibration and activation inputs added per seed
FUSIONS = {"avg": dict(method="avg"), "OT weights": dict(method="ot"),
           "OT activations": dict(method="ot", ot_mode="activations"), "NT": dict(method="nt")}
PAIRS = [("avg + repair", "avg"), ("OT weights + repair", "OT weights"),
         ("OT activations + repair", "OT activations"), ("avg + repair", "NT + repair"),
         ("OT weights + repair", "NT + repair"), ("OT activations + repair", "NT + repair"),
         ("avg + repair", "best member"), ("OT weights + repair", "best member"),
         ("OT activations + repair", "best member"), ("NT + repair", "best member")]


def one_seed(cfg, spec, splits, args):
    """Validation and test accuracies of every contestant for the members of one seed."""
    members, score, row, x_train = scored_members(cfg, spec, splits)
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.train.seed))
    calibration, examples = x_train[pick[:args.calibration]], x_train[pick[:args.samples]]
    for name, how in FUSIONS.items():
        for repair in ("none", "lstsq"):
            if name == "NT" and repair == "none":
                continue          # plain NT: benchmarks/repair_mnist1d.py
            start = time.perf_counter()
            notes = []
            fused = fuse(members, schedule="flat", example_inputs=examples, repair=repair, notes=notes,
                         calibration=calibration if repair == "lstsq" else None, **how)
            assert not notes, notes
            key = name + (" + repair" if repair == "lstsq" else "")
            row[key] = {**score(fused), "seconds": time.perf_counter() - start}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--calibration", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=None, help="member epochs (default: the config's)")
    ap.add_argument("--out", default=None, help="also write every seed's accuracies to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = [] if args.epochs is None else [f"train.epochs={args.epochs}"]
    for name, cfg, rows in each_seed(args, one_seed, overrides):
        print(f"\n{name} ({CONFIGS[name]}), k={cfg.fusion.k}, {args.seeds} seeds, {args.calibration} calibration "
              f"inputs; test accuracy right after fusion (validation in brackets)\n")
        print("| contestant | test % | val % | seconds to fuse |\n|---|---|---|---|")
        for key in rows[0]:
            seconds = (f"{sum(r[key]['seconds'] for r in rows) / len(rows):.2f}" if "seconds" in rows[0][key]
                       else "")
            print(f"| {key} | {pct([r[key]['test'] for r in rows])} | {pct([r[key]['val'] for r in rows])} | "
                  f"{seconds} |")
        print("\n| paired difference (test, points) | mean ± std | paired t-test p | wins/losses |\n|---|---|---|---|")
        for a, b in PAIRS:
            print(compare(rows, a, b))
        print(flush=True)


if __name__ == "__main__":
    main()
