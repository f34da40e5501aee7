"""Fusion larger than memory: `ntdist fuse --lazy` on two wide MLPs under an address-space cap below their sum.

    python benchmarks/lazy_fuse.py DIR                    # members of about 1.5 GB each (width 6144, depth 10)
    python benchmarks/lazy_fuse.py DIR --width 1024 --depth 4 --method avg   # a quick try

Writes two seeded MLP members (input 3072, `--depth` hidden layers of `--width`) as ntdist
checkpoints into DIR, tensor by tensor (this script never holds a member either), then measures,
each in a child process with OMP_NUM_THREADS=1:

- `cp` of one member and of both (the disk's own speed for the bytes fusion reads and writes);
- the address space (VmSize) and peak RSS of a Python that has only imported ntdist (the baseline);
- `ntdist fuse --lazy` under `prlimit --as=BASELINE+CAP`, CAP one member's size by default, so the
  process can never hold both members: its wall time and peak RSS (getrusage of the child);
- the normal `ntdist fuse` under the same cap, which must fail (it loads every member).

An address-space cap, not a cgroup: cgroups are not writable here. It counts every mapping,
which is why `--lazy` reads tensors with positioned reads instead of mapping the files. Prints a
Markdown table (docs/PERFORMANCE.md, "Fusion larger than memory") and deletes DIR's files unless
--keep. Keep to one such measurement at a time: it writes three members' worth of files.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ntdist.models import ModelSpec, build_model  # noqa: E402
from ntdist.records.checkpoint import checkpoint_metadata  # noqa: E402
from ntdist.records.tensorfile import write_tensors  # noqa: E402

INPUT_DIM = 3072   # a CIFAR-sized input, as `ntdist bench fusion`'s MLPs
BASELINE = "import ntdist.cli; print(open('/proc/self/status').read().split('VmSize:')[1].split()[0])"


def write_member(path: str, kwargs: dict, seed: int) -> int:
    """A seeded MLP member written tensor by tensor (uniform init of nn.Linear's scale); its size in bytes."""
    with torch.device("meta"):
        shapes = {k: (v.dtype, tuple(v.shape)) for k, v in build_model("mlp", kwargs).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)

    def produce(name):
        dtype, shape = shapes[name]
        bound = 1.0 / (shape[1] if len(shape) > 1 else shape[0]) ** 0.5
        return (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * bound

    write_tensors(path, [(k, d, s) for k, (d, s) in shapes.items()], produce,
                  checkpoint_metadata(ModelSpec("mlp", kwargs, (INPUT_DIM,))))
    return os.path.getsize(path)


def child(cmd, cap_kb=None) -> dict:
    """Run `cmd` (under `prlimit --as` when `cap_kb`): its exit code, wall seconds, peak RSS (KiB, from its own
    rusage) and the last line it printed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if cap_kb is not None:
        cmd = ["prlimit", f"--as={cap_kb * 1024}", *cmd]
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = [line for line in out.read().splitlines() if "note:" not in line and "WARNING" not in line]
    return {"rc": proc.returncode, "seconds": seconds, "peak_kb": usage.ru_maxrss, "out": lines[-1:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="an empty folder on a disk with room for three members")
    parser.add_argument("--width", type=int, default=6144)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--method", default="nt", choices=["nt", "avg"])
    parser.add_argument("--cap", type=float, default=None, help="GB above the baseline (default: one member)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    kwargs = {"input_dim": INPUT_DIM, "width": args.width, "depth": args.depth, "num_classes": 10}
    members = [os.path.join(args.dir, f"member{i}.safetensors") for i in (0, 1)]
    fused = os.path.join(args.dir, "fused.safetensors")
    try:
        size = [write_member(p, kwargs, seed) for seed, p in enumerate(members)][0]
        cp_one = child(["cp", members[0], os.path.join(args.dir, "copy.safetensors")])
        os.remove(os.path.join(args.dir, "copy.safetensors"))
        os.makedirs(os.path.join(args.dir, "copy"), exist_ok=True)
        cp_two = child(["cp", *members, os.path.join(args.dir, "copy")])
        shutil.rmtree(os.path.join(args.dir, "copy"))
        base = child([sys.executable, "-c", BASELINE])
        base_vm_kb = int(base["out"][0])
        cap_kb = base_vm_kb + int((args.cap * 1e9 if args.cap else size) / 1024)
        fuse = [sys.executable, "-m", "ntdist", "fuse", *members, "-o", fused, "--method", args.method]
        lazy = child([*fuse, "--lazy"], cap_kb)
        if os.path.exists(fused):
            os.remove(fused)
        eager = child(fuse, cap_kb)
        rows = {"member size (GB)": size / 1e9, "cap above baseline (GB)": (cap_kb - base_vm_kb) * 1024 / 1e9,
                "baseline VmSize (GB)": base_vm_kb * 1024 / 1e9, "baseline peak RSS (GB)": base["peak_kb"] * 1024 / 1e9,
                "cp one member (s)": cp_one["seconds"], "cp both members (s)": cp_two["seconds"],
                "lazy: exit code": lazy["rc"], "lazy: wall (s)": lazy["seconds"],
                "lazy: peak RSS (GB)": lazy["peak_kb"] * 1024 / 1e9,
                "normal fuse under the cap: exit code": eager["rc"]}
        print(json.dumps({"kwargs": kwargs, "method": args.method, "lazy": lazy["out"], "eager": eager["out"]}))
        print("| measure | value |\n| --- | --- |")
        for key, value in rows.items():
            print(f"| {key} | {value:.2f} |" if isinstance(value, float) else f"| {key} | {value} |")
        return 0 if lazy["rc"] == 0 else 1
    finally:
        if not args.keep:
            for path in [*members, fused]:
                if os.path.exists(path):
                    os.remove(path)
            shutil.rmtree(os.path.join(args.dir, "copy"), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
