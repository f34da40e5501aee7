"""Which fine-tuning recipe keeps the gain of NT + repair over the equally trained best member? MNIST-1D.

For each seed, trains k members as `ntdist run` does for the paper configs
(benchmarks/repair_mnist1d.py's member loop; cached per seed under `--cache`, so reruns skip
it), fuses them by NT + repair (`fuse(..., repair="lstsq")` on `fusion.calibration_samples`
training inputs drawn as the run draws them), and fine-tunes both the fused model and the
control (the best member on validation) with every recipe of the grid, the way
`stages/finetune.finetune` does on one process: the config's optimiser, `make_scheduler`,
the fused / control seeds of `ntdist run`, and for distillation the ensemble of the members
as teacher with the config's temperature and soft weight.

The grid: loss plain | distill; LR constant 0.01 | 0.003 | 0.001 (one run of the longest budget, read
after epochs 1, 3 and 10) and cosine from 0.01 | 0.003 (one run per budget, the schedule
spans it); `--budgets`, `--lrs`, `--cosine-lrs` and `--cosine-budgets` change it (`recipe_table.py`
holds the grid and the report). Every seed's accuracies go to
`--out` (JSON) as they come, and a rerun continues from there. The tables: test accuracy of
fused and control (mean ± std over seeds), the paired fused − control (mean ± std, two-sided
paired t-test p, seeds ahead) and the halfway mark mean(ensemble − control) / 2; the recipe is
chosen on validation accuracy. `--losses`, `--temperature` and `--soft-weight` narrow the grid
and change the distillation (both the fused model's and the control's); `--select lstsq` keeps
NT's units by least squares instead of magnitude (`lstsq_select.py`). Run:
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/finetune_recipes.py [--models mlp cnn1d]
        [--seeds 10] [--budgets 1 3 10] [--lrs 0.01 0.003 0.001] [--cosine-lrs 0.01 0.003]
        [--cosine-budgets 1 3 10] [--losses plain distill] [--temperature T] [--soft-weight W]
        [--select magnitude|lstsq] [--cache DIR] [--out rows.json] [--table-only]
"""

import argparse
import copy
import dataclasses
import json
import os

import torch

from ntdist.config import load_config
from ntdist.data import load_splits
from ntdist.fusion import Ensemble, fuse
from ntdist.models import ModelSpec
from ntdist.stages.finetune import distill_loss_fn
from ntdist.training.batches import eval_batches, train_batches
from ntdist.training.config import CONTROL_SEED, FUSED_SEED, run_seed
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.loop import labels_of, predict, train_epoch
from recipe_table import LOSSES, Grid, recipes, table
from lstsq_select import repaired
from repair_mnist1d import CONFIGS, ROOT, train_members



def members_of(cfg, spec, splits, cache: str, name: str):
    """The k members of `cfg.train.seed`, trained once and then read from `cache`."""
    path = os.path.join(cache, f"{name}_seed{cfg.train.seed}.pt")
    if os.path.exists(path):
        members = []
        for state in torch.load(path):
            model = spec.build()
            model.load_state_dict(state)
            members.append(model.eval())
        return members
    members = train_members(cfg, spec, splits)
    os.makedirs(cache, exist_ok=True)
    torch.save([m.state_dict() for m in members], path + ".part")
    os.replace(path + ".part", path)
    return members


class Scorer:
    """Validation and test accuracy of a model, on batches built once."""

    def __init__(self, splits):
        self.sets = {"val": eval_batches(splits.val, 512), "test": eval_batches(splits.test, 512)}
        self.labels = {s: labels_of(b) for s, b in self.sets.items()}

    def of_logits(self, logits) -> dict:
        return {s: (logits[s].argmax(1) == self.labels[s]).double().mean().item() for s in self.sets}

    def __call__(self, model) -> dict:
        with torch.no_grad():
            return self.of_logits({s: predict(model, b, "cpu") for s, b in self.sets.items()})


def curve(model, cfg, splits, seed, teacher, recipe, score) -> list:
    """Fine-tune `model` in place with `recipe` = (schedule, lr, epochs); the accuracies after each epoch."""
    schedule, lr, epochs = recipe
    ft = dataclasses.replace(cfg.finetune, lr=lr, schedule=schedule, epochs=epochs)
    optimizer = make_optimizer(model, ft)
    scheduler = make_scheduler(optimizer, ft)
    torch.manual_seed(seed)
    loader = train_batches(splits.train, cfg.data.batch_size, seed)
    loss_fn = distill_loss_fn(teacher, ft) if teacher is not None else None
    out = []
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        train_epoch(model, loader, optimizer, "cpu", loss_fn, progress=False)
        scheduler.step()
        out.append(score(model))
    return out


def setup(name: str, overrides):
    """The paper config of `name` with `overrides`, its model spec and its data splits."""
    cfg = load_config(os.path.join(ROOT, CONFIGS[name]), list(overrides), extra_keys=("seeds", "sweep"))
    splits = load_splits(cfg.data)
    return cfg, ModelSpec.for_data(cfg.model, splits.in_shape, splits.num_classes), splits


def calibration_of(cfg, splits) -> torch.Tensor:
    """`fusion.calibration_samples` training inputs, drawn as `ntdist run` draws them for `cfg.train.seed`."""
    train = splits.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.train.seed))
    return torch.stack([train[i][0] for i in sorted(order[:cfg.fusion.calibration_samples].tolist())])


def one_seed(cfg, spec, splits, args, name: str) -> dict:
    """Members, ensemble, one-shot NT + repair, and every recipe's fused and control curves for one seed."""
    members = members_of(cfg, spec, splits, args.cache, name)
    score = Scorer(splits)
    logits = [{s: predict(m, b, "cpu") for s, b in score.sets.items()} for m in members]
    per_member = [score.of_logits(lg) for lg in logits]
    best = max(range(len(members)), key=lambda i: per_member[i]["val"])
    row = {"best member": per_member[best], "best": best,
           "ensemble": score.of_logits({s: torch.stack([lg[s] for lg in logits]).mean(0) for s in score.sets})}
    calibration = calibration_of(cfg, splits)
    if args.select == "lstsq":
        fused = repaired(members, calibration, "lstsq")
    else:
        fused = fuse(members, method="nt", schedule="flat", example_inputs=calibration[:2], calibration=calibration,
                     repair="lstsq")
    row["one-shot"] = score(fused)
    teacher = Ensemble(members)
    row["runs"] = {}
    for loss in args.losses:
        for run, recipe in recipes(args.grid).items():
            kw = dict(cfg=cfg, splits=splits, teacher=teacher if loss == "distill" else None, recipe=recipe,
                      score=score)
            row["runs"][f"{loss}, {run}"] = {
                "fused": curve(copy.deepcopy(fused), seed=run_seed(cfg.train, FUSED_SEED), **kw),
                "control": curve(copy.deepcopy(members[best]), seed=run_seed(cfg.train, CONTROL_SEED), **kw)}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", type=int, nargs="+", default=list(Grid.budgets),
                    help="epochs after which the constant-LR runs are read (one run of the longest)")
    ap.add_argument("--lrs", type=float, nargs="*", default=list(Grid.constant_lrs), help="constant LRs")
    ap.add_argument("--cosine-lrs", type=float, nargs="*", default=list(Grid.cosine_lrs), help="cosine start LRs")
    ap.add_argument("--cosine-budgets", type=int, nargs="+", default=list(Grid.cosine_budgets),
                    help="epochs of the cosine runs (one run each)")
    ap.add_argument("--select", choices=("magnitude", "lstsq"), default="magnitude",
                    help="NT's kept units: by magnitude (ntdist's) or by least squares (benchmarks/lstsq_select.py)")
    ap.add_argument("--epochs", type=int, default=None, help="member epochs (default: the config's)")
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--temperature", type=float, default=None, help="distillation temperature (default: the config's)")
    ap.add_argument("--soft-weight", type=float, default=None, help="distillation soft weight (default: the config's)")
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "finetune_recipes", "members"),
                    help="folder of the members per seed")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "finetune_recipes", "rows.json"),
                    help="every seed's accuracies (JSON)")
    ap.add_argument("--table-only", action="store_true", help="print the tables of --out and stop")
    args = ap.parse_args()
    args.grid = Grid(tuple(args.budgets), tuple(args.lrs), tuple(args.cosine_lrs), tuple(args.cosine_budgets))
    torch.set_num_threads(1)
    everything = {}
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            everything = json.load(f)
    for name in args.models:
        rows = everything.setdefault(name, [])
        if not args.table_only:
            overrides = [] if args.epochs is None else [f"train.epochs={args.epochs}"]
            distill = [f"finetune.{key}={value}" for key, value in (("temperature", args.temperature),
                                                                     ("soft_weight", args.soft_weight)) if value]
            cfg, spec, splits = setup(name, overrides + distill)
            for seed in range(len(rows), args.seeds):
                cfg.train.seed = seed
                rows.append(one_seed(cfg, spec, splits, args, name))
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out + ".part", "w", encoding="utf-8") as f:
                    json.dump(everything, f)
                os.replace(args.out + ".part", args.out)
                print(f"{name} seed {seed}: one-shot {100 * rows[-1]['one-shot']['test']:.1f}, best member "
                      f"{100 * rows[-1]['best member']['test']:.1f}", flush=True)
        if rows:
            print(f"\n{table(name, rows, args.grid)}\n", flush=True)


if __name__ == "__main__":
    main()
