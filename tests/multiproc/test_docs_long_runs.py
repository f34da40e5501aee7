"""The docs' commands that take about a minute run as written and print the figures docs/RESULTS.md gives.

`make demo` (what its Makefile recipe runs) against RESULTS.md's seed-0 row of "MNIST-1D: the demo
over 5 seeds", and `ntdist run own_model.yaml` of docs/USAGE.md against "A model of your own". They
run like the quick ones of tests/unit/test_docs_runs.py (one thread, a temporary folder); the other
rows of the demo's table take five runs and are only parsed (tests/unit/test_docs_commands.py).

Run: .venv/bin/python -m pytest tests/multiproc/test_docs_long_runs.py
"""

import os
import re
import sys

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tests", "unit"))
from test_docs_commands import Command  # noqa: E402
from test_docs_runs import documented_figures, read_results, run_commands, run_doc  # noqa: E402


def _demo_row(r: dict) -> list:
    nt, avg = r["fusion"]["nt"], r["fusion"]["avg"]
    return [r["best_member"], r["ensemble"], r["control"]["finetune"][-1], nt["post_fusion"], nt["finetune"][-1],
            avg["finetune"][-1]]


def test_make_demo_prints_the_seed_0_row_of_results_md(tmp_path):
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipe = re.search(r"^demo:.*\n\t\$\(PY\) -m (ntdist .*)$", f.read(), re.M).group(1)
    run_doc("README.md", tmp_path, [])
    run_commands([Command("Makefile", 0, recipe, True)], tmp_path)
    with open(os.path.join(ROOT, "docs", "RESULTS.md")) as f:
        section = f.read().split("## MNIST-1D: the demo over 5 seeds", 1)[1]
    row = re.search(r"^\| 0 \| (.*) \|$", section, re.M).group(1).split(" | ")
    assert row == [f"{100 * x:.1f}" for x in _demo_row(read_results(tmp_path, "demo_mnist1d"))]


def test_the_own_model_example_prints_the_figures_of_results_md(tmp_path):
    run_doc("docs/USAGE.md", tmp_path, ["ntdist run own_model.yaml"])
    r = read_results(tmp_path, "own_model")
    printed = [r["best_member"], r["ensemble"], r["fusion"]["nt"]["finetune"][-1], r["control"]["finetune"][-1]]
    assert documented_figures("docs/RESULTS.md", "**A model of your own**") == [f"{100 * x:.2f}" for x in printed]
