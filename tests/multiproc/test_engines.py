"""The three fine-tuning engines (ddp, accelerate, deepspeed) follow the same trajectory on 2 ranks.

Run: .venv/bin/python -m pytest tests/multiproc/test_engines.py
"""

import os
import subprocess

import pytest

from helpers import ROOT, torchrun_cmd
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
