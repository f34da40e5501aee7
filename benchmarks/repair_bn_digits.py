"""Repair with BatchNorm: keep the fused model's statistics, or re-estimate them (before or after)? Digits.

Trains k networks per seed (VGG11 at width 0.25 and ResNet18 at width 8, both with
BatchNorm, and the digits configs' LeNet without biases or BatchNorm, on the 8x8 digits, the seeded train/validation/test split; the best member is chosen on validation; SGD lr 0.05 momentum 0.9, batch 64; member i of seed
s uses seed 1000 s + i) and compares, right after fusion: plain NT, NT with BatchNorm
statistics re-estimated (`reestimate_bn`), NT + repair keeping the members' statistics
(the repair's default: it fits the pre-BatchNorm outputs at the kept channels, which those
statistics normalise exactly as in the concatenated model), and NT + repair followed by
re-estimation. The same for weight averaging and OT (weights mode): plain, BatchNorm
re-estimated, repaired with the averaged statistics (the repair's choice: each layer before a
BatchNorm is fitted to the members' averaged BatchNorm outputs taken back through the fused
BatchNorm), re-estimated before the repair, and after it. It prints test accuracy and the mean
squared difference of the logits to the ensemble's (the concatenated model's output), and the
paired difference NT + repair − NT over the seeds. A model without BatchNorm has no re-estimated
rows. Repair and re-estimation use the same `--calibration` training inputs. Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repair_bn_digits.py [--seeds 3] [--epochs 15]
"""

import argparse
import copy
import statistics

import torch

from ntdist.data import DataConfig, load_splits
from ntdist.fusion import analyze, average, reestimate_bn
from ntdist.fusion.baselines import batch_norms
from ntdist.fusion.ot import aligned_members
from ntdist.fusion.pruning.select import select, targets
from ntdist.fusion.repair import repair
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.models import build_model
from ntdist.records.stats import paired
from tiny_training import sgd, train

SPECS = {"vgg11": {"in_channels": 1, "image_size": 8, "num_classes": 10, "width": 0.25},
         "resnet18": {"in_channels": 1, "image_size": 8, "num_classes": 10, "width": 8},
         "lenet": {"in_channels": 1, "image_size": 8, "num_classes": 10, "bias": False}}


def tensors(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs]), torch.as_tensor(ys)


def contestants(members, x_cal, batch):
    """Every fused variant of `members`, by name."""
    plan = analyze(members[0], x_cal[:2])
    weights = [1.0 / len(members)] * len(members)
    keep = select(members, plan, "group_l2", targets(plan, plan.space_sizes(tensors_of(members[0])), 1.0), weights)
    nt = assemble(members, plan, weights, keep)
    repaired = repair(members, plan, weights, keep, assemble(members, plan, weights, keep), x_cal)
    batches = x_cal.split(batch)
    out = {"NT": nt, "NT + repair": repaired}
    if batch_norms(nt):
        out["NT + BN re-estimated"] = reestimate_bn(copy.deepcopy(nt), batches, len(batches))
        out["NT + repair + BN re-estimated"] = reestimate_bn(copy.deepcopy(repaired), batches, len(batches))
    for method in ("avg", "ot"):      # the repair after averaging and OT (keep None: the aligned members' average)
        aligned = members if method == "avg" else aligned_members(members, plan)
        fused = average(aligned, weights)
        out[method] = fused
        out[f"{method} + repair"] = repair(aligned, plan, weights, None, copy.deepcopy(fused), x_cal)
        if batch_norms(nt):
            out[f"{method} + BN re-estimated"] = reestimate_bn(copy.deepcopy(fused), batches, len(batches))
            out[f"{method} + BN re-estimated, then repair"] = repair(
                aligned, plan, weights, None, copy.deepcopy(out[f"{method} + BN re-estimated"]), x_cal)
            out[f"{method} + repair + BN re-estimated"] = reestimate_bn(
                copy.deepcopy(out[f"{method} + repair"]), batches, len(batches))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=1000)
    ap.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = load_splits(DataConfig(name="digits"))
    x_train, y_train = tensors(splits.train)
    x_val, y_val = tensors(splits.val)
    x_test, y_test = tensors(splits.test)
    for name in args.models:
        results = {}
        for seed in range(args.seeds):
            members = []
            for i in range(args.k):
                torch.manual_seed(1000 * seed + i)
                members.append(train(build_model(name, SPECS[name]), x_train, y_train, args.epochs, 1000 * seed + i,
                                     sgd(0.05)))
            pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:args.calibration]
            with torch.no_grad():
                logits = [m(x_test) for m in members]
                ensemble = torch.stack(logits).mean(0)
                best = max(range(args.k), key=lambda i: (members[i](x_val).argmax(1) == y_val).float().mean().item())
                row = {"best member": logits[best], "ensemble": ensemble}
                row.update({n: m.eval()(x_test) for n, m in contestants(members, x_train[pick], 100).items()})
            for n, out in row.items():
                acc = (out.argmax(1) == y_test).float().mean().item()
                results.setdefault(n, []).append((acc, (out - ensemble).pow(2).mean().item()))
            print(f"{name} seed {seed}: " + ", ".join(f"{n} {100 * v[-1][0]:.1f}" for n, v in results.items()),
                  flush=True)
        print(f"\n{name}, k={args.k}, {args.epochs} epochs, {args.seeds} seeds, {args.calibration} calibration inputs\n")
        print("| contestant | test % | logit MSE to the ensemble |\n|---|---|---|")
        for n, values in results.items():
            acc, mse = [v[0] for v in values], [v[1] for v in values]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            print(f"| {n} | {100 * statistics.mean(acc):.1f} ± {100 * sd:.1f} | {statistics.mean(mse):.3g} |")
        d = paired([100 * v[0] for v in results["NT + repair"]], [100 * v[0] for v in results["NT"]])
        p = "n/a" if d["p"] is None else f"{d['p']:.2g}"
        print(f"\nNT + repair − NT, test: {d['mean']:+.1f} ± {d['std']:.1f} points, paired t-test p = {p}, "
              f"{d['wins']}/{d['n']} seeds ahead")
        print(flush=True)


if __name__ == "__main__":
    main()
