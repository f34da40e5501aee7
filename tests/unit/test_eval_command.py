"""`ntdist eval`: accuracy and loss per checkpoint and of their ensemble on a split, as a table or JSON.

Run: .venv/bin/python -m pytest tests/unit/test_eval_command.py
"""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import QUICK, digits_tensors, ntdist
from ntdist.cli import main
from ntdist.records.checkpoint import load_model
from ntdist.records.results import read_results


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["run", *QUICK, "train.epochs=2", "finetune.epochs=0", f"output.dir={out}"]) == 0
    return out


def members(run_dir):
    return [str(run_dir / "checkpoints" / f"member{i}.safetensors") for i in range(2)]


def test_eval_of_a_runs_checkpoints_matches_its_results(run_dir):
    proc = ntdist("eval", *members(run_dir), "--json", "-")            # the data: the run's config.yaml
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    results = read_results(str(run_dir))
    assert report["split"] == "test" and report["data"] == "digits"
    assert [m["accuracy"] for m in report["models"]] == pytest.approx(results.members)
    assert report["ensemble"]["accuracy"] == pytest.approx(results.ensemble)
    x, y = digits_tensors("test")
    logits = [load_model(p)[0].eval()(x).detach().double() for p in members(run_dir)]
    assert report["models"][0]["loss"] == pytest.approx(F.cross_entropy(logits[0], y).item(), rel=1e-6)
    assert report["ensemble"]["loss"] == pytest.approx(F.cross_entropy(sum(logits) / 2, y).item(), rel=1e-6)
    table = ntdist("eval", *members(run_dir), "--split", "val")
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.splitlines()
    assert lines[0].startswith("val split of digits") and "ensemble of 2" in lines[-1]
    shown = [float(line.split()[-2].rstrip("%")) for line in lines[2:4]]
    assert shown == pytest.approx([round(a * 100, 2) for a in results.members_val])


def test_plain_state_dicts_with_model_and_data_settings(run_dir, tmp_path):
    plain = []
    for i, path in enumerate(members(run_dir)):
        plain.append(str(tmp_path / f"m{i}.pt"))
        torch.save(load_model(path)[0].state_dict(), plain[-1])
    out = tmp_path / "eval.json"
    expected = read_results(str(run_dir))
    for data in (["data.name=digits"], ["--data", "configs/quickstart.yaml"]):
        assert main(["eval", *plain, "--model", "mlp", "--model-kwargs", '{"width": 32}', *data, "--json",
                     str(out)]) == 0
        report = json.loads(out.read_text())
        assert [m["accuracy"] for m in report["models"]] == pytest.approx(expected.members)


def test_eval_mistakes_are_one_line(run_dir, tmp_path, capsys):
    plain = str(tmp_path / "m.pt")
    torch.save(load_model(members(run_dir)[0])[0].state_dict(), plain)
    cases = [
        (["eval", plain, "--model", "mlp"], "needs the data"),
        (["eval", plain, "--model", "mlp", "--model-kwargs", '{"width": 32, "input_dim": 64}', "data.name=synthetic",
          "data.synthetic_shape=[40]"], "does not run on inputs of shape [2, 40]: in layer 'net.1' (Linear)"),
        (["eval", plain, "--model", "mlp", "--model-kwargs", '{"width": 16}', "data.name=digits"],
         "'net.1.weight' has shape [32, 64], the model [16, 64]"),
        (["eval", plain, "--model", "mlp", "--data", "data.name=digits", "--json", str(tmp_path / "no" / "r.json")],
         "cannot write --json"),
        (["eval", plain, "data.name=digits"], "plain state dict without a model spec; pass --model"),
    ]
    for args, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (args, err)
    with pytest.raises(SystemExit):
        main(["eval", plain, "--model", "mlp", "train.epochs=3"])   # a key eval does not take: argparse's error
