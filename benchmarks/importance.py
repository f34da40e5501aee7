"""Which NT importance fuses best? l2, group_l2 and l1 on the same members, with paired statistics.

For each seed, trains k members (different initialisation and data order; plain SGD, momentum
0.9, batch 64) on the training split of `ntdist.data` (validation held out, as `ntdist run`
does), fuses them by NT (flat, merge_prune) with every importance in IMPORTANCES, and measures
test accuracy right after fusion and after a short fine-tuning (lr 0.01, the same data order for
every importance). Every importance fuses the same members, so the differences pair up by seed:
the script prints mean ± std per importance and each importance minus l2 (paired t-test).
Run, e.g. (each a few minutes on 2 CPU cores):
    .venv/bin/python benchmarks/importance.py --data mnist1d --model mlp --width 64 --depth 3 --seeds 10
    .venv/bin/python benchmarks/importance.py --data digits --model lenet --epochs 30 --seeds 10
"""

import argparse
import time

import torch

from ntdist.data import DataConfig, load_splits
from ntdist.fusion import IMPORTANCES, fuse
from ntdist.models import build_model, complete_kwargs
from ntdist.records.stats import mean_std, paired
from tiny_training import accuracy, sgd, train


def tensors(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist1d", choices=["digits", "mnist1d"])
    ap.add_argument("--model", default="mlp", help="mlp | cnn1d | lenet")
    ap.add_argument("--width", type=int, default=64, help="mlp only")
    ap.add_argument("--depth", type=int, default=3, help="mlp only")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=60, help="member epochs")
    ap.add_argument("--lr", type=float, default=0.01, help="member learning rate")
    ap.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs after fusion")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    splits = load_splits(DataConfig(name=args.data, val_fraction=0.125))
    (xtr, ytr), (xte, yte) = tensors(splits.train), tensors(splits.test)
    kwargs = {"width": args.width, "depth": args.depth} if args.model == "mlp" else {}
    kwargs = complete_kwargs(args.model, kwargs, tuple(xtr.shape[1:]), 10)
    post = {imp: [] for imp in IMPORTANCES}
    tuned = {imp: [] for imp in IMPORTANCES}
    members = []
    for seed in range(args.seeds):
        models = []
        for m in range(args.k):
            torch.manual_seed(1000 * seed + m)
            models.append(train(build_model(args.model, kwargs), xtr, ytr, args.epochs, 1000 * seed + m, sgd(args.lr)))
        members.append(max(accuracy(m, xte, yte) for m in models))
        for imp in IMPORTANCES:
            fused = fuse(models, method="nt", schedule="flat", importance=imp, example_inputs=xtr[:8])
            post[imp].append(accuracy(fused, xte, yte))
            tuned[imp].append(accuracy(train(fused, xtr, ytr, args.finetune, 999 + seed, sgd(0.01)), xte, yte))
    pct = lambda v: "{:.1f} ± {:.1f}".format(*(100 * s for s in mean_std(v)))  # noqa: E731
    print(f"{args.data} {args.model} {kwargs} k={args.k} seeds={args.seeds} member epochs={args.epochs}: "
          f"best member (test) {pct(members)}; {time.perf_counter() - start:.0f} s")
    for imp in IMPORTANCES:
        line = f"{imp:9s} after fusion {pct(post[imp])}, after {args.finetune} epochs {pct(tuned[imp])}"
        if imp != "l2":
            for name, values in (("fusion", post), ("finetune", tuned)):
                d = paired(values[imp], values["l2"])
                p = "—" if d["p"] is None else f"{d['p']:.3f}"
                line += (f"; {name} - l2 {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} (p = {p}, "
                         f"{d['wins']}/{d['n']} ahead)")
        print(line)


if __name__ == "__main__":
    main()
