# A stand-in for `ntdist run` used to check that a launcher starts ranks that join one world.
#
# Usage (any launcher, as the `NTDIST` command of the wrappers in launch/):
#     NTDIST_PROBE_OUT=/tmp/probe NTDIST="python tests/launchers/probe_world.py" launch/torchrun.sh CONFIG a=1
#     python tests/launchers/probe_world.py [run CONFIG key=value ...]
#
# Each rank calls ntdist.distributed.world.init_world(), sums its rank + 1 over all ranks with an all-reduce,
# and writes rank-<RANK>.json into $NTDIST_PROBE_OUT (default: ./probe-out) holding rank, local rank,
# size, launcher, host, pid, the all-reduce result and the arguments it was given.
# Set NTDIST_PROBE_DEEPSPEED=1 to also initialise a tiny model with deepspeed.initialize() using the
# JSON config given by NTDIST_PROBE_DS_CONFIG (default: launch/deepspeed.json) and run one step.
# Set NTDIST_PROBE_WAIT_TERM=1 to imitate a preempted run: on the first attempt of a job
# (SLURM_RESTART_COUNT unset or 0) each rank writes ready-<RANK>.json, waits up to 100 s for SIGTERM,
# leaves the world and exits 3 (EXIT_PREEMPTED); a requeued attempt runs normally.
# Exits 0 when the all-reduce gives size*(size+1)/2, 1 otherwise.

import json
import os
import signal
import socket
import threading
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ntdist.distributed.launchers import detect  # noqa: E402
from ntdist.distributed.world import init_world, shutdown  # noqa: E402


def deepspeed_step(world) -> float:
    """One optimizer step of a tiny linear model through deepspeed.initialize; returns the loss."""
    import deepspeed

    config_path = os.environ.get("NTDIST_PROBE_DS_CONFIG", str(REPO / "launch" / "deepspeed.json"))
    with open(config_path) as handle:
        config = json.load(handle)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    batch = config.get("train_micro_batch_size_per_gpu", 4)
    inputs = torch.randn(batch, 8) + world.rank
    loss = engine(inputs).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return float(loss)


def wait_for_term(world, out: Path) -> int:
    """Imitate ntdist's preemption path: wait for SIGTERM, leave the world together, exit 3."""
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: term.set())
    ready = {"rank": world.rank, "pid": os.getpid(), "argv": sys.argv[1:]}
    (out / f"ready-{world.rank}.json").write_text(json.dumps(ready))
    got = term.wait(100)
    world.barrier()
    shutdown(world)
    print(f"probe rank {world.rank}: {'SIGTERM' if got else 'no SIGTERM'}, exiting 3", flush=True)
    return 3 if got else 1


def main() -> int:
    world = init_world()
    out = Path(os.environ.get("NTDIST_PROBE_OUT", "probe-out"))
    out.mkdir(parents=True, exist_ok=True)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if os.environ.get("NTDIST_PROBE_WAIT_TERM") == "1" and restarts == 0:
        return wait_for_term(world, out)
    total = world.reduce_sum(torch.tensor([float(world.rank + 1)]))
    expected = world.size * (world.size + 1) / 2
    record = {
        "rank": world.rank,
        "local_rank": world.local_rank,
        "size": world.size,
        "local_size": world.local_size,
        "launcher": world.launcher,
        "backend": world.backend,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "all_reduce": float(total.item()),
        "all_reduce_ok": float(total.item()) == expected,
        "argv": sys.argv[1:],
        "master_port": detect()[6],
        "restarts": restarts,
    }
    if os.environ.get("NTDIST_PROBE_DEEPSPEED") == "1":
        record["deepspeed_loss"] = deepspeed_step(world)
    (out / f"rank-{world.rank}.json").write_text(json.dumps(record, indent=1))
    world.barrier()
    shutdown(world)
    print(f"probe rank {world.rank}/{world.size} launcher={world.launcher} all_reduce={record['all_reduce']}", flush=True)
    return 0 if record["all_reduce_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
