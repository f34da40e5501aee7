"""The docs' quick commands run as written, in order, and print the figures the docs give for them.

`QUICK_RUNS` in tests/unit/test_docs_commands.py names them per document. Each document's commands
run in one temporary folder (a link to `configs/` and the files the docs define, such as `mydata.py`)
in one Python process, so torch is imported once: `ntdist ...` through `ntdist.cli.main`,
`python -c CODE` and `python FILE` as Python, a here-document as the file it writes; braces and
globs expand as bash expands them. The runs are single-process CPU runs with one thread: their
accuracies are the same bit for bit on every run and thread count, so FIGURES compares them with
the docs exactly as printed.

Run: .venv/bin/python -m pytest tests/unit/test_docs_runs.py
"""

import json
import os
import re
import subprocess
import sys

import numpy as np

from helpers import ROOT
from ntdist.sweep import SWEEP_KEYS
from test_docs_commands import QUICK_RUNS, defined_files, doc_commands

DRIVER = r"""
import contextlib, glob, io, itertools, json, runpy, sys
from ntdist import cli

def expand(word):
    return (sorted(glob.glob(word)) or [word]) if "*" in word else [word]

done = []
for argv, body in json.loads(sys.argv[1]):
    out, err, rc = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if argv[0] == "ntdist":
                rc = cli.main(list(itertools.chain(*map(expand, argv[1:]))))
            elif argv[0] == "cat":
                open(argv[argv.index(">") + 1], "w").write(body)
            elif argv[1] == "-c":
                exec(compile(argv[2], "-c", "exec"), {"__name__": "__main__"})
            else:
                runpy.run_path(argv[1], run_name="__main__")
        except SystemExit as stop:
            rc = stop.code or 0
        except Exception as e:
            rc, err = 1, io.StringIO(f"{type(e).__name__}: {e}")
    done.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(done))
"""


def read_results(folder, run):
    with open(os.path.join(folder, "runs", run, "results.json")) as f:
        return json.load(f)


def _quickstart(r: dict) -> list:
    """What docs/RESULTS.md gives for the quickstart, in its order."""
    nt, avg = r["fusion"]["nt"], r["fusion"]["avg"]
    return [*r["members"], r["ensemble"], nt["post_fusion"], nt["finetune"][-1], avg["post_fusion"],
            avg["finetune"][-1], r["control"]["finetune"][-1]]


FIGURES = {   # command: (document, words its paragraph starts with, the run, the figures in the paragraph's order)
    "ntdist run configs/quickstart.yaml": ("docs/RESULTS.md", "**The quickstart**", "quickstart", _quickstart),
}


def documented_figures(doc: str, start: str) -> list:
    """The percentages (`97.21 %`) of the paragraph of `doc` that starts with `start`, as printed."""
    with open(os.path.join(ROOT, doc)) as f:
        paragraphs = f.read().split("\n\n")
    found = [p for p in paragraphs if p.startswith(start)]
    assert len(found) == 1, f"{doc}: {len(found)} paragraphs start with {start!r}"
    return re.findall(r"(\d+\.\d+) %", found[0])


def run_doc(doc: str, folder, names=None) -> list:
    """Run the commands `names` of `doc` (default: its QUICK_RUNS) in `folder`, in order; returns
    [(command, {rc, stdout, stderr})]."""
    os.symlink(os.path.join(ROOT, "configs"), folder / "configs")
    for name, text in defined_files(doc).items():
        (folder / name).write_text(text)
    by_name = {c.name: c for c in doc_commands(doc)}
    names = QUICK_RUNS[doc] if names is None else names
    missing = [name for name in names if name not in by_name]
    assert not missing, f"{doc} no longer holds the commands {missing} (QUICK_RUNS, tests/unit/test_docs_commands.py)"
    return run_commands([by_name[name] for name in names], folder)


def run_commands(commands: list, folder) -> list:
    """Run `commands` in `folder` (prepared by `run_doc`) in one process, in order; each must exit 0."""
    if not commands:
        return []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[c.argv, c.body] for c in commands])],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = list(zip(commands, json.loads(proc.stdout.splitlines()[-1])))
    for command, outcome in outcomes:
        assert outcome["rc"] == 0, f"{command}\n  exit {outcome['rc']}: {outcome['stderr'][-2000:]}"
    return outcomes


def test_the_readme_runs_in_order_and_prints_the_documented_figures(tmp_path):
    outcomes = run_doc("README.md", tmp_path)
    for command, outcome in outcomes:
        if command.name in FIGURES:
            doc, start, run, figures = FIGURES[command.name]
            printed = [f"{100 * x:.2f}" for x in figures(read_results(tmp_path, run))]
            assert documented_figures(doc, start) == printed, f"{command}: {doc} ('{start}') against the run"
            assert all(f"{x}%" in outcome["stdout"] for x in printed[2:]), outcome["stdout"]
    printed = {c.name: o["stdout"] for c, o in outcomes}
    assert all(f"\n  {key} (" in printed["ntdist run --help"] for key in SWEEP_KEYS), "run --help: seeds, sweep"
    assert (tmp_path / "fused.safetensors").exists() and (tmp_path / "fused_flat.safetensors").exists()


def test_the_image_folder_example_keeps_every_grey_level(tmp_path):
    """docs/USAGE.md writes digits (pixel values 0..16) as PNGs: 16 must be the brightest, not wrap to 0."""
    from PIL import Image
    from sklearn.datasets import load_digits

    run_doc("docs/USAGE.md", tmp_path)
    digits = load_digits()
    level = {}   # digits' grey level (0..16) -> the PNG values it became
    for i in range(20):
        split = "test" if i % 5 == 0 else "train"
        png = np.asarray(Image.open(tmp_path / f"data/digits_png/{split}/{digits.target[i]}/{i}.png").convert("L"))
        for value, pixel in zip(digits.images[i].astype(int).reshape(-1), png.reshape(-1)):
            level.setdefault(value, set()).add(int(pixel))
    assert all(len(pixels) == 1 for pixels in level.values()), level
    mapped = [level[v].pop() for v in sorted(level)]
    assert mapped[0] == 0 and sorted(level)[-1] == 16 and mapped[-1] == 255, mapped
    assert all(a < b for a, b in zip(mapped, mapped[1:])), f"grey levels out of order: {mapped}"
