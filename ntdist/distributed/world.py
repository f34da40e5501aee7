"""The one place that reads launcher environment variables and sets up torch.distributed.

`init_world(cfg)` detects how ntdist was started and returns a frozen `World`:

1. torchrun / torchelastic / accelerate: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT all set;
2. SLURM `srun` without torchrun: SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID,
   master address from the first host of SLURM_STEP_NODELIST / SLURM_NODELIST;
3. MPI: OMPI_COMM_WORLD_* (checked before SLURM, whose variables mpirun's daemons inherit on a
   cluster) or PMI_*; rank 0 shares its address and a free port through mpi4py;
4. otherwise one process.

Backend nccl where CUDA is present, gloo otherwise; device cuda:LOCAL_RANK or cpu.
Everything else receives the `World` and never reads `os.environ`.
"""

import datetime
import json
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ntdist.distributed.heartbeat import Heartbeat
from ntdist.errors import EXIT_USAGE, PeerLostError, UserError, check_choice
from ntdist.options import opt

BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class DistributedConfig:
    """Process-group settings."""

    backend: str = opt("auto", "auto (nccl with CUDA, else gloo) | nccl | gloo")
    timeout_s: float = opt(300.0, "seconds a collective may wait for a peer before the job fails")
    port: Optional[int] = opt(None, "rendezvous port for SLURM/MPI launches (default: derived from the job id / a free port)")
    threads_per_rank: Optional[int] = opt(None, "torch CPU threads per rank (default: cores / local ranks)")

    def __post_init__(self):
        check_choice(self.backend, BACKENDS, "distributed.backend")
        if not self.timeout_s > 0:
            raise UserError(f"distributed.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class World:
    """Who this process is in the job. `size == 1` means no process group exists."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    launcher: str = "single"
    host: str = socket.gethostname()
    restart: int = 0
    """how often an elastic launcher (torchrun --max-restarts) has restarted this job"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce_sum(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """Sum a CPU tensor over all ranks (of `group`, default all; a no-op for one process)."""
        if self.size == 1:
            return tensor
        moved = tensor.to(self.device)
        guarded(dist.all_reduce, moved, op=dist.ReduceOp.SUM, group=group)
        return moved.cpu()

    def any(self, flag: bool, group=None) -> bool:
        """True on every rank (of `group`, default all) if `flag` is true on any of them."""
        if self.size == 1:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        guarded(dist.all_reduce, value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        if self.size > 1:
            guarded(dist.barrier)

    def print0(self, *args, **kwargs) -> None:
        """ntdist's one rank-0 logger: `print` (flushed) on rank 0, nothing elsewhere."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


def guarded(fn, *args, **kwargs):
    """Run a collective; turn a dead or timed-out peer into a `PeerLostError` naming this rank."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as err:
        raise peer_lost(err) from err


_PEER_SIGNS = ("connection reset", "connection closed", "broken pipe", "gloo", "nccl", "timed out", "peer")


def is_peer_failure(err: BaseException) -> bool:
    """Whether an exception raised inside a collective (DDP's gradient all-reduce included) means a lost peer."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(sign in str(err).lower() for sign in _PEER_SIGNS))


def peer_lost(err: BaseException) -> PeerLostError:
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PeerLostError(f"rank {rank}: a collective failed, so a peer rank died or timed out ({first}); "
                         "check the other ranks' logs, then restart with --resume")


JOIN_GRACE_S = 10.0   # beyond distributed.timeout_s, before a rank that cannot join gives up

def first_slurm_host(nodelist: str) -> str:
    """'gpu[03-05,09],cpu1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot parse SLURM node list '{nodelist}'; set MASTER_ADDR explicitly")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job without MASTER_PORT or distributed.port: 20000 + job id % 20000."""
    return 20000 + job_id % 20000


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _from_torchrun(env):
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not all(k in env for k in keys):
        return None
    local_size = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    return "torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), local_size, \
        env["MASTER_ADDR"], int(env["MASTER_PORT"])


def _from_slurm(env, cfg: DistributedConfig):
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:   # srun sets a step id; the batch script does not
        return None
    size = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", "localhost"))
    addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
    port = cfg.port or int(env.get("MASTER_PORT", 0)) or slurm_port(int(env.get("SLURM_JOB_ID", "0")))
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1"))
    local_size = int(re.match(r"\d+", tasks_per_node).group())
    return "slurm", int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", 0)), local_size, addr, port


def _from_mpi(env, cfg: DistributedConfig):
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local, local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        rank, size = int(env["PMI_RANK"]), int(env["PMI_SIZE"])
        local, local_size = int(env.get("MPI_LOCALRANKID", 0)), int(env.get("MPI_LOCALNRANKS", 1))
    else:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("launched under MPI but mpi4py is missing; install it with: pip install 'ntdist[mpi]'") from None
    comm = MPI.COMM_WORLD
    addr, port = comm.bcast((socket.gethostname(), cfg.port or free_port()) if comm.Get_rank() == 0 else None, root=0)
    return "mpi", rank, size, local, local_size, addr, port


def detect(env=None, cfg: Optional[DistributedConfig] = None):
    """(launcher, rank, size, local_rank, local_size, master_addr, master_port) of this process."""
    env = os.environ if env is None else env
    cfg = cfg or DistributedConfig()
    # Open MPI's own variables come before SLURM's: on several nodes mpirun starts its daemons with
    # srun, so its ranks also see SLURM_PROCID. PMI_* (which srun --mpi=pmi2 sets too) comes after.
    ompi = _from_mpi(env, cfg) if "OMPI_COMM_WORLD_RANK" in env else None
    return _from_torchrun(env) or ompi or _from_slurm(env, cfg) or _from_mpi(env, cfg) or \
        ("single", 0, 1, 0, 1, None, None)


def init_world(cfg: Optional[DistributedConfig] = None, env=None, check_size=None) -> World:
    """Detect the launcher, join the process group (if more than one process) and return the `World`.

    `check_size(world_size)` may refuse the layout before any rank waits for the others.
    """
    cfg = cfg or DistributedConfig()
    launcher, rank, size, local_rank, local_size, addr, port = detect(env, cfg)
    if check_size:
        check_size(size)
    cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise UserError("distributed.backend=nccl needs CUDA, which this machine lacks; use distributed.backend=gloo")
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    threads = cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // max(local_size, 1))
    torch.set_num_threads(threads)
    env = os.environ if env is None else env
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if size == 1:
        return World(device=device, launcher=launcher, restart=restart)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        joined = _rendezvous_watchdog(rank, addr, port, cfg.timeout_s)
        try:
            # torchrun's agent keeps one store for the whole job: a key space per elastic restart keeps a
            # restarted rank from reading the addresses of the ranks that died.
            agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            store = dist.TCPStore(addr, port, size, is_master=rank == 0 and not agent_store, timeout=timeout,
                                  wait_for_workers=False)
            _check_same_job(store, rank, size, env, f"{addr}:{port}", f"ntdist/job{restart}")
            store = dist.PrefixStore(f"ntdist/attempt{restart}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
        except (RuntimeError, dist.DistNetworkError) as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"rank {rank} could not join the process group at {addr}:{port} ({first}); "
                            "is the port in use or the master unreachable? set distributed.port or MASTER_PORT") from err
        finally:
            joined.set()
    Heartbeat.start(rank, cfg.timeout_s)
    return World(rank=rank, local_rank=local_rank, size=size, local_size=local_size, device=device,
                 backend=backend, launcher=launcher, restart=restart)


def _check_same_job(store, rank: int, size: int, env, where: str, key: str) -> None:
    """Refuse a store that belongs to another job (a port reused by a concurrent run)."""
    job = env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID") or ""
    mine = json.dumps({"size": size, "job": job}, sort_keys=True)
    if rank == 0:
        store.set(key, mine)
        return
    theirs = store.get(key).decode(errors="replace")
    if theirs != mine:
        raise UserError(f"rank {rank}: the process group at {where} belongs to another job ({theirs}, this rank "
                        f"expects {mine}); give each job its own port with distributed.port or MASTER_PORT")


def _rendezvous_watchdog(rank: int, addr, port, timeout_s: float) -> threading.Event:
    """Exit 2 if joining takes longer than the timeout: torch's store client waits without a deadline
    on a port held by a program that is not a TCPStore, and Python cannot interrupt that call."""
    joined = threading.Event()

    def watch():
        if not joined.wait(timeout_s + JOIN_GRACE_S):
            print(f"ntdist: error: rank {rank} could not join the process group at {addr}:{port} within "
                  f"distributed.timeout_s={timeout_s:g} s; is the port used by another program, or the master "
                  "unreachable? set distributed.port or MASTER_PORT", file=sys.stderr, flush=True)
            os._exit(EXIT_USAGE)

    threading.Thread(target=watch, name="ntdist-rendezvous", daemon=True).start()
    return joined


def ensure_process_group(world: World) -> None:
    """Give libraries (DeepSpeed) what they expect: a process group even for one process, and the
    torchrun-style variables, whichever launcher actually started the job."""
    for key, value in (("RANK", world.rank), ("LOCAL_RANK", world.local_rank), ("WORLD_SIZE", world.size),
                       ("LOCAL_WORLD_SIZE", world.local_size)):
        os.environ.setdefault(key, str(value))
    if world.size == 1 and not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def shutdown(world: World, clean: bool = True, failed: bool = False) -> None:
    """Stop the heartbeat and destroy the process group at exit (DeepSpeed and NCCL abort otherwise).

    After an error or a preemption (`clean=False`) there is no final barrier: the other ranks may
    never arrive. `failed` tells the peers' heartbeats that this rank ended with an error.
    """
    if dist.is_initialized():
        Heartbeat.stop(failed)
        if clean:
            dist.barrier()   # DeepSpeed aborts at exit unless every rank gets here before the group goes
        dist.destroy_process_group()


def gather_world_info(world: World) -> dict:
    """{"size", "launcher", "ranks": [{"rank", "host", "pid"}, ...]}: proof of who joined the job."""
    me = [{"rank": world.rank, "local_rank": world.local_rank, "host": world.host, "pid": os.getpid()}]
    if world.size > 1:
        ranks = [None] * world.size
        guarded(dist.all_gather_object, ranks, me)
        me = [r for part in ranks for r in part]
    return {"size": world.size, "launcher": world.launcher, "backend": world.backend, "device": str(world.device),
            "ranks": me}
