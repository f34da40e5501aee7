"""The command line: help texts, `ntdist fuse` from checkpoints alone, `ntdist bench fusion`, `ntdist report`.

Run: .venv/bin/python -m pytest tests/unit/test_cli.py
"""

import csv
import json
import os

import pytest
import torch

from helpers import QUICK, ntdist
from ntdist.commands.checkpoints import example_input
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
                        example_inputs=example_input(ModelSpec.from_dict(meta["model"]))[0])
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
        assert float(r["ntdist / floor"]) > 0 and float(r["ntdist / one by one"]) > 0
        assert float(r["epoch loop / floor"]) > 0 and float(r["ntdist / DataLoader"]) > 0
        assert float(r["load average"]) >= 0
def save_plain(path, model):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_fuse_plain_torchvision_state_dicts_and_refuse_a_mismatched_one(tmp_path, capsys):
    from ntdist.cli import main
    from ntdist.models import build_model
    members = []
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        members.append(build_model("torchvision:resnet18", {}).eval())
        save_plain(tmp_path / f"{name}.safetensors", members[-1])
    out = tmp_path / "fused.safetensors"
    plain = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert main(["fuse", "--model", "torchvision:resnet18", "-o", str(out), *plain]) == 0
    fused, meta = load_model(str(out))   # the output carries its spec: no --model needed any more
    assert meta["model"] == {"name": "torchvision:resnet18", "kwargs": {}}
    expected = fuse(members, method="nt", schedule="recursive", example_inputs=torch.zeros(2, 3, 32, 32))
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in expected.state_dict().items())
    save_plain(tmp_path / "c.safetensors", build_model("torchvision:resnet18", {"num_classes": 10}))
    capsys.readouterr()
    assert main(["fuse", "--model", "torchvision:resnet18", "-o", str(tmp_path / "x.safetensors"),
                 plain[0], str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.safetensors' does not fit torchvision:resnet18" in err and "fc.weight" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["fuse", "-o", str(tmp_path / "x.safetensors"), *plain]) == 2
    assert "pass --model NAME" in capsys.readouterr().err


def test_fuse_weights_only_torch_files_on_a_device(tmp_path, capsys):
    from ntdist.cli import main
    from ntdist.models import build_model
    kwargs = {"input_dim": 64, "num_classes": 10, "width": 8}
    for name in ("a", "b"):
        torch.save(build_model("mlp", kwargs).state_dict(), tmp_path / f"{name}.pt")
    inputs = [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    out = str(tmp_path / "fused.safetensors")
    args = ["fuse", "--model", "mlp", "--model-kwargs", json.dumps(kwargs), "-o", out, *inputs]
    assert main(args + ["--device", "cpu"]) == 0
    assert load_model(out)[0].net[1].out_features == 8
    assert main(args + ["--device", "nonsense", "--force"]) == 2   # --force: the output exists now
    assert "--device nonsense is not usable here" in capsys.readouterr().err
    assert main(["fuse", "--model", "mlp", "--model-kwargs", "{width: 8}", "-o", out, "--force", *inputs]) == 2
    assert "--model-kwargs is not valid JSON" in capsys.readouterr().err


def test_every_option_has_help_and_version_prints(capsys):
    import argparse

    from ntdist import __version__
    from ntdist.cli import _parser, main
    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("ntdist", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"ntdist {__version__}"


def test_a_seed_list_on_the_command_line_runs_a_sweep(tmp_path):
    out = tmp_path / "seeds"
    proc = ntdist("run", *QUICK, "train.epochs=1", "finetune.epochs=0", "fusion.methods=[nt]", "seeds=[0,1]",
                  f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert len(list(out.glob("*/results.json"))) == 2, sorted(p.name for p in out.iterdir())
    assert summary
    table = proc.stdout[proc.stdout.index("all runs (2 seeds), test accuracy (%), mean ± std over seeds"):]
    assert table.splitlines()[1].split() == ["after", "fusion", "best"]     # as in report.md
    assert table.splitlines()[5].startswith("NT ") and "±" in table.splitlines()[5]


def test_fuse_with_dedup_returns_a_member_fused_with_its_copy(tmp_path, capsys):
    from ntdist.cli import main
    from ntdist.models import build_model
    kwargs = {"input_dim": 16, "num_classes": 4, "width": 12}
    torch.manual_seed(0)
    member = build_model("mlp", kwargs).eval()
    for name in ("a", "b"):
        torch.save(member.state_dict(), tmp_path / f"{name}.pt")
    inputs = [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    args = ["fuse", "--model", "mlp", "--model-kwargs", json.dumps(kwargs), "--schedule", "flat", *inputs]
    x = torch.randn(8, 16)
    torch.save(torch.randn(64, 16), tmp_path / "inputs.pt")
    by_outputs = ["--dedup", "--dedup-criterion", "activations", "--dedup-inputs", str(tmp_path / "inputs.pt")]
    cases = [([], False), (["--dedup"], True), (["--dedup", "--dedup-threshold", "0.95", "--dedup-overflow", "merge"],
                                                True), (by_outputs, True)]
    for i, (flags, exact) in enumerate(cases):
        out = tmp_path / f"fused{i}.safetensors"
        assert main(args + flags + ["-o", str(out)]) == 0
        fused, meta = load_model(str(out))
        with torch.no_grad():
            error = (fused(x) - member(x)).abs().max().item()
        assert (error <= 1e-5) == exact, (flags, error)
        assert meta["info"].get("dedup_threshold") == (None if not flags else 0.95 if "--dedup-threshold" in flags
                                                        else 0.9)
    assert meta["info"]["dedup_criterion"] == "activations"
    capsys.readouterr()
    for flags, message in ((["--dedup", "--dedup-threshold", "1.5"], "dedup_threshold must be a cosine similarity"),
                           (["--dedup-threshold", "0.5"], "fusion.dedup_threshold only applies with fusion.dedup on"),
                           (["--dedup", "--method", "avg"], "fusion.dedup only applies to method nt, not to avg"),
                           (["--dedup", "--dedup-criterion", "activations"], "go together"),
                           (by_outputs[:-1] + [str(tmp_path / "a.pt")], "not a tensor of inputs")):
        assert main(args + flags + ["-o", str(tmp_path / "bad.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "bad.safetensors").exists()
