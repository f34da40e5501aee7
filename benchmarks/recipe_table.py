"""The grid of benchmarks/finetune_recipes.py and its markdown report, apart from the training.

A recipe is a loss (plain cross-entropy or distillation from the members) and an LR schedule
from a start LR; each is read after each budget of epochs: constant LRs from one run of the longest
budget, cosine from one run per budget (the schedule spans the run). `table` prints, per recipe
and budget, fused and control (test, mean ± std over seeds), the paired fused − control with its
two-sided paired t-test and the seeds ahead, and the halfway mark mean(ensemble − control) / 2
that the fused model must reach with p < 0.05; the recipe it names is the one with the best mean
validation accuracy of the fused model (test accuracy picks nothing).
"""

import statistics
from dataclasses import dataclass
from typing import Tuple

from ntdist.records.stats import paired

LOSSES = ("plain", "distill")


@dataclass(frozen=True)
class Grid:
    """The LRs and budgets of a grid: constant LRs read after each budget of one run of the longest, cosine
    LRs run once per cosine budget."""
    budgets: Tuple[int, ...] = (1, 3, 10)
    constant_lrs: Tuple[float, ...] = (0.01, 0.003, 0.001)
    cosine_lrs: Tuple[float, ...] = (0.01, 0.003)
    cosine_budgets: Tuple[int, ...] = (1, 3, 10)


def recipes(grid: Grid) -> dict:
    """Run name -> (schedule, lr, epochs): one constant-LR run per LR, one cosine run per LR and budget."""
    runs = {f"constant {lr:g}": ("none", lr, max(grid.budgets)) for lr in grid.constant_lrs}
    runs.update({f"cosine {lr:g} x{b}": ("cosine", lr, b) for lr in grid.cosine_lrs for b in grid.cosine_budgets})
    return runs


def at_budget(row: dict, loss: str, lr_name: str, budget: int, who: str):
    """{"val", "test"} of `who` after `budget` epochs of one recipe, or None where the grid lacks it."""
    schedule, lr = lr_name.split()
    key = f"{loss}, constant {lr}" if schedule == "constant" else f"{loss}, cosine {lr} x{budget}"
    run = row["runs"].get(key)
    return None if run is None or len(run[who]) < budget else run[who][budget - 1]


def fmt(values, split="test") -> str:
    xs = [100 * v[split] for v in values]
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def against(rows: list, fused: list, control: list) -> dict:
    """fused − control on test (points): the paired statistics, the halfway mark and whether it is reached."""
    d = paired([100 * f["test"] for f in fused], [100 * c["test"] for c in control])
    half = statistics.mean(100 * (r["ensemble"]["test"] - c["test"]) for r, c in zip(rows, control)) / 2
    p = "n/a" if d["p"] is None else f"{d['p']:.2g}"
    met = d["mean"] >= half and d["p"] is not None and d["p"] < 0.05
    return {**d, "p_text": p, "half": half, "met": "**yes**" if met else "no"}


def table(name: str, rows: list, grid: Grid = Grid()) -> str:
    """The markdown report of one model: reference rows, then one line per recipe and budget. The last
    column compares a distilled fused model with the control fine-tuned by plain cross-entropy with the
    same LR and budget, as `ntdist run` does (its control never distils)."""
    lines = [f"{name}, {len(rows)} seeds: best member {fmt([r['best member'] for r in rows])}, ensemble "
             f"{fmt([r['ensemble'] for r in rows])}, NT + repair one-shot {fmt([r['one-shot'] for r in rows])} "
             f"(test %, mean ± std)", "",
             "| loss | LR | epochs | fused | control | fused − control | p | ahead | halfway | "
             "val: fused − control | fused − plain control, p, halfway |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lr_names = [f"constant {lr:g}" for lr in grid.constant_lrs] + [f"cosine {lr:g}" for lr in grid.cosine_lrs]
    chosen = None
    for loss in LOSSES:
        for lr_name in lr_names:
            for budget in sorted(set(grid.budgets) | (set(grid.cosine_budgets) if grid.cosine_lrs else set())):
                fused = [at_budget(r, loss, lr_name, budget, "fused") for r in rows]
                control = [at_budget(r, loss, lr_name, budget, "control") for r in rows]
                plain = [at_budget(r, LOSSES[0], lr_name, budget, "control") for r in rows]
                if any(v is None for v in fused + control):
                    continue
                d = against(rows, fused, control)
                dv = paired([100 * f["val"] for f in fused], [100 * c["val"] for c in control])
                if loss == LOSSES[0] or any(v is None for v in plain):
                    vs_plain = "(the same)" if loss == LOSSES[0] else "n/a"
                else:
                    dp = against(rows, fused, plain)
                    vs_plain = f"{dp['mean']:+.2f}, p = {dp['p_text']}, {dp['half']:.2f} ({dp['met']})"
                lines.append(f"| {loss} | {lr_name} | {budget} | {fmt(fused)} | {fmt(control)} | "
                             f"{d['mean']:+.2f} ± {d['std']:.2f} | {d['p_text']} | {d['wins']}/{d['n']} | "
                             f"{d['half']:.2f} ({d['met']}) | {dv['mean']:+.2f} | {vs_plain} |")
                val = statistics.mean(f["val"] for f in fused)
                if chosen is None or val > chosen[0]:
                    chosen = (val, f"{loss}, {lr_name}, {budget} epochs", fmt(fused), fmt(control),
                              f"{d['mean']:+.2f} ± {d['std']:.2f}, p = {d['p_text']}, {d['wins']}/{d['n']} ahead")
    if chosen:
        lines += ["", f"Chosen on the fused model's mean validation accuracy ({100 * chosen[0]:.2f} %): "
                      f"{chosen[1]}; test: fused {chosen[2]}, control {chosen[3]}, fused − control {chosen[4]}."]
    return "\n".join(lines)
