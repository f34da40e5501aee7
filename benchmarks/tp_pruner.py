"""NT with each pruner (`ntdist` against `torch_pruning`, the authors' pipeline): cost and accuracy.

cost: two untrained MLPs 3072 -> W -> W -> 10 without bias (the `ntdist bench fusion`
setting), k = 2, flat NT to the members' width. For every width, one warm-up call of
each pruner, then `repeats` rounds that time one call of each in alternation (so load
on the shared machine hits both alike), the median per pruner, and the peak extra RSS
of one further call (`ntdist.commands.bench.peak_extra_memory`, a lower bound). The
example input is one sample: Torch-Pruning runs the wide model once to trace it, and
a larger batch would only add forward time that is not pruning.

accuracy: for each seed, k = 2 members trained as in `importance.py`, fused by flat NT
with each pruner (importance group_l2, the one Torch-Pruning's group magnitude equals),
test accuracy right after fusion and after 3 fine-tuning epochs (the same data order
for both); the pruners' differences pair up by seed (`ntdist.records.stats.paired`).
Run (one thread, as in docs/PERFORMANCE.md):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tp_pruner.py cost --widths 512 1024 2048 4096
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tp_pruner.py accuracy --data digits --width 32 --depth 2 \
        --epochs 20 --lr 0.05
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tp_pruner.py accuracy --data mnist1d --width 64 --depth 3
"""

import argparse
import statistics
import time

import torch

from ntdist.commands.bench import MIB, peak_extra_memory
from ntdist.data import DataConfig, load_splits
from ntdist.fusion import fuse
from ntdist.models import build_model, complete_kwargs
from ntdist.records.stats import mean_std, paired
from tiny_training import accuracy, sgd, train

PRUNERS = ("ntdist", "torch_pruning")


def cost(widths, repeats):
    x = torch.randn(1, 3, 32, 32)
    print(f"torch threads: {torch.get_num_threads()}; k=2, MLP 3072-W-W-10, median of {repeats}")
    print(f"{'W':>5} {'pruner':>14} {'median s':>9} {'peak extra MiB':>15} {'x models':>9} {'same weights':>13}")
    for width in widths:
        torch.manual_seed(0)
        models = [build_model("mlp", {"input_dim": 3072, "width": width, "depth": 2, "bias": False})
                  for _ in range(2)]
        model_mib = sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values()) / MIB
        calls = {p: (lambda p=p: fuse(models, schedule="flat", example_inputs=x, pruner=p)) for p in PRUNERS}
        outs = {p: calls[p]().state_dict() for p in PRUNERS}        # warm-up, and the weights to compare
        same = all(torch.equal(outs["ntdist"][n], outs["torch_pruning"][n]) for n in outs["ntdist"])
        del outs
        times = {p: [] for p in PRUNERS}
        for _ in range(repeats):
            for p in PRUNERS:
                start = time.perf_counter()
                out = calls[p]()
                times[p].append(time.perf_counter() - start)
                del out
        for p in PRUNERS:
            extra = peak_extra_memory(calls[p]) / MIB
            print(f"{width:>5} {p:>14} {statistics.median(times[p]):>9.4f} {extra:>15.1f} "
                  f"{extra / model_mib:>9.2f} {str(same):>13}   (models {model_mib:.1f} MiB)", flush=True)


def tensors(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


def accuracy_run(args):
    start = time.perf_counter()
    splits = load_splits(DataConfig(name=args.data, val_fraction=0.125))
    (xtr, ytr), (xte, yte) = tensors(splits.train), tensors(splits.test)
    kwargs = complete_kwargs("mlp", {"width": args.width, "depth": args.depth}, tuple(xtr.shape[1:]), 10)
    post = {p: [] for p in PRUNERS}
    tuned = {p: [] for p in PRUNERS}
    members, identical = [], 0
    for seed in range(args.seeds):
        models = []
        for m in range(2):
            torch.manual_seed(1000 * seed + m)
            models.append(train(build_model("mlp", kwargs), xtr, ytr, args.epochs, 1000 * seed + m, sgd(args.lr)))
        members.append(max(accuracy(m, xte, yte) for m in models))
        fused = {p: fuse(models, schedule="flat", example_inputs=xtr[:8], pruner=p) for p in PRUNERS}
        a, b = (fused[p].state_dict() for p in PRUNERS)
        identical += all(torch.equal(a[n], b[n]) for n in a)
        for p in PRUNERS:
            post[p].append(accuracy(fused[p], xte, yte))
            tuned[p].append(accuracy(train(fused[p], xtr, ytr, args.finetune, 999 + seed, sgd(0.01)), xte, yte))
    pct = lambda v: "{:.1f} ± {:.1f}".format(*(100 * s for s in mean_std(v)))  # noqa: E731
    print(f"{args.data} mlp {kwargs} k=2 seeds={args.seeds} member epochs={args.epochs} lr={args.lr}: best member "
          f"{pct(members)}; fused weights identical on {identical}/{args.seeds} seeds; "
          f"{time.perf_counter() - start:.0f} s")
    for p in PRUNERS:
        print(f"{p:14s} after fusion {pct(post[p])}, after {args.finetune} epochs {pct(tuned[p])}")
    for name, values in (("after fusion", post), (f"after {args.finetune} epochs", tuned)):
        d = paired(values["torch_pruning"], values["ntdist"])
        print(f"torch_pruning - ntdist {name}: {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} points, "
              f"p = {d['p']}, ahead {d['wins']}, behind {d['losses']}, tied {d['ties']} of {d['n']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    c.add_argument("--repeats", type=int, default=5)
    a = sub.add_parser("accuracy")
    a.add_argument("--data", default="mnist1d", choices=["digits", "mnist1d"])
    a.add_argument("--width", type=int, default=64)
    a.add_argument("--depth", type=int, default=3)
    a.add_argument("--seeds", type=int, default=5)
    a.add_argument("--epochs", type=int, default=60, help="member epochs")
    a.add_argument("--lr", type=float, default=0.01, help="member learning rate")
    a.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs after fusion")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.what == "cost":
        cost(args.widths, args.repeats)
    else:
        accuracy_run(args)


if __name__ == "__main__":
    main()
