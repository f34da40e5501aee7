"""The command line: help texts, `ntdist fuse` from checkpoints alone, `ntdist bench fusion`, `ntdist report`.

Run: .venv/bin/python -m pytest tests/unit/test_cli.py
"""

import csv
import os

import pytest
import torch

from helpers import ntdist
from ntdist.commands.fuse import example_input
from ntdist.fusion import fuse
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import load_model


def test_help_lists_subcommands_and_config_keys():
    top = ntdist("--help")
    assert top.returncode == 0
    for command in ("run", "fuse", "bench", "report"):
        assert command in top.stdout
    run = ntdist("run", "--help")
    assert run.returncode == 0
    for key in ("train.epochs (int, default 10)", "fusion.methods", "finetune.engine", "distributed.timeout_s",
                "sync.every", "--resume", "--overwrite"):
        assert key in run.stdout, key


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = ntdist("run", "configs/quickstart.yaml", "train.epochs=3", "finetune.epochs=1", f"output.dir={out}",
                  "fusion.methods=[nt,avg,ot]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report:" in proc.stdout
    return out


def test_fuse_command_rebuilds_models_from_checkpoints(tmp_path, run_dir):
    members = [str(run_dir / "checkpoints" / f"member{i}.safetensors") for i in range(2)]
    for method in ("nt", "avg", "ot"):
        out = tmp_path / f"{method}.safetensors"
        proc = ntdist("fuse", "--method", method, "-o", str(out), *members)
        assert proc.returncode == 0, proc.stderr[-2000:]
        fused, meta = load_model(str(out))
        models = [load_model(p)[0] for p in members]
        expected = fuse(models, method=method, schedule="recursive",
                        example_inputs=example_input(ModelSpec.from_dict(meta["model"])))
        for key, value in expected.state_dict().items():
            assert torch.equal(fused.state_dict()[key], value), (method, key)
    narrow = tmp_path / "narrow.safetensors"
    assert ntdist("fuse", "--keep-ratio", "0.5", "-o", str(narrow), *members).returncode == 0
    model, _ = load_model(str(narrow))
    assert model.net[1].out_features == 16


def test_report_renders_for_a_real_run(run_dir):
    proc = ntdist("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (run_dir / "report.md").read_text()
    assert "NT" in text and "±" in text
    assert any(name.endswith(".png") for name in os.listdir(run_dir))


def test_bench_fusion_writes_csv(tmp_path):
    out = tmp_path / "bench.csv"
    proc = ntdist("bench", "fusion", "--widths", "32", "64", "--repeats", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["avg", "nt", "ot"] * 2
    assert all(float(r["seconds"]) > 0 and float(r["peak_extra_mib"]) >= 0 for r in rows)
    assert all(r["time_vs_avg"] for r in rows)


def test_bench_train_compares_with_the_tight_loop(tmp_path):
    out = tmp_path / "train.csv"
    proc = ntdist("bench", "train", "--workloads", "mlp-digits", "--ks", "1", "2", "--batches", "256",
                  "--epochs", "1", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["k"], r["batch"]) for r in rows] == [("1", "256"), ("2", "256")]
    for r in rows:
        assert float(r["floor samples/s"]) > 0 and float(r["ntdist samples/s"]) > 0
        assert float(r["ntdist / floor"]) > 0
