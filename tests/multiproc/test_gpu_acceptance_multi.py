"""`benchmarks/gpu_acceptance_multi.sh --cpu-smoke`: the multi-GPU acceptance checks on 4 gloo CPU ranks at tiny
sizes pass and end in the table a 4-GPU node prints (so the script is not first run on a GPU cluster).

Run: .venv/bin/python -m pytest tests/multiproc/test_gpu_acceptance_multi.py
"""

import os
import subprocess
import sys

from helpers import ROOT, acceptance_rows

CHECKS = {"nccl_tree", "nccl_all_reduce", "sync_batchnorm", "sharded_teacher", "deepspeed", "srun_one_gpu_per_task",
          "tree_bytes_and_memory"}
OUTSIDE_SLURM = {"srun_one_gpu_per_task"}   # SKIP rows: the check needs a SLURM allocation


def test_cpu_smoke_passes_every_check_outside_slurm_and_prints_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "benchmarks/gpu_acceptance_multi.sh", "--cpu-smoke", "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=420, env=dict(env, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = acceptance_rows(proc.stdout)
    assert set(rows) == CHECKS
    assert {name for name, (result, _) in rows.items() if result == "SKIP"} == OUTSIDE_SLURM
    assert all(result == "PASS" for name, (result, _) in rows.items() if name not in OUTSIDE_SLURM)
    assert "as the dry run's" in rows["tree_bytes_and_memory"][1]   # every rank's bytes in every round
    assert proc.stdout.splitlines()[-1] == "overall: PASS"
