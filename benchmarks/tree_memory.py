"""Peak memory of the NT fusion tree across CPU ranks: one MLP member per rank, fused by `tree_fuse`.

    .venv/bin/python benchmarks/tree_memory.py [--ranks 4] [--width 4096] [--depth 6] [--input 3072]

The defaults give members of 96.5 M parameters (3072-4096x6-10, 386 MB in float32). Every rank builds its
member, resets its peak RSS (/proc/self/clear_refs), runs `tree_fuse` (gloo, one thread per rank) and
reports its resident memory before, its peak during the tree, the extra peak and its wall time. Run it
from the repository root; point PYTHONPATH at another checkout to measure that version's code.
"""

import argparse
import json
import multiprocessing as mp
import os
import socket
import tempfile
import time

MIB = 2 ** 20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _rank(rank: int, args, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(args.ranks), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(args.ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch

    from ntdist.distributed.tree import tree_fuse
    from ntdist.distributed.world import DistributedConfig, init_world, shutdown
    from ntdist.fusion import NTOptions
    from ntdist.models import ModelSpec

    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=1800))
    spec = ModelSpec("mlp", {"input_dim": args.input, "num_classes": 10, "width": args.width, "depth": args.depth})
    torch.manual_seed(rank)
    member = spec.build()
    params = sum(p.numel() for p in member.parameters())
    world.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, start = _status("VmRSS"), time.perf_counter()
    fused = tree_fuse(world, {rank: member}, list(range(args.ranks)), spec.build, NTOptions(),
                      example_inputs=torch.randn(2, args.input))
    seconds, peak = time.perf_counter() - start, _status("VmHWM")
    assert sum(p.numel() for p in fused.parameters()) == params
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "params": params, "rss_before_mib": before / MIB, "peak_mib": peak / MIB,
                   "extra_peak_mib": (peak - before) / MIB, "seconds": seconds}, f)
    shutdown(world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--input", type=int, default=3072)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, args, port, out)) for r in range(args.ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        rows = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(args.ranks)]
    model_mib = rows[0]["params"] * 4 / MIB
    print(f"member: {rows[0]['params'] / 1e6:.1f} M parameters, {model_mib:.0f} MiB float32; {args.ranks} ranks")
    print("rank  rss before MiB  peak MiB  extra peak MiB  extra / member  seconds")
    for row in rows:
        print(f"{row['rank']:>4}  {row['rss_before_mib']:>14.0f}  {row['peak_mib']:>8.0f}  "
              f"{row['extra_peak_mib']:>14.0f}  {row['extra_peak_mib'] / model_mib:>14.2f}  {row['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
