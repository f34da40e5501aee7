"""The report of `benchmarks/finetune_recipes.py` (`benchmarks/recipe_table.py`): each budget read from its own
run, the halfway mark, the recipe chosen on validation; and the least-squares unit selection of
`benchmarks/lstsq_select.py`.

Run: .venv/bin/python -m pytest tests/unit/test_finetune_recipes.py
"""

import importlib.util
import os

import pytest
import torch

from helpers import ROOT


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipes():
    return _benchmark("recipe_table")


def _acc(test, val=None):
    return {"test": test, "val": test if val is None else val}


def _row(seed: int, lift: float, cosine_val: float) -> dict:
    """One seed: the fused model `lift` above the control on every constant-LR run; cosine 0.01 x10 is the
    run with the best validation accuracy (`cosine_val`), 2 points above the control on test. Distilled, the
    fused model is 1 point above the distilled control and 3 above the plain one."""
    wobble = 0.001 * seed
    constant = {"fused": [_acc(0.80 + lift + e / 100 + wobble) for e in range(10)],
                "control": [_acc(0.80 + e / 100) for e in range(10)]}
    distilled = {"fused": [_acc(0.83 + e / 100 + wobble) for e in range(10)],
                 "control": [_acc(0.82 + e / 100) for e in range(10)]}
    runs = {"plain, constant 0.01": constant, "distill, constant 0.01": distilled,
            "plain, cosine 0.01 x10": {"fused": [_acc(0.5)] * 9 + [_acc(0.92 + wobble, cosine_val)],
                                       "control": [_acc(0.5)] * 9 + [_acc(0.90)]}}
    return {"best member": _acc(0.8), "ensemble": _acc(0.92), "one-shot": _acc(0.79), "runs": runs}


def test_each_budget_reads_its_epoch_and_cosine_reads_its_own_run():
    recipes = _recipes()
    row = _row(0, 0.0, 0.95)
    assert recipes.at_budget(row, "plain", "constant 0.01", 3, "control")["test"] == pytest.approx(0.82)
    assert recipes.at_budget(row, "plain", "cosine 0.01", 10, "fused")["test"] == pytest.approx(0.92)
    assert recipes.at_budget(row, "plain", "cosine 0.01", 3, "fused") is None   # no 3-epoch cosine run
    assert recipes.at_budget(row, "distill", "constant 0.003", 1, "fused") is None
    assert set(recipes.recipes(recipes.Grid(cosine_budgets=(10,)))) == {
        "constant 0.01", "constant 0.003", "constant 0.001", "cosine 0.01 x10", "cosine 0.003 x10"}
    longer = recipes.Grid(budgets=(10, 40), constant_lrs=(0.01,), cosine_lrs=())
    assert recipes.recipes(longer) == {"constant 0.01": ("none", 0.01, 40)}


def test_a_grid_without_cosine_reads_the_constant_runs_at_its_own_budgets_only():
    recipes = _recipes()
    rows = [_row(seed, 0.05, 0.99) for seed in range(4)]
    text = recipes.table("mlp", rows, recipes.Grid(budgets=(3, 10), constant_lrs=(0.01,), cosine_lrs=()))
    budgets = [line.split(" | ")[2] for line in text.splitlines() if line.startswith("| plain |")]
    assert budgets == ["3", "10"]


def test_table_marks_the_halfway_criterion_and_chooses_on_validation():
    recipes = _recipes()
    rows = [_row(seed, 0.05, 0.99) for seed in range(4)]
    text = recipes.table("mlp", rows)
    lines = {line.split(" | ")[1] + " x" + line.split(" | ")[2]: line for line in text.splitlines()
             if line.startswith("| plain |")}
    assert set(lines) == {"constant 0.01 x1", "constant 0.01 x3", "constant 0.01 x10", "cosine 0.01 x10"}
    # after epoch 1: ensemble 92 - control 80 = 12, halfway 6 > the 5.15 points the fused model is ahead
    assert "| +5.15 ± 0.13 |" in lines["constant 0.01 x1"] and "6.00 (no)" in lines["constant 0.01 x1"]
    assert "5.00 (**yes**)" in lines["constant 0.01 x3"]
    # after epoch 10: control 89, halfway 1.5 < 5.15, with p < 0.05 on 4 seeds ahead
    assert "1.50 (**yes**)" in lines["constant 0.01 x10"] and "| 4/4 |" in lines["constant 0.01 x10"]
    assert "1.00 (**yes**)" in lines["cosine 0.01 x10"] and lines["cosine 0.01 x10"].endswith("| (the same) |")
    distilled = next(line for line in text.splitlines() if line.startswith("| distill | constant 0.01 | 10 |"))
    # against the distilled control (91): +1.15, halfway 0.5; against the plain one (89): +3.15, halfway 1.5
    assert "| +1.15 ± 0.13 |" in distilled and "0.50 (**yes**)" in distilled
    assert distilled.endswith("| +3.15, p = 1.9e-05, 1.50 (**yes**) |")
    chosen = text.splitlines()[-1]
    assert chosen.startswith("Chosen on the fused model's mean validation accuracy (99.00 %): plain, cosine 0.01, "
                             "10 epochs") and "fused − control +2.15 ± 0.13" in chosen


def _sums(x, w):
    """The Gram matrix of [x, 1] and its products with the target x @ w.T (w with a zero constant column)."""
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1)
    gram = x.T @ x
    return gram, gram @ w.T


def test_least_squares_selection_keeps_what_explains_the_target_and_drops_a_duplicate():
    select = _benchmark("lstsq_select")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g, dtype=torch.float64)
    x[:, 3] = 2 * x[:, 1]          # unit 3 duplicates unit 1: either one explains the other
    x[:, 4] *= 10                   # the largest unit, but the target ignores it
    w = torch.tensor([[1.0, 0.5, 0.0, 0.5, 0.0], [0.0, 1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    kept = select.eliminate(*_sums(x, w), n_units=5, per_unit=1, count=3).tolist()
    assert 0 in kept and 2 in kept and 4 not in kept and len({1, 3} & set(kept)) == 1
    # a unit of two columns (a kernel) is kept or dropped whole
    wide = torch.randn(400, 6, generator=g, dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0, 1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    assert select.eliminate(*_sums(wide, target), n_units=3, per_unit=2, count=1).tolist() == [1]
