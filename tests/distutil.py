"""Spawning small gloo worlds for tests: free ports, hard time-outs, failures surfaced.

`spawn(fn, nprocs, *args)` runs `fn(rank, *args)` in `nprocs` fresh processes that
see a complete torchrun-style environment, so `init_world()` joins one world.
"""

import multiprocessing as mp
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
