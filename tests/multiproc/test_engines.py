"""The three fine-tuning engines (ddp, accelerate, deepspeed) follow the same trajectory on 2 ranks,
accelerate finds the job's ranks under srun, which sets none of torchrun's variables, and DeepSpeed
with bf16 in its config gets bf16 inputs and saves its fp32 master weights.

Run: .venv/bin/python -m pytest tests/multiproc/test_engines.py
"""

import json
import os
import subprocess
import sys

import pytest

import torch

from helpers import ROOT, free_port, torchrun_cmd
from ntdist.records.checkpoint import load_model
from ntdist.records.results import read_results

ARGS = ["configs/quickstart.yaml", "fusion.methods=[nt]", "finetune.control=false", "train.epochs=4",
        "distributed.threads_per_rank=1", "output.diversity=false"]


def torchrun(out, *extra):
    cmd = torchrun_cmd("run", *ARGS, f"output.dir={out}", *extra)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".torch_extensions"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(str(out))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("ddp") / "run")


@pytest.mark.parametrize("engine", [["finetune.engine=accelerate"],
                                    ["finetune.engine=deepspeed", "finetune.zero_stage=1"],
                                    ["finetune.engine=deepspeed", "finetune.zero_stage=2"]])
def test_engine_matches_ddp_on_two_ranks(tmp_path, ddp, engine):
    got = torchrun(tmp_path / "run", *engine)
    assert got.world["size"] == 2 and len({r["pid"] for r in got.world["ranks"]}) == 2
    assert got.members == ddp.members and got.fusion["nt"].post_fusion == ddp.fusion["nt"].post_fusion
    for a, b in zip(got.fusion["nt"].finetune, ddp.fusion["nt"].finetune):
        assert abs(a - b) <= 0.01   # same data, same SGD: equal up to summation order


def srun_env(rank: int, port: int) -> dict:
    """What `srun --ntasks=2` on one node gives each task, and no torchrun or accelerate variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "ACCELERATE_")) and
           k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "OMP_NUM_THREADS")}
    env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2",
               SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="7", MASTER_PORT=str(port))
    return env


def test_accelerate_under_srun_sees_both_ranks(tmp_path):
    out, port = tmp_path / "run", free_port()
    cmd = [sys.executable, "-m", "ntdist", "run", *ARGS, "train.epochs=1", "finetune.epochs=1", "fusion.methods=[avg]",
           "finetune.engine=accelerate", "finetune.lr=0.01", "finetune.lr_scaling=linear", f"output.dir={out}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=srun_env(r, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    got = read_results(str(out))
    assert got.world["launcher"] == "slurm" and got.world["size"] == 2
    assert len(got.fusion["avg"].finetune) == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["lr"] for r in records if r.get("stage") == "finetune" and "lr" in r}
    assert lrs == {0.02}, lrs   # finetune.lr_scaling=linear on 2 ranks


def test_deepspeed_with_bf16_in_its_config_fine_tunes_on_the_cpu(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 1}}')
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=extensions)
    cmd = [sys.executable, "-m", "ntdist", "run", *ARGS, "fusion.methods=[avg]", "finetune.engine=deepspeed",
           f"finetune.deepspeed_config={ds}", "finetune.precision=bf16", "finetune.epochs=2",
           f"output.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]   # was: mat1 and mat2 must have the same dtype
    avg = read_results(str(tmp_path / "run")).fusion["avg"]
    assert len(avg.finetune) == 2 and avg.finetune[-1] > avg.post_fusion   # bf16 steps still learn
    # The checkpoint holds DeepSpeed's fp32 master weights, in the dtypes the spec builds (was: bf16, which
    # load_model refuses, so --resume and `ntdist fuse` on the file failed).
    path = str(tmp_path / "run" / "checkpoints" / "finetuned_avg.safetensors")
    model, _ = load_model(path)
    weights = [p for p in model.parameters()]
    assert all(p.dtype == torch.float32 for p in weights)
    assert any(not torch.equal(p, p.bfloat16().float()) for p in weights)   # not the bf16 rounding
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_results(str(tmp_path / "run")).fusion["avg"].finetune == avg.finetune
