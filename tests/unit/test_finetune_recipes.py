"""The report of `benchmarks/finetune_recipes.py` (`benchmarks/recipe_table.py`): each budget read from its own
run, the halfway mark, the recipe chosen on validation.

Run: .venv/bin/python -m pytest tests/unit/test_finetune_recipes.py
"""

import importlib.util
import os

import pytest

from helpers import ROOT


def _recipes():
    spec = importlib.util.spec_from_file_location("recipe_table", os.path.join(ROOT, "benchmarks", "recipe_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert set(recipes.recipes([10])) == {"constant 0.01", "constant 0.003", "constant 0.001",
                                          "cosine 0.01 x10", "cosine 0.003 x10"}


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
