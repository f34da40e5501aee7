"""`benchmarks/zoo.py --models ...` merges its rows into the existing docs/ZOO.md table and redoes the counts.

Run: .venv/bin/python -m pytest tests/unit/test_zoo_table.py
"""

import importlib.util
import os

from helpers import ROOT


def _zoo():
    spec = importlib.util.spec_from_file_location("zoo", os.path.join(ROOT, "benchmarks", "zoo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(model, error=None, seconds=None, note=""):
    return {"model": model, "params": 1.5e6, "concat_error": error, "nt_seconds": seconds, "nt_extra_mib": None,
            "refused": note}


def test_models_replace_their_rows_and_keep_the_others_and_the_notes(tmp_path):
    zoo, path = _zoo(), str(tmp_path / "ZOO.md")
    zoo.write_markdown([_row("alexnet", 2e-7, 1.0), _row("swin_t", note="cannot fuse layer 'x': it does y"),
                        _row("vgg11", note="accepted by the analysis; not measured")], 2, path, 60.0)
    with open(path) as f:
        text = f.read().replace("- refused by the analysis: **1**", "- refused by the analysis: **1** (Swin: y)")
    with open(path, "w") as f:
        f.write(text)
    zoo.write_markdown([_row("swin_t", 5e-7, 2.5), _row("maxvit_t", 3e-7, 4.0)], 2, path, 60.0, merge=True)
    rows = zoo.read_rows(path)
    assert [r["model"] for r in rows] == ["alexnet", "maxvit_t", "swin_t", "vgg11"]
    assert rows[2]["concat_error"] == 5e-7 and rows[2]["refused"] == ""
    assert rows[0]["nt_seconds"] == 1.0 and rows[3]["refused"].startswith("accepted")
    with open(path) as f:
        text = f.read()
    assert "**3 of 4**" in text and "- refused by the analysis: **0** (Swin: y)" in text
    assert "Rows of maxvit_t, swin_t written by" in text
