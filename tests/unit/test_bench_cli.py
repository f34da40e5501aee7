"""`ntdist bench fusion --quick` and `ntdist bench train --quick`: progress, a table, the CSV they name; and a
mistyped bench option answered with the bench command's usage.

Run: .venv/bin/python -m pytest tests/unit/test_bench_cli.py
"""

import csv
import os

import pytest

from ntdist.cli import main
from ntdist.commands import bench, bench_train


def test_bench_fusion_quick_reports_each_case_a_table_and_the_csv(tmp_path, capsys):
    out = tmp_path / "fusion.csv"
    assert main(["bench", "fusion", "--quick", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = list(csv.DictReader(out.open()))
    cases = [(w, m) for w in bench.QUICK["widths"] for m in ("avg", "nt", "ot")]
    assert [(int(r["width"]), r["method"]) for r in rows] == cases
    progress = [line for line in lines if line.startswith("[")]
    assert progress[0].startswith(f"[1/{len(cases)}] width {cases[0][0]} avg:") and len(progress) == len(cases)
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["width", "method"])
    assert [tuple(line.split()[:2]) for line in lines[header + 1:header + 1 + len(cases)]] == \
        [(str(w), m) for w, m in cases]
    assert lines[-1] == f"wrote CSV to {os.path.abspath(out)}"


def test_bench_train_quick_holds_back_the_training_log_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "train.csv"
    assert main(["bench", "train", "--quick", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = list(csv.DictReader(out.open()))
    cases = [(w, b, k) for w in bench_train.QUICK["workloads"] for b in bench_train.QUICK["batches"]
             for k in bench_train.QUICK["ks"]]
    assert [(r["workload"], int(r["batch"]), int(r["k"])) for r in rows] == cases
    assert len(lines) == len(cases) + 1 + len(cases) + 1, lines      # progress, table header and rows, CSV
    assert lines[0].startswith(f"[1/{len(cases)}] {cases[0][0]} batch {cases[0][1]} k {cases[0][2]}:")
    assert lines[len(cases)].split() == " ".join(bench_train.TABLE).split()
    assert lines[len(cases) + 1].split()[:3] == [str(v) for v in cases[0]]
    assert lines[-1] == f"wrote CSV to {os.path.abspath(out)}"


def test_an_unknown_bench_option_shows_the_bench_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "fusion", "--quik"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: ntdist bench ") and "ntdist bench: error: unrecognized arguments: --quik" in err
