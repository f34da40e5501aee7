"""OT's modes against each other on MNIST-1D: weights vs activations, exact vs Sinkhorn transport.

For each seed, trains k members exactly as benchmarks/repair_mnist1d.py does (the member stage's seeds
and loop, configs/paper/compare_mlp_mnist1d.yaml and compare_cnn1d_mnist1d.yaml), fuses them with OT in
every mode and regularisation asked for, and prints test accuracy right after fusion (validation in
brackets) with paired differences of each variant against OT's weights mode with exact transport (the
default), over seeds. The activations mode compares units on `--samples` training inputs drawn with the
seed (`fusion.dedup_samples` in `ntdist run`: 256). Run with one thread:
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/ot_modes_mnist1d.py [--seeds 10]
        [--models mlp cnn1d] [--regs 0 0.01 0.05] [--samples 256] [--out rows.json]
"""

import argparse

import torch

from benchmarks.repair_mnist1d import CONFIGS, compare, each_seed, pct, scored_members
from ntdist.fusion import fuse
from ntdist.fusion.ot import OT_MODES

DEFAULT = "OT weights, exact"


def name_of(mode: str, reg: float) -> str:
    return f"OT {mode}, " + ("exact" if reg == 0 else f"Sinkhorn {reg:g}")


def one_seed(cfg, spec, splits, args):
    members, score, row, _ = scored_members(cfg, spec, splits)
    pick = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(cfg.train.seed))
    x = torch.stack([torch.as_tensor(splits.train[i][0]) for i in pick[:args.samples].tolist()])
    for mode in OT_MODES:
        for reg in args.regs:
            fused = fuse(members, method="ot", schedule="flat", example_inputs=x, ot_mode=mode, ot_reg=reg)
            row[name_of(mode, reg)] = score(fused)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--regs", type=float, nargs="+", default=[0.0, 0.01, 0.05])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--out", default=None, help="also write every seed's accuracies to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, cfg, rows in each_seed(args, one_seed):
        print(f"\n{name} ({CONFIGS[name]}), k={cfg.fusion.k}, {args.seeds} seeds, {args.samples} inputs for the "
              "activations; test accuracy right after fusion (validation in brackets)\n")
        print("| contestant | test % | val % |\n|---|---|---|")
        for key in rows[0]:
            print(f"| {key} | {pct([r[key]['test'] for r in rows])} | {pct([r[key]['val'] for r in rows])} |")
        print("\n| paired difference (test, points) | mean ± std | paired t-test p | wins/losses |\n|---|---|---|---|")
        for key in rows[0]:
            if key.startswith("OT") and key != DEFAULT:
                print(compare(rows, key, DEFAULT))
        print(flush=True)


if __name__ == "__main__":
    main()
