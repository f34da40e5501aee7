"""Periodic-sync SGD: averaging trains, plain NT as the sync step collapses (the paper's failure case),
NT with duplicate merging (fusion.dedup) trains.

Run: .venv/bin/python -m pytest tests/multiproc/test_sync.py
"""

import subprocess
import sys

import pytest

from helpers import ROOT, torchrun_cmd
from ntdist.records.results import read_results


def run(cmd, out):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(str(out))


def test_four_replicas_avg_trains_nt_collapses(tmp_path):
    out = tmp_path / "sync"
    results = run([sys.executable, "-m", "ntdist", "run", "configs/sync_sgd.yaml", f"output.dir={out}",
                   "distributed.threads_per_rank=1", "fusion.dedup=off"], out)
    sync = results.sync
    assert results.k == 4 and len(sync["avg"].test) == 10
    assert sync["avg"].final >= sync["none"].final - 0.01       # local SGD is as good as one replica
    assert sync["nt"].final < sync["avg"].final - 0.25          # NT sync collapses (about 40% vs 98%)
    assert max(sync["nt"].test[3:]) < sync["avg"].final - 0.15  # and never recovers


def test_nt_with_dedup_trains_as_a_sync_step(tmp_path):
    out = tmp_path / "sync"
    results = run([sys.executable, "-m", "ntdist", "run", "configs/sync_sgd.yaml", f"output.dir={out}",
                   "distributed.threads_per_rank=1", "sync.methods=[nt]", "fusion.dedup=on"], out)
    nt = results.sync["nt"]
    assert nt.final > 0.93                  # plain NT: about 40 %, averaging about 98 %
    assert nt.merged["net.1"] > 0 and nt.merged["net.3"] > 0


def test_the_dedup_sync_config_is_level_with_averaging(tmp_path):
    # configs/sync_sgd_dedup.yaml, seed 0: 97.8 % for both (docs/RESULTS.md, "Dedup")
    out = tmp_path / "dedup"
    cmd = [sys.executable, "-m", "ntdist", "run", "configs/sync_sgd_dedup.yaml", f"output.dir={out}", "seeds=[0]"]
    results = run(cmd, out / "seed=0")
    avg, nt = results.sync["avg"], results.sync["nt"]
    assert nt.final > 0.95 and nt.final >= avg.final - 0.01
    assert nt.merged["net.1"] > 0 and nt.merged["net.3"] > 0


@pytest.mark.parametrize("dedup", ["off", "on"])
def test_sync_on_two_ranks_equals_one_process(tmp_path, dedup):
    args = ["configs/sync_sgd.yaml", "fusion.k=2", "train.epochs=3", "sync.methods=[avg,nt]",
            "sync.unit=step", "sync.every=20", "distributed.threads_per_rank=1", f"fusion.dedup={dedup}"]
    one = run([sys.executable, "-m", "ntdist", "run", *args, f"output.dir={tmp_path / 'one'}"], tmp_path / "one")
    two = run(torchrun_cmd("run", *args, f"output.dir={tmp_path / 'two'}"), tmp_path / "two")
    assert two.world["size"] == 2
    assert one.sync == two.sync
