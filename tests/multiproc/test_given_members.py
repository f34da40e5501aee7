"""`ntdist run` on members trained elsewhere (`fusion.members`): no member training, everything after it as usual.

The members are ResNet18s (ntdist's small-image ResNet at width 8) trained on digits by a plain torch loop and
saved as plain state dicts, a .safetensors and a torch .pt file; wrapped state dicts (DDP, Lightning,
torch.compile) load too, and a file that does not fit stops the run before anything is written.

Run: .venv/bin/python -m pytest tests/multiproc/test_given_members.py
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import ROOT, digits_tensors, ntdist, plain_accuracy, train_plain, wait_for
from ntdist.cli import main
from ntdist.models.resnet import ResNet18
from ntdist.records.results import read_results

RESNET = {"in_channels": 1, "num_classes": 10, "width": 8}
CHANCE = 0.1   # ten digits


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two ResNet18s trained outside ntdist, saved as plain state dicts; (paths, state dicts, test accuracies)."""
    folder = tmp_path_factory.mktemp("members")
    x, y = digits_tensors("train")
    xt, yt = digits_tensors("test")
    paths, states, accuracies = [str(folder / "a.safetensors"), str(folder / "b.pt")], [], []
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        model = train_plain(ResNet18(**RESNET), x, y, seed, steps=100)
        accuracies.append(plain_accuracy(model, xt, yt))
        states.append({k: v.contiguous() for k, v in model.state_dict().items()})
        save_file(states[-1], path) if path.endswith(".safetensors") else torch.save(states[-1], path)
    assert min(accuracies) > 0.8, accuracies
    return paths, states, accuracies


def config(tmp_path, paths, **sections) -> str:
    """A run config whose members are `paths`; `sections` add or replace config sections."""
    cfg = {"model": {"name": "resnet18", "kwargs": {"width": 8}}, "fusion": {"members": list(paths)},
           "finetune": {"epochs": 2}, "output": {"dir": str(tmp_path / "run")}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "members.yaml"
    path.write_text(json.dumps(cfg))   # JSON is YAML
    return str(path)


def same_results(a, b) -> None:
    ra, rb = read_results(str(a)), read_results(str(b))
    assert (ra.members, ra.ensemble, ra.control.finetune) == (rb.members, rb.ensemble, rb.control.finetune)
    assert {m: (v.post_fusion, v.finetune) for m, v in ra.fusion.items()} == \
        {m: (v.post_fusion, v.finetune) for m, v in rb.fusion.items()}


@pytest.fixture(scope="module")
def finished(members, tmp_path_factory):
    """`ntdist run` through the command line on the two members, NT and averaging, two fine-tuning epochs."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = config(tmp, members[0], fusion={"methods": ["nt", "avg"]})
    proc = ntdist("run", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", cfg


def test_members_trained_elsewhere_are_evaluated_fused_finetuned_and_reported(members, finished):
    run, _ = finished
    paths, _, accuracies = members
    results = read_results(str(run))
    assert results.k == 2 and results.members == pytest.approx(accuracies)   # the members, unchanged
    assert results.control is not None and len(results.control.finetune) == 2
    assert set(results.fusion) == {"nt", "avg"} and all(len(m.finetune) == 2 for m in results.fusion.values())
    # BatchNorm: NT's repair keeps each kept channel's own statistics, so no re-estimation is needed
    assert results.fusion["nt"].post_fusion > CHANCE + 0.6, results.fusion["nt"].post_fusion
    assert (run / "report.md").exists()
    fused = load_file(str(run / "checkpoints" / "finetuned_nt.safetensors"))
    ResNet18(**RESNET).load_state_dict(fused)                    # plain out: a strict load into the user's class
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["stage"] == "member" for r in records)     # nothing was trained before fusion
    assert not any(name.startswith("member") for name in os.listdir(run / "checkpoints"))


def test_bn_reestimation_alone_also_lands_far_above_chance(members, tmp_path):
    cfg = config(tmp_path, members[0], fusion={"methods": ["nt"], "repair": "none", "bn_reestimate": True},
                 finetune={"epochs": 0, "control": False}, output={"diversity": False})
    assert main(["run", cfg]) == 0
    assert read_results(str(tmp_path / "run")).fusion["nt"].post_fusion > CHANCE + 0.4


@pytest.mark.parametrize("how, suffix", [("module.", "pt"), ("lightning", "ckpt"), ("_orig_mod.module.", "safetensors")])
def test_wrapped_members_are_unwrapped(members, tmp_path, how, suffix):
    paths = []
    for i, state in enumerate(members[1]):
        paths.append(str(tmp_path / f"m{i}.{suffix}"))
        if how == "lightning":
            torch.save({"epoch": 5, "global_step": 200, "state_dict": {f"model.{k}": v for k, v in state.items()},
                        "hyper_parameters": {"lr": 0.05}}, paths[-1])
        elif suffix == "pt":
            torch.save({how + k: v for k, v in state.items()}, paths[-1])
        else:
            save_file({how + k: v for k, v in state.items()}, paths[-1])
    cfg = config(tmp_path, paths, fusion={"methods": ["avg"]}, finetune={"epochs": 0, "control": False},
                 output={"diversity": False})
    assert main(["run", cfg]) == 0
    assert read_results(str(tmp_path / "run")).members == pytest.approx(members[2])


def _refusal(tmp_path, capsys, cfg, *overrides) -> str:
    assert main(["run", cfg, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()      # refused before anything was written
    return err


def test_members_that_do_not_fit_are_refused_in_one_line_before_anything_is_written(members, tmp_path, capsys):
    paths = members[0]
    wide = str(tmp_path / "wide.safetensors")
    save_file({k: v.contiguous() for k, v in ResNet18(in_channels=1, num_classes=10, width=16).state_dict().items()},
              wide)
    err = _refusal(tmp_path, capsys, config(tmp_path, [paths[0], wide]))
    assert "'conv1.weight' has shape [16, 1, 3, 3], the model [8, 1, 3, 3]" in err and "wide.safetensors" in err
    head = str(tmp_path / "head.pt")             # a float where the model counts batches
    torch.save({k: v.float() if k.endswith("num_batches_tracked") else v for k, v in members[1][1].items()}, head)
    assert "'bn1.num_batches_tracked' is stored as torch.float32, the model holds torch.int64" in \
        _refusal(tmp_path, capsys, config(tmp_path, [paths[0], head]))
    less = str(tmp_path / "less.pt")
    torch.save({k: v for k, v in members[1][1].items() if not k.startswith("fc.")}, less)
    assert "missing key 'fc.weight'" in _refusal(tmp_path, capsys, config(tmp_path, [paths[0], less]))
    more = str(tmp_path / "more.pt")
    torch.save({**members[1][1], "proj.weight": torch.zeros(2)}, more)
    assert "unexpected key 'proj.weight'" in _refusal(tmp_path, capsys, config(tmp_path, [paths[0], more]))
    backbone = str(tmp_path / "backbone.pt")
    torch.save({f"backbone.{k}": v for k, v in members[1][1].items()}, backbone)
    assert "every key starts with 'backbone.'" in _refusal(tmp_path, capsys, config(tmp_path, [paths[0], backbone]))
    assert "fusion.k=3 but fusion.members lists 2 files" in _refusal(tmp_path, capsys, config(tmp_path, paths),
                                                                     "fusion.k=3")
    assert "'nothere.pt' does not exist" in _refusal(tmp_path, capsys, config(tmp_path, [paths[0], "nothere.pt"]))
    assert "does not fit model.name mlp" in _refusal(tmp_path, capsys, config(tmp_path, paths), "model.name=mlp")


def test_an_interrupted_run_on_given_members_resumes_to_the_same_results(finished, tmp_path):
    reference, cfg = finished
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ntdist", "run", cfg, f"output.dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "checkpoints" / "finetune_best-member.state.safetensors", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 3, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
    assert not (out / "results.json").exists()
    assert main(["run", cfg, f"output.dir={out}", "--resume"]) == 0
    same_results(out, reference)
