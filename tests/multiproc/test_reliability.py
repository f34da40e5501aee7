"""Crashes, preemption and bad input cost nothing: resume is bit-exact, errors are one clear line.

Run: .venv/bin/python -m pytest tests/multiproc/test_reliability.py
"""

import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import QUICK, ROOT, free_port, ntdist, ntdist_batch, torchrun_cmd, wait_for
from ntdist.records.results import read_results


def weights(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def accuracies(run_dir):
    r = read_results(str(run_dir))
    return r.members, r.ensemble, {m: (v.post_fusion, v.finetune) for m, v in r.fusion.items()}


def assert_same_run(a, b):
    assert accuracies(a) == accuracies(b)
    for name in ("member0.safetensors", "member1.safetensors", "finetuned_nt.safetensors"):
        wa, wb = weights(a / "checkpoints" / name), weights(b / "checkpoints" / name)
        assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process run of the settings the kill tests use."""
    out = tmp_path_factory.mktemp("ref") / "run"
    args = [*QUICK, "train.epochs=12", "finetune.epochs=12", "fusion.methods=[nt]", f"output.dir={out}"]
    proc = subprocess.run(torchrun_cmd("run", *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, args[:-1]


@pytest.mark.parametrize("stage_file", ["member0.state.safetensors", "finetune_nt.state.safetensors"])
def test_sigkill_then_resume_gives_identical_weights_and_accuracies(tmp_path, reference, stage_file):
    ref, args = reference
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd("run", *args, f"output.dir={out}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(out / "checkpoints" / stage_file, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "results.json").exists()       # it really died mid-run
    resumed = subprocess.run(torchrun_cmd("run", *args, f"output.dir={out}", "--resume"), cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, ref)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r.get("member"), r.get("method"), r["epoch"]) for r in lines]
    assert len(keys) == len(set(keys))                # nothing logged twice after the resume


def test_sigterm_checkpoints_exits_3_and_resumes(tmp_path):
    args = [*QUICK, "train.epochs=40", "finetune.epochs=2", "fusion.methods=[nt]"]
    ref = tmp_path / "ref"
    assert ntdist("run", *args, f"output.dir={ref}").returncode == 0
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ntdist", "run", *args, f"output.dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "member0.state.safetensors", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    assert "preempted" in err and "--resume" in err
    assert ntdist("run", *args, f"output.dir={out}", "--resume").returncode == 0
    assert_same_run(out, ref)


def test_same_config_gives_same_results(tmp_path):
    args = [*QUICK, "train.epochs=3", "finetune.epochs=1"]
    for name in ("a", "b"):
        assert ntdist("run", *args, f"output.dir={tmp_path / name}").returncode == 0
    assert accuracies(tmp_path / "a") == accuracies(tmp_path / "b")


class Evil:
    """Unpickling this writes a marker file: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    proc = ntdist("run", *QUICK, "train.epochs=2", "finetune.epochs=1", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def snapshot(root):
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for p in (os.path.join(d, f) for f in files)}


def _cases(tmp, done):
    ck = done / "checkpoints"
    garbage, truncated, evil = tmp / "garbage.safetensors", tmp / "trunc.safetensors", tmp / "evil.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated.write_bytes((ck / "member0.safetensors").read_bytes()[:200])
    evil.write_bytes(pickle.dumps(Evil(str(tmp / "pwned"))))
    wide = tmp / "wide"
    # members may differ in width, not in depth
    assert ntdist("run", *QUICK, "train.epochs=1", "finetune.epochs=0", "model.kwargs.depth=3",
                  f"output.dir={wide}").returncode == 0
    afile = tmp / "plainfile"
    afile.write_text("x")
    binary, bomb, dup, foreign = tmp / "binary.yaml", tmp / "bomb.yaml", tmp / "dup.yaml", tmp / "foreign"
    binary.write_bytes(bytes(range(256)))
    bomb.write_text("model:\n  kwargs:\n    a: &a [x, x, x, x, x, x, x, x, x]\n    b: &b [*a, *a, *a, *a, *a, *a]\n")
    dup.write_text("train:\n  epochs: 3\n  epochs: 5\n")
    foreign.mkdir()
    (foreign / "config.yaml").write_text("mine\n")
    members = (str(ck / "member0.safetensors"), str(ck / "member1.safetensors"))
    retyped = tmp / "retyped.safetensors"      # float32 weights relabelled int32: same bytes, another header
    with safe_open(members[0], framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v.view(torch.int32) if k.endswith("weight") else v for k, v in tensors.items()}
    save_file(tensors, str(retyped), metadata=meta)
    def run(*a):
        new_dir = () if any(x.startswith("output.dir=") for x in a) else (f"output.dir={tmp / f'new{next(fresh)}'}",)
        return ("run", *QUICK, "train.epochs=1", "finetune.epochs=1", *new_dir, *a)

    fresh = iter(range(100))
    env_ranks = lambda size, port: {"RANK": "0", "WORLD_SIZE": str(size), "LOCAL_RANK": "0",  # noqa: E731
                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [
        ("unknown key", run("train.epochz=3"), None, "did you mean 'train.epochs'"),
        ("unknown section", run("trian.epochs=3"), None, "did you mean 'train'"),
        ("wrong type", run("train.epochs=ten"), None, "expects int"),
        ("negative epochs", run("train.epochs=-2"), None, "must be >= 0"),
        ("k below 2", run("fusion.k=1"), None, "at least 2"),
        ("unknown method", run("fusion.methods=[nt,avgg]"), None, "did you mean 'avg'"),
        ("unknown model", run("model.name=mlpp"), None, "did you mean 'mlp'"),
        ("bad model kwargs", run("model.kwargs.widht=3"), None, "model.kwargs"),
        ("unknown dataset", run("data.name=mnsit"), None, "did you mean 'mnist'"),
        ("missing dataset root", run("data.name=cifar10", f"data.root={tmp / 'nothing'}"), None,
         "cifar-10-batches-py"),
        ("empty dataset", run("data.name=synthetic", "data.synthetic_samples=0"), None, "empty split"),
        ("bad override", run("train.epochs"), None, "key=value"),
        ("missing config", ("run", "configs/nope.yaml"), None, "not found"),
        ("non-empty run dir", run(f"output.dir={done}"), None, "--resume"),
        ("unwritable output dir", run(f"output.dir={afile}/sub"), None, "cannot write"),
        ("NaN loss", run("train.lr=1e6"), None, "member training of member 0 at epoch 1"),
        ("world size vs k", run(), env_ranks(3, free_port()), "3 % 2 = 1"),
        ("port in use", run(), "PORT_IN_USE", "port"),
        ("resume with other architecture", run(f"output.dir={done}", "model.kwargs.width=8", "--resume"), None,
         "differs"),
        ("fuse one checkpoint", ("fuse", "-o", str(tmp / "f.safetensors"), str(ck / "member0.safetensors")), None,
         "at least 2"),
        ("fuse garbage", ("fuse", "-o", str(tmp / "f.safetensors"), str(garbage), str(ck / "member0.safetensors")),
         None, "not a readable safetensors"),
        ("fuse truncated", ("fuse", "-o", str(tmp / "f.safetensors"), str(truncated), str(ck / "member1.safetensors")),
         None, "safetensors"),
        ("fuse different architectures", ("fuse", "-o", str(tmp / "f.safetensors"), str(ck / "member0.safetensors"),
                                          str(wide / "checkpoints" / "member0.safetensors")), None, "one architecture"),
        ("fuse width too large", ("fuse", "--width", "1000", "-o", str(tmp / "f.safetensors"),
                                  str(ck / "member0.safetensors"), str(ck / "member1.safetensors")), None, "width"),
        ("fuse pickle", ("fuse", "-o", str(tmp / "f.safetensors"), str(evil), str(ck / "member0.safetensors")), None,
         "never loads pickles"),
        ("config is a folder", ("run", str(tmp)), None, "is a folder"),
        ("binary config", ("run", str(binary)), None, "UTF-8"),
        ("endless config", ("run", "/dev/zero"), None, "not a regular file"),
        ("alias bomb", ("run", str(bomb)), None, "alias"),
        ("duplicate key", ("run", str(dup)), None, "appears twice"),
        ("keep_ratio 0", run("fusion.keep_ratio=0"), None, "keep_ratio"),
        ("width 0", run("fusion.width=0"), None, "fusion.width"),
        ("model width 0", run("model.kwargs.width=0"), None, "width >= 1"),
        ("missing deepspeed config", run("finetune.deepspeed_config=nothing.json"), None, "deepspeed_config"),
        ("empty output.dir", run("output.dir="), None, "output.dir is empty"),
        ("resume and overwrite", run(f"output.dir={done}", "--resume", "--overwrite"), None, "contradict"),
        ("resume a foreign folder", run(f"output.dir={foreign}", "--resume"), None, "not written by ntdist"),
        ("bench width 0", ("bench", "fusion", "--widths", "0", "--out", str(tmp / "b.csv")), None, "--widths"),
        ("bench repeats 0", ("bench", "fusion", "--repeats", "0", "--out", str(tmp / "b.csv")), None, "--repeats"),
        ("bench out a folder", ("bench", "fusion", "--widths", "8", "--out", str(tmp)), None, "is a folder"),
        ("fuse over a file", ("fuse", "-o", str(afile), *members), None, "--force"),
        ("fuse relabelled dtypes", ("fuse", "-o", str(tmp / "f.safetensors"), str(retyped), members[1]), None,
         "as torch.int32"),
        ("fuse width 0", ("fuse", "--width", "0", "-o", str(tmp / "f.safetensors"), *members), None, "fusion.width"),
        ("fuse into unwritable place", ("fuse", "-o", str(afile / "f.safetensors"), str(ck / "member0.safetensors"),
                                        str(ck / "member1.safetensors")), None, "cannot write"),
    ]


def test_bad_input_table_one_line_nonzero_nothing_lost(tmp_path, finished):
    cases = _cases(tmp_path, finished)
    assert len(cases) >= 20
    before = snapshot(tmp_path), snapshot(finished)

    blockers = []      # "port in use": a listening socket holds the port the rank is told to use

    def env_of(env):
        if env != "PORT_IN_USE":
            return env
        blockers.append(socket.socket())
        blockers[-1].bind(("127.0.0.1", 0))
        blockers[-1].listen()
        return {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(blockers[-1].getsockname()[1])}

    try:       # one interpreter start, each command line in a forked child: what `python -m ntdist` does
        procs = ntdist_batch([(args, env_of(env)) for _, args, env, _ in cases], str(tmp_path))
    finally:
        for blocker in blockers:
            blocker.close()
    for (name, _, _, words), proc in zip(cases, procs):
        err = proc.stderr.strip()
        assert proc.returncode != 0, name
        assert "Traceback" not in err, (name, err[-1500:])
        assert len(err.splitlines()) == 1 and err.startswith("ntdist: error:"), (name, err[-1500:])
        assert words in err, (name, err)
    after = snapshot(tmp_path), snapshot(finished)
    for old, new in zip(before, after):
        assert {p: new.get(p) for p in old} == old   # every file that existed is still there, unchanged
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "f.safetensors").exists() and not (tmp_path / "b.csv").exists()


def test_debug_shows_the_traceback():
    proc = ntdist("--debug", "run", "configs/quickstart.yaml", "train.epochz=1")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_resume_refuses_a_pickle_in_place_of_a_checkpoint(tmp_path, finished):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    marker = tmp_path / "pwned"
    (run / "checkpoints" / "member0.safetensors").write_bytes(pickle.dumps(Evil(str(marker))))
    (run / "results.json").unlink()
    proc = ntdist("run", *QUICK, "train.epochs=2", "finetune.epochs=1", f"output.dir={run}", "--resume")
    assert proc.returncode == 2 and "never loads pickles" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def test_torchrun_restarts_a_dead_rank_and_the_job_resumes(tmp_path, reference):
    ref, args = reference
    out = tmp_path / "run"
    cmd = torchrun_cmd("run", *args, f"output.dir={out}")
    cmd.insert(3, "--max-restarts=1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(out / "checkpoints" / "member1.state.safetensors", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)   # one rank dies mid-training
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "elastic restart 1: resuming" in log
    assert_same_run(out, ref)

