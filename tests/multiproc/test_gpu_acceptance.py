"""`benchmarks/gpu_acceptance.sh --cpu-smoke`: every check of the one-GPU acceptance script that a CPU can run,
at tiny sizes, passes and ends in the table the GPU run prints (so the script is not first run on a GPU).

Run: .venv/bin/python -m pytest tests/multiproc/test_gpu_acceptance.py
"""

import os
import subprocess
import sys

from helpers import ROOT, acceptance_rows

CHECKS = {"every_stage", "resident_vs_loader", "vectorised", "precisions", "compiled", "sigterm_resume",
          "fusion_on_device", "fuse_command", "ranks_on_one_device", "nccl_two_ranks_one_gpu", "bench_train",
          "dry_run_memory"}
NEEDS_A_GPU = {"compiled", "nccl_two_ranks_one_gpu", "dry_run_memory"}   # SKIP rows of the smoke run


def test_cpu_smoke_passes_every_check_a_cpu_can_run_and_prints_the_table(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_acceptance.sh", "--cpu-smoke", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    rows = acceptance_rows(proc.stdout)
    assert set(rows) == CHECKS
    assert {name for name, (result, _) in rows.items() if result == "SKIP"} == NEEDS_A_GPU
    assert all(result == "PASS" for name, (result, _) in rows.items() if name not in NEEDS_A_GPU)
    assert "stopped at batch 8" in rows["sigterm_resume"][1]
    assert lines[-1] == "overall: PASS"
