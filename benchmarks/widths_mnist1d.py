"""Members of different widths fused into one: MLPs of widths 32, 64 and 128 on MNIST-1D, fused to 64.

For each seed, trains three MLPs (depth 3, widths `--widths`) as compare_mlp_mnist1d.yaml trains its
members (SGD lr 0.01, momentum 0.9, batch 64, 60 epochs, the member stage's loop; member i of seed s seeded
1000 s + i), fuses them with NT to `--width` (plain, and repaired on 2000 training inputs drawn with the seed)
and with OT (which returns the first member's width), and fine-tunes the repaired NT model for the config's
10 epochs. Against: every member, their output ensemble, the best member (on validation) and the member of the
target width, each fine-tuned for the same 10 epochs (controls). Prints test accuracy (mean ± std over seeds)
and paired differences (two-sided paired t-test). Run with one thread:
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/widths_mnist1d.py [--seeds 10] [--out rows.json]
"""

import argparse
import copy
import json
import os

import torch

from benchmarks.repair_mnist1d import ROOT, accuracy, compare, pct
from ntdist.config import load_config
from ntdist.data import load_splits
from ntdist.fusion import fuse
from ntdist.models import ModelSpec
from ntdist.models.weights import build_member
from ntdist.training.batches import eval_batches, train_batches
from ntdist.training.config import member_seed
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.loop import labels_of, predict, train_epoch

CONFIG = "configs/paper/compare_mlp_mnist1d.yaml"


def train(model, cfg_section, splits, batch_size, seed):
    """`model` trained for `cfg_section.epochs` epochs (the member stage's loop and data order for `seed`)."""
    torch.manual_seed(seed)
    optimizer, loader = make_optimizer(model, cfg_section), train_batches(splits.train, batch_size, seed)
    scheduler = make_scheduler(optimizer, cfg_section)
    for epoch in range(1, cfg_section.epochs + 1):
        loader.set_epoch(epoch)
        train_epoch(model.train(), loader, optimizer, "cpu", progress=False)
        scheduler.step()
    return model.eval()


def one_seed(cfg, splits, args):
    sets = {"val": eval_batches(splits.val, 512), "test": eval_batches(splits.test, 512)}
    labels = {s: labels_of(b) for s, b in sets.items()}

    def score(model):
        return {s: accuracy(predict(model, b, "cpu"), labels[s]) for s, b in sets.items()}

    members = []
    for i, width in enumerate(args.widths):
        spec = ModelSpec.for_data(cfg.model, splits.in_shape, splits.num_classes)
        spec = ModelSpec(spec.name, dict(spec.kwargs, width=width), spec.input_shape)
        seed = member_seed(cfg.train, i)
        members.append(train(build_member(spec, seed), cfg.train, splits, cfg.data.batch_size, seed))
    row = {f"member {w}": score(m) for w, m in zip(args.widths, members)}
    logits = {s: [predict(m, b, "cpu") for m in members] for s, b in sets.items()}
    row["ensemble"] = {s: accuracy(torch.stack(logits[s]).mean(0), labels[s]) for s in sets}
    best = max(range(len(members)), key=lambda i: row[f"member {args.widths[i]}"]["val"])
    row["best member"] = row[f"member {args.widths[best]}"]
    pick = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(cfg.train.seed))
    x = torch.stack([torch.as_tensor(splits.train[i][0]) for i in pick[:2000].tolist()])
    plain = fuse(members, method="nt", example_inputs=x[:2], width=args.width, repair="none")
    repaired = fuse(members, method="nt", example_inputs=x[:2], width=args.width, calibration=x)
    row["NT"], row["NT + repair"] = score(plain), score(repaired)
    row["OT (first member's width)"] = score(fuse(members, method="ot", example_inputs=x[:2]))
    seed = member_seed(cfg.train, 10_000)
    row["NT + repair + ft"] = score(train(repaired, cfg.finetune, splits, cfg.data.batch_size, seed))
    row["control: best member + ft"] = score(train(copy.deepcopy(members[best]), cfg.finetune, splits,
                                                   cfg.data.batch_size, seed))
    same = args.widths.index(args.width) if args.width in args.widths else best
    row[f"control: member {args.widths[same]} + ft"] = score(train(copy.deepcopy(members[same]), cfg.finetune,
                                                                   splits, cfg.data.batch_size, seed))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--width", type=int, default=64, help="the fused model's width")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(os.path.join(ROOT, CONFIG), [], extra_keys=("seeds", "sweep"))
    splits = load_splits(cfg.data)
    rows = []
    for seed in range(args.seeds):
        cfg.train.seed = seed
        rows.append(one_seed(cfg, splits, args))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v['test']:.1f}" for k, v in rows[-1].items()), flush=True)
    print(f"\nMLP members of widths {args.widths} fused to width {args.width} ({CONFIG} settings), {args.seeds} "
          "seeds; test accuracy (validation in brackets)\n")
    print("| contestant | test % | val % |\n|---|---|---|")
    for key in rows[0]:
        print(f"| {key} | {pct([r[key]['test'] for r in rows])} | {pct([r[key]['val'] for r in rows])} |")
    print("\n| paired difference (test, points) | mean ± std | paired t-test p | wins/losses |\n|---|---|---|---|")
    for a, b in (("NT + repair", "NT"), ("NT + repair", "best member"), ("NT + repair", "ensemble"),
                 ("NT + repair + ft", "control: best member + ft"),
                 ("NT + repair + ft", f"control: member {args.width} + ft"), ("ensemble", "control: best member + ft")):
        if a in rows[0] and b in rows[0]:
            print(compare(rows, a, b))


if __name__ == "__main__":
    main()
