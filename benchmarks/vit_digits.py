"""NT on a transformer: tiny torchvision ViTs trained on sklearn digits, fused, fine-tuned, 5 seeds.

Each seed trains `k` VisionTransformers (image 8x8, patch 2, so 16 patch tokens
and a class token; the 1-channel digits repeated to the 3 channels the class
expects) from different initialisations and data orders, then compares on the
seeded 20 % test split: the members, their output ensemble, NT (merge+prune,
l2), NT repaired on the training inputs (`nt+repair`: every layer refitted to the
members' concatenation, the attention included; `nt+repair-attn`: the same with
every MultiheadAttention left as NT pruned it, what the attention's refit adds),
weight averaging and OT, each
right after fusion and during `--finetune` epochs of further training (after the
last one, and the best one), and the control: the best member trained for the
same extra epochs. Run:
    .venv/bin/python benchmarks/vit_digits.py [--seeds 5] [--k 2] [--epochs 40] [--finetune 3] [--hidden 32]
and it prints one line per quantity (mean ± population std over seeds, in %), then
nt+repair minus NT, nt+repair-attn and the control, paired over seeds (mean ±
sample std, t-test p-value, seeds ahead), and each method's accuracy per seed.
"""

import argparse
import copy
import statistics
import time
from unittest import mock

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.models import VisionTransformer

from ntdist.fusion import Ensemble, fuse
from ntdist.fusion.repair import refit
from ntdist.records.stats import paired
from tiny_training import accuracy as fraction_correct
from tiny_training import adam, train

METHODS = ("nt", "nt+repair", "nt+repair-attn", "avg", "ot")
CONFIG = dict(image_size=8, patch_size=2, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10)


def digits(seed=0):
    """Digits scaled to [0, 1] as [N, 3, 8, 8] images (the gray channel repeated), seeded 80/20 split."""
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    image = lambda a: torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8).expand(-1, 3, -1, -1)  # noqa: E731
    return image(xtr), torch.tensor(ytr), image(xte), torch.tensor(yte)


def fused(models, name, xtr, notes):
    """The models fused by `name` (METHODS); the repaired ones on every training input."""
    if name == "nt+repair-attn":
        with mock.patch.object(refit._Fit, "refit_attention", lambda fit, layer: None):
            return fuse(models, method="nt", example_inputs=xtr[:2], calibration=xtr)
    method, calibration = ("nt", xtr) if name == "nt+repair" else (name, None)
    return fuse(models, method=method, example_inputs=xtr[:2], calibration=calibration, notes=notes)


def accuracy(model, x, y):
    return 100.0 * fraction_correct(model, x, y)


def curve(model, x, y, xte, yte, epochs, seed, lr):
    """Accuracy right after fusion, then after each fine-tuning epoch."""
    accs = [accuracy(model, xte, yte)]
    train(model, x, y, epochs, seed, adam(lr), each=lambda m: accs.append(accuracy(m, xte, yte)))
    return accs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--finetune", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--hidden", type=int, default=32, help="hidden_dim (mlp_dim is twice that)")
    args = ap.parse_args()
    CONFIG.update(hidden_dim=args.hidden, mlp_dim=2 * args.hidden)
    torch.set_num_threads(1)      # two threads on the loaded 2-core machine stalled (43 s an epoch, not 0.5 s)
    xtr, ytr, xte, yte = digits()
    rows = {name: [] for name in ("member", "best member", "ensemble")}
    curves = {name: [] for name in (*METHODS, "control")}
    notes = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        models = []
        for m in range(args.k):
            torch.manual_seed(1000 * seed + m)
            models.append(train(VisionTransformer(**CONFIG), xtr, ytr, args.epochs, 1000 * seed + m, adam(args.lr)))
        accs = [accuracy(m, xte, yte) for m in models]
        rows["member"].append(statistics.mean(accs))
        rows["best member"].append(max(accs))
        rows["ensemble"].append(accuracy(Ensemble(models), xte, yte))
        for name in METHODS:
            model = fused(models, name, xtr, notes)
            curves[name].append(curve(model, xtr, ytr, xte, yte, args.finetune, seed, args.finetune_lr))
        best = copy.deepcopy(models[max(range(args.k), key=lambda i: accs[i])])
        curves["control"].append(curve(best, xtr, ytr, xte, yte, args.finetune, seed, args.finetune_lr))
    fmt = lambda v: f"{statistics.mean(v):5.1f} ± {statistics.pstdev(v):3.1f}"  # noqa: E731
    print(f"ViT {CONFIG}, k={args.k}, {args.seeds} seeds, {args.epochs} epochs (lr {args.lr}), "
          f"fine-tuning {args.finetune} epochs (lr {args.finetune_lr}), {time.perf_counter() - start:.0f} s")
    for name, vals in rows.items():
        print(f"{name:14s} {fmt(vals)}")
    print(f"{'method':14s} {'after fusion':>14s} {'after ' + str(args.finetune) + ' epochs':>16s} {'best':>14s}")
    for name, cs in curves.items():
        print(f"{name:14s} {fmt([c[0] for c in cs]):>14s} {fmt([c[-1] for c in cs]):>16s} "
              f"{fmt([max(c[1:]) for c in cs]):>14s}")
    for other in ("nt", "nt+repair-attn", "control"):
        for label, at in (("after fusion", 0), (f"after {args.finetune} epochs", -1)):
            d = paired([c[at] for c in curves["nt+repair"]], [c[at] for c in curves[other]])
            p = "—" if d["p"] is None else f"{d['p']:.3g}"
            print(f"nt+repair - {other} {label}: {d['mean']:+.1f} ± {d['std']:.1f} (p = {p}, "
                  f"{d['wins']}/{d['n']} ahead)")
    print("repair notes:", sorted(set(notes)) or "none")
    for name, cs in curves.items():       # what paired comparisons across runs of this script read
        print(f"per seed {name}: after fusion {[round(c[0], 2) for c in cs]}, "
              f"after {args.finetune} epochs {[round(c[-1], 2) for c in cs]}")


if __name__ == "__main__":
    main()
