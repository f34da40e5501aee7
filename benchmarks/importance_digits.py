"""Which NT importance fuses best? Accuracy right after fusion on sklearn digits, several seeds.

Trains `k` width-`width` MLPs per seed with different initialisations and data
orders, fuses them with every importance in IMPORTANCES (and both orders), and
prints mean accuracy right after fusion and after a short fine-tuning, next to
vanilla averaging, OT and the mean member. Run:
    .venv/bin/python benchmarks/importance_digits.py [--seeds 10] [--k 2] [--width 32]
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ntdist.fusion import IMPORTANCES, fuse
from ntdist.models import build_model


def digits(seed=0):
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return as_t(xtr, torch.float32), as_t(ytr, torch.long), as_t(xte, torch.float32), as_t(yte, torch.long)


def train(model, x, y, epochs, seed, lr=0.05, batch=32):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return (model.eval()(x).argmax(1) == y).float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--finetune", type=int, default=3)
    args = ap.parse_args()
    xtr, ytr, xte, yte = digits()
    spec = {"input_dim": 64, "width": args.width, "depth": args.depth}
    variants = [(f"nt/{imp}/{order}", dict(method="nt", importance=imp, order=order))
                for imp in IMPORTANCES for order in ("merge_prune", "prune_merge")]
    variants += [("avg", dict(method="avg")), ("ot", dict(method="ot"))]
    post = {name: [] for name, _ in variants}
    tuned = {name: [] for name, _ in variants}
    members = []
    for seed in range(args.seeds):
        models = []
        for m in range(args.k):
            torch.manual_seed(1000 * seed + m)
            models.append(train(build_model("mlp", spec), xtr, ytr, args.epochs, 1000 * seed + m))
        members.append(statistics.mean(accuracy(m, xte, yte) for m in models))
        for name, kw in variants:
            fused = fuse(models, **kw)
            post[name].append(accuracy(fused, xte, yte))
            tuned[name].append(accuracy(train(fused, xtr, ytr, args.finetune, seed, lr=0.01), xte, yte))
    print(f"k={args.k} width={args.width} depth={args.depth} seeds={args.seeds}: "
          f"mean member {100 * statistics.mean(members):.1f}%")
    print(f"{'variant':28s} {'after fusion':>14s} {'after ' + str(args.finetune) + ' epochs':>16s}")
    for name, _ in variants:
        print(f"{name:28s} {100 * statistics.mean(post[name]):8.1f} ±{100 * statistics.pstdev(post[name]):4.1f}"
              f" {100 * statistics.mean(tuned[name]):10.1f} ±{100 * statistics.pstdev(tuned[name]):4.1f}")


if __name__ == "__main__":
    main()
