"""train.compile: torch.compile runs member training on the CPU.

In this tier, though it is one process, because it compiles C++ kernels (a minute on 2 cores).
Run: .venv/bin/python -m pytest tests/multiproc/test_compile.py
"""

from helpers import make_run
from ntdist.stages.members import train_member

QUICK = ["model.kwargs.width=32", "model.kwargs.depth=2", "train.lr=0.05"]


def test_compile_runs_one_epoch_on_the_cpu(tmp_path):
    run = make_run(tmp_path, *QUICK, "train.epochs=1", "train.compile=true")
    model, history = train_member(run, 0)
    assert len(history) == 1 and history[0]["val_accuracy"] > 0.5
