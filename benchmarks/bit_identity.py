"""Bit-identity check: do two versions of ntdist produce exactly the same runs?

    python bit_identity.py run REPO OUTDIR      # the runs below, with the ntdist package of REPO
    python bit_identity.py compare DIR_A DIR_B  # one line per run; exit 1 if anything differs

`run` executes the nine small runs in RUNS (1-2 minutes on 2 CPU cores) with cwd=REPO and
PYTHONPATH=REPO, so REPO's `ntdist` is the one imported, under the Python running this script
(use the project's virtual environment) with OMP_NUM_THREADS=1; each writes OUTDIR/<name>/ and
OUTDIR/<name>.log. `compare` walks both trees and requires the same files in each run, then
compares exactly: results.json, sweep.json, config.yaml and metrics.jsonl as parsed values (only
the keys in DROPPED are ignored), and every checkpoint (*.safetensors: the final checkpoints and
the training states *.state.safetensors), read as ntdist reads it (tensors as `model.*` and
`extra.*` in either checkpoint layout, JSON metadata under "ntdist" without the layout's own
fields): tensors byte for byte (dtype, shape and bits), metadata like the JSON files. Other files (report, plots, metrics.csv, the manifest) must exist on both
sides; their contents are not compared.

Run it twice on the same code first: identical output proves the runs deterministic.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

# Values that legitimately differ between two runs of the same code: wall-clock durations
# (results.json: wall_seconds, train_seconds, fuse_seconds; metrics and checkpoint histories:
# samples_per_s, a throughput), the process that ran a rank (results.json world.ranks[*]: host, pid)
# and the run directory's path (config.yaml: output.dir).
DROPPED = ("wall_seconds", "train_seconds", "fuse_seconds", "samples_per_s", "host", "pid", "dir")

QUICK = ["configs/quickstart.yaml", "train.epochs=2", "finetune.epochs=1"]
# name, ranks (2: torchrun on CPU/gloo), ntdist run arguments, expected exit code
RUNS = [
    ("quickstart", 1, ["configs/quickstart.yaml"], 0),
    ("iterative_k3", 1, QUICK + ["fusion.k=3", "fusion.schedule=iterative", "fusion.methods=[nt,avg,ot]"], 0),
    # a sweep of finetune.distill false/true over BatchNorm ResNets, BatchNorm re-estimated after fusion
    ("resnet_bn_distill", 1, ["configs/paper/compare_resnet18_digits.yaml", "seeds=[0]", "train.epochs=2",
                              "finetune.epochs=1", "fusion.bn_reestimate=true"], 0),
    ("sync", 1, ["configs/sync_sgd.yaml", "train.epochs=2"], 0),
    ("seeds_vectorized", 1, QUICK + ["seeds=[0,1]", "train.vectorize=on"], 0),
    ("torchrun_k2", 2, QUICK, 0),
    ("torchrun_k3_distill", 2, QUICK + ["fusion.k=3", "fusion.methods=[nt,avg,ot]", "finetune.distill=true"], 0),
    ("torchrun_k4_dedup", 2, QUICK + ["fusion.k=4", "fusion.dedup=true"], 0),
    # step-level states, then SIGTERM inside member 1's second epoch: exit 3 (preempted), the .state files stay
    ("preempted_states", 1, QUICK + ["model.name=bit_identity:preempting_mlp", "model.kwargs.sigterm_at=130",
                                     "train.checkpoint_every_steps=10"], 3),
]


def preempting_mlp(input_dim: int, num_classes: int, width: int = 32, depth: int = 2, sigterm_at: int = 0):
    """An MLP that sends its own process SIGTERM at the `sigterm_at`-th training batch of the process
    (counted over all members), as a scheduler would: a preemption at a reproducible point."""
    import torch.nn as nn

    class PreemptingMLP(nn.Module):
        def __init__(self):
            super().__init__()
            dims = [input_dim] + [width] * depth
            layers = [nn.Flatten()]
            for a, b in zip(dims, dims[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.net = nn.Sequential(*layers, nn.Linear(dims[-1], num_classes))

        def forward(self, x):
            if self.training:
                _TRAIN_BATCHES[0] += 1
                if _TRAIN_BATCHES[0] == sigterm_at:
                    os.kill(os.getpid(), signal.SIGTERM)
            return self.net(x)
    return PreemptingMLP()


_TRAIN_BATCHES = [0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(repo: str, outdir: str) -> int:
    repo, outdir = os.path.abspath(repo), os.path.abspath(outdir)
    if os.path.isdir(outdir) and os.listdir(outdir):
        sys.exit(f"{outdir} is not empty; give a new directory")
    os.makedirs(outdir, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))   # for model.name=bit_identity:preempting_mlp
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, here]), OMP_NUM_THREADS="1")
    failed, start = 0, time.time()
    for name, ranks, args, expected in RUNS:
        launch = [sys.executable, "-m", "ntdist"] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}", "-m", "ntdist"]
        cmd = launch + ["run"] + args + [f"output.dir={os.path.join(outdir, name)}"]
        t0 = time.time()
        with open(os.path.join(outdir, f"{name}.log"), "w") as log:
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            rc = subprocess.run(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        ok = rc == expected
        failed += not ok
        print(f"{name:22s} exit {rc}{'' if ok else f' (expected {expected}): FAILED'}  {time.time() - t0:.1f} s",
              flush=True)
    print(f"{len(RUNS)} runs in {time.time() - start:.0f} s, {failed} failed")
    return 1 if failed else 0


def first_difference(a, b, where: str = ""):
    """The path of the first difference between two parsed JSON/YAML values (keys in DROPPED ignored), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys_a, keys_b = (set(d) - set(DROPPED) for d in (a, b))
        if keys_a != keys_b:
            return f"{where} keys {sorted(keys_a ^ keys_b)} on one side only"
        for key in a:
            if key in keys_a:
                found = first_difference(a[key], b[key], f"{where}.{key}")
                if found:
                    return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where} length {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if type(a) is type(b) and a == b else f"{where}: {a!r} != {b!r}"


LAYOUT_FIELDS = ("format", "extra", "input_shape")   # how a checkpoint's layout is recorded, not what it holds


def read_checkpoint(path: str):
    """(metadata, {key: tensor}) of a checkpoint or state file, read as ntdist reads them (no unpickling).

    Both layouts are seen under format 1's names (`model.<key>`, `extra.<name>`; format 2 stores the model
    under its own keys and lists its extras), and the metadata without LAYOUT_FIELDS, so runs of versions
    on either side of the format change compare."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta, tensors = json.loads((f.metadata() or {}).get("ntdist", "null")), {k: f.get_tensor(k) for k in f.keys()}
    if isinstance(meta, dict):
        if meta.get("format", 1) >= 2:
            listed = set(meta.get("extra") or ())
            tensors = {(k if k in listed else f"model.{k}"): v for k, v in tensors.items()}
        meta = {k: v for k, v in meta.items() if k not in LAYOUT_FIELDS}
    return meta, tensors


def same_bits(x, y) -> bool:
    import torch
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def compare_file(path_a: str, path_b: str):
    """The first difference between two files of a run, or None (files of other kinds: not compared)."""
    name = os.path.basename(path_a)
    if name.endswith((".safetensors", ".state")):
        (meta_a, tensors_a), (meta_b, tensors_b) = read_checkpoint(path_a), read_checkpoint(path_b)
        if set(tensors_a) != set(tensors_b):
            return f"tensors {sorted(set(tensors_a) ^ set(tensors_b))} on one side only"
        bad = next((k for k in tensors_a if not same_bits(tensors_a[k], tensors_b[k])), None)
        return f"tensor {bad}" if bad else first_difference(meta_a, meta_b, "metadata")
    if name in ("results.json", "sweep.json", "config.yaml", "metrics.jsonl"):
        import yaml

        def load(path):
            with open(path) as f:
                if name == "metrics.jsonl":
                    return [json.loads(line) for line in f if line.strip()]
                return yaml.safe_load(f) if name == "config.yaml" else json.load(f)
        return first_difference(load(path_a), load(path_b))
    return None


def files_of(run_dir: str) -> set:
    return {os.path.relpath(os.path.join(d, f), run_dir) for d, _, files in os.walk(run_dir) for f in files}


def compare_run(dir_a: str, dir_b: str):
    files_a, files_b = files_of(dir_a), files_of(dir_b)
    if files_a != files_b:
        return f"files on one side only: {sorted(files_a ^ files_b)}"
    for rel in sorted(files_a):
        found = compare_file(os.path.join(dir_a, rel), os.path.join(dir_b, rel))
        if found:
            return f"{rel}: {found}"
    return None


def compare_all(dir_a: str, dir_b: str) -> int:
    runs = sorted({d for top in (dir_a, dir_b) for d in os.listdir(top) if os.path.isdir(os.path.join(top, d))})
    differ = 0
    for name in runs:
        a, b = os.path.join(dir_a, name), os.path.join(dir_b, name)
        found = (f"only in {dir_a if os.path.isdir(a) else dir_b}" if not (os.path.isdir(a) and os.path.isdir(b))
                 else compare_run(a, b))
        differ += found is not None
        print(f"{name:22s} {'IDENTICAL' if found is None else 'DIFFERENT  ' + found}")
    print(f"{len(runs) - differ}/{len(runs)} runs identical")
    return 1 if differ or not runs else 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("run", "compare"):
        sys.exit(__doc__)
    sys.exit(run_all(*sys.argv[2:]) if sys.argv[1] == "run" else compare_all(*sys.argv[2:]))
