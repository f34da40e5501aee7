"""Shared test helpers: the repository root, running the CLI, small gloo worlds, a Run for one process.

`spawn(fn, nprocs, *args)` runs `fn(rank, *args)` in `nprocs` fresh processes that
see a complete torchrun-style environment, so `init_world()` joins one world.
Not a test file: the tiers under tests/ import it (tests/conftest.py puts tests/ on the path).
"""

import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn as nn

from ntdist.distributed.launchers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["configs/quickstart.yaml", "distributed.threads_per_rank=1", "finetune.control=false"]   # a short run


def ntdist(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m ntdist ARGS` from the repository root; returns the finished process."""
    return subprocess.run([sys.executable, "-m", "ntdist", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else dict(os.environ, **env))


def ntdist_batch(cases, tmp) -> list:
    """Run many `ntdist` command lines, each (args, env or None), in one `tests/cli_batch.py` process (one
    interpreter start, a forked child per command line); returns their finished processes' codes and output."""
    import json
    import types
    spec, results = os.path.join(tmp, "cli_cases.json"), os.path.join(tmp, "cli_results.json")
    with open(spec, "w") as f:
        json.dump([{"args": [str(a) for a in args], "env": env or {}} for args, env in cases], f)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_batch.py"), spec, results], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(results) as f:
        return [types.SimpleNamespace(**r) for r in json.load(f)]


def acceptance_rows(stdout: str) -> dict:
    """The table an acceptance script (benchmarks/gpu_acceptance*.sh) prints: check -> (result, figures)."""
    lines = stdout.splitlines()
    start = lines.index("| check | result | figures |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        name, result, figures = [cell.strip() for cell in line.strip("|").split(" | ", 2)]
        rows[name] = (result, figures)
    return rows


def wait_for(path, proc, timeout=120):
    """Wait until `path` exists; fail if `proc` ends first or `timeout` seconds pass."""
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"run ended before {path} appeared"
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


def torchrun_cmd(*args, nproc: int = 2) -> list:
    """The command line of `torchrun --nproc_per_node=N -m ntdist ARGS` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", "ntdist", *args]


def write_cifar(root, folder, files, meta_name, meta_key, label_key, classes):
    """CIFAR-format pickles under root/folder: `files` are (name, samples) pairs of random images."""
    import pickle

    import numpy as np
    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in files:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, n).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / meta_name).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))


def randomise_bn(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm layer (in place), so that
    exactness tests mean something."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def make_run(out_dir, *overrides, world=None, resume=False):
    """A `Run` of the default config (digits, MLP) with `overrides`, its run directory prepared (and locked
    until `run.rundir.release()`)."""
    from ntdist.config import load_config
    from ntdist.distributed.world import World
    from ntdist.stages.context import make_run as make

    cfg = load_config(None, [f"output.dir={out_dir}", *overrides])
    run = make(cfg, world or World(), resume)
    run.rundir.prepare(resume=resume, overwrite=not resume)
    run.world.barrier()   # rank 0 has created the directory before any rank writes into it
    return run


def _entry(fn, rank, nprocs, port, args, errors):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        fn(rank, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


def spawn(fn, nprocs: int, *args, timeout: float = 120.0) -> None:
    """Run `fn(rank, *args)` on `nprocs` ranks; raise if any rank fails or the world overruns `timeout`."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, nprocs, port, args, errors)) for r in range(nprocs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    if alive:
        raise TimeoutError(f"{len(alive)} of {nprocs} ranks still running after {timeout} s")
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        detail = errors.get(timeout=5) if not errors.empty() else (None, "no traceback")
        raise RuntimeError(f"ranks exited with {failed}; rank {detail[0]}:\n{detail[1]}")


def digits_tensors(split: str):
    """(inputs, labels) of a split of ntdist's default data (digits, [N, 1, 8, 8]), as plain tensors."""
    from ntdist.data import DataConfig, load_splits
    data = getattr(load_splits(DataConfig()), split)
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor([int(data[i][1]) for i in range(len(data))])


def train_plain(model: nn.Module, x, y, seed: int, steps: int, lr: float = 0.05, batch: int = 64) -> nn.Module:
    """Train `model` with a plain torch loop (SGD with momentum on random batches), as a script of one's own
    would, outside ntdist; returns it in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def plain_accuracy(model: nn.Module, x, y) -> float:
    return (model.eval()(x).argmax(1) == y).double().mean().item()
