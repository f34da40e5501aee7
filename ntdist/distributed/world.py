"""Joining torch.distributed: the frozen `World` every other module receives, and its timeouts.

`init_world(cfg)` asks `launchers.detect()` how ntdist was started, joins the process group (nccl with
CUDA, else gloo; the device from `devices.training_device`) and returns a `World`, which everything else
receives.
Four timeouts, as ranks wait for different reasons: joining and the first barrier, a collective once
the ranks are in step, a rank waiting while another works alone (`World.wait_for`), the heartbeat.
"""

import dataclasses
import datetime
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ntdist.distributed.devices import check_own_gpu, comm_device, gpu_name, synchronize, training_device
from ntdist.distributed.heartbeat import Heartbeat
from ntdist.distributed.launchers import cpu_threads, detect, engine_variables, free_port, threads_asked
from ntdist.errors import EXIT_USAGE, PeerLostError, UserError, check_choice
from ntdist.options import opt

BACKENDS = ("auto", "nccl", "gloo")
TIMEOUTS = ("timeout_s", "rendezvous_timeout_s", "wait_timeout_s", "heartbeat_timeout_s")
MAX_TIMEOUT_S = 30 * 24 * 3600.0   # torch turns a timeout into a C++ duration: beyond a month is a typo, not a wait


@dataclass
class DistributedConfig:
    """Process-group settings."""

    backend: str = opt("auto", "auto (nccl with CUDA, else gloo) | nccl | gloo")
    timeout_s: float = opt(300.0, "seconds one collective may wait for a peer once the ranks are in step "
                                  "(DDP's gradient all-reduce, broadcasts, sends)")
    rendezvous_timeout_s: float = opt(600.0, "seconds for all ranks to start, join the process group and pass "
                                             "the first barrier")
    wait_timeout_s: float = opt(7200.0, "seconds a rank may wait while another works alone: uneven member "
                                        "training, the diversity check and fusion on rank 0, sync method none")
    heartbeat_timeout_s: float = opt(120.0, "seconds without a heartbeat from a peer before the job ends with exit 4 "
                                            "(a dead peer is noticed within seconds)")
    port: Optional[int] = opt(None, "rendezvous port for SLURM/MPI launches (default: derived from the job id / a free port)")
    threads_per_rank: Optional[int] = opt(None, "torch CPU threads per rank (default: OMP_NUM_THREADS, else "
                                                "SLURM_CPUS_PER_TASK, else usable cores / local ranks)")

    def __post_init__(self):
        check_choice(self.backend, BACKENDS, "distributed.backend")
        for name in TIMEOUTS:
            value = getattr(self, name)
            if not 0 < value <= MAX_TIMEOUT_S:   # NaN and inf fail here too
                raise UserError(f"distributed.{name} must be a number of seconds in (0, {MAX_TIMEOUT_S:.0f}] "
                                f"(at most 30 days), got {value}")
        if self.threads_per_rank is not None and self.threads_per_rank < 1:
            raise UserError(f"distributed.threads_per_rank must be >= 1, got {self.threads_per_rank}; "
                            "leave it unset to follow OMP_NUM_THREADS / SLURM_CPUS_PER_TASK")


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
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    threads: int = 1
    """torch CPU threads of this rank"""
    threads_chosen: bool = False
    """whether ntdist guessed `threads` (the job set none): `training.hardware.fit_threads` may lower them"""
    wait_timeout_s: float = 0.0
    waits: object = field(default=None, compare=False, repr=False)
    """the gloo group of `wait_for`, whose timeout is distributed.wait_timeout_s"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce_sum(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """Sum a CPU tensor over all ranks (of `group`, default all; a no-op for one process)."""
        if self.size == 1:
            return tensor
        moved = tensor.to(comm_device(self))
        guarded(dist.all_reduce, moved, op=dist.ReduceOp.SUM, group=group)
        return moved.cpu()

    def any(self, flag: bool, group=None) -> bool:
        """True on every rank (of `group`, default all) if `flag` is true on any of them."""
        if self.size == 1:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=comm_device(self))
        guarded(dist.all_reduce, value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        if self.size > 1:
            guarded(dist.barrier)

    def wait_for(self, what: str) -> None:
        """Wait until every rank gets here, for up to distributed.wait_timeout_s: called after work that
        some ranks do alone or longer than others (`what`), before the next collective, which then
        needs only distributed.timeout_s. A gloo barrier, so NCCL's watchdog never sees the wait. On a GPU
        the rank first waits for its queued kernels: a host-side barrier alone would let a rank arrive
        while its work still runs, and the next collective would then wait out that work under
        distributed.timeout_s."""
        if self.size == 1:
            return
        synchronize(self.device)
        try:
            dist.barrier(group=self.waits)
        except (RuntimeError, dist.DistBackendError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PeerLostError(
                f"rank {self.rank}: the other ranks did not finish {what} within distributed.wait_timeout_s="
                f"{self.wait_timeout_s:g} s, or one of them died ({first}); raise distributed.wait_timeout_s if that "
                "step is this slow, else check the other ranks' logs; then restart with --resume") from err

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


def on_comm_device(world: World, collective, tensor: torch.Tensor, *args, **kwargs) -> None:
    """`collective(tensor, ...)` in place (guarded), through a copy on `comm_device(world)` when `tensor` lives
    elsewhere (a GPU tensor under gloo)."""
    wire = tensor.to(comm_device(world))
    guarded(collective, wire, *args, **kwargs)
    if wire is not tensor:
        tensor.copy_(wire)


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


JOIN_GRACE_S = 10.0   # beyond distributed.rendezvous_timeout_s, before a rank that cannot join gives up


def init_world(cfg: Optional[DistributedConfig] = None, env=None, check_size=None) -> World:
    """Detect the launcher, join the process group (if more than one process) and return the `World`.

    `check_size(world_size)` may refuse the layout before any rank waits for the others.
    """
    cfg = cfg or DistributedConfig()
    env = os.environ if env is None else env
    launcher, rank, size, local_rank, local_size, addr, port = detect(env, cfg.port)
    if check_size:
        check_size(size)
    cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise UserError("distributed.backend=nccl needs CUDA, which this machine lacks; use distributed.backend=gloo")
    device = training_device(local_rank)
    if cuda:
        torch.cuda.set_device(device)
    threads = cpu_threads(env, local_size, cfg.threads_per_rank)
    chosen = not threads_asked(env, cfg.threads_per_rank)
    torch.set_num_threads(threads)
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if size == 1:
        return World(device=device, launcher=launcher, restart=restart, threads=threads, threads_chosen=chosen)
    world = World(rank=rank, local_rank=local_rank, size=size, local_size=local_size, device=device,
                  backend=backend, launcher=launcher, restart=restart, master_addr=addr, master_port=port,
                  threads=threads, threads_chosen=chosen, wait_timeout_s=cfg.wait_timeout_s)
    world = dataclasses.replace(world, waits=_join(cfg, env, world))
    Heartbeat.start(rank, cfg.heartbeat_timeout_s)
    return world


def _join(cfg: DistributedConfig, env, world: World):
    """Join the process group and pass the first barrier within distributed.rendezvous_timeout_s, then give
    the collectives distributed.timeout_s; returns the gloo group of `World.wait_for`."""
    rank, size, addr, port = world.rank, world.size, world.master_addr, world.master_port
    if dist.is_initialized():   # a library or a test joined already; only the wait group is missing
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.wait_timeout_s))
    if world.backend == "nccl":
        # On a collective timeout abort the communicator and raise in the calling thread (exit 4 with
        # ntdist's message) instead of tearing the process down from NCCL's watchdog.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    rendezvous = datetime.timedelta(seconds=cfg.rendezvous_timeout_s)
    joined = _rendezvous_watchdog(rank, addr, port, cfg.rendezvous_timeout_s)
    try:
        # torchrun's agent keeps one store for the whole job: a key space per elastic restart keeps a
        # restarted rank from reading the addresses of the ranks that died.
        agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(addr, port, size, is_master=rank == 0 and not agent_store, timeout=rendezvous,
                              wait_for_workers=False)
        _check_same_job(store, rank, size, env, f"{addr}:{port}", f"ntdist/job{world.restart}")
        store = dist.PrefixStore(f"ntdist/attempt{world.restart}", store)
        if world.backend == "nccl":
            check_own_gpu(store, rank, size, gpu_name(world.host, world.device))
        # device_id: NCCL creates its communicator now (every rank must arrive, within the rendezvous
        # timeout) and reuses it for point-to-point sends instead of building one per pair later.
        dist.init_process_group(world.backend, store=store, rank=rank, world_size=size, timeout=rendezvous,
                                device_id=world.device if world.backend == "nccl" else None)
        waits = dist.new_group(backend="gloo", timeout=rendezvous)
        dist.barrier(group=waits)   # the first barrier: every rank has started and joined
    except (RuntimeError, dist.DistNetworkError) as err:
        first = str(err).strip().splitlines()[0]
        if "duplicate gpu" in str(err).lower():   # NCCL's words for two ranks on one GPU
            raise UserError(f"rank {rank}: {first}; NCCL needs a GPU of its own for every rank: start at most as "
                            "many ranks per node as it has GPUs") from err
        raise UserError(f"rank {rank} could not join the process group at {addr}:{port} within "
                        f"distributed.rendezvous_timeout_s={cfg.rendezvous_timeout_s:g} s ({first}); is the port in "
                        "use, the master unreachable or a rank not started? set distributed.port or MASTER_PORT") from err
    finally:
        joined.set()
    dist.set_timeout(datetime.timedelta(seconds=cfg.timeout_s))          # collectives of the default group
    dist.set_timeout(datetime.timedelta(seconds=cfg.wait_timeout_s), waits)
    return waits


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
                  f"distributed.rendezvous_timeout_s={timeout_s:g} s; is the port used by another program, or the master "
                  "unreachable? set distributed.port or MASTER_PORT", file=sys.stderr, flush=True)
            os._exit(EXIT_USAGE)

    threading.Thread(target=watch, name="ntdist-rendezvous", daemon=True).start()
    return joined


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def export_engine_variables(world: World, environ=None) -> None:
    """Set the torchrun-style variables that Accelerate and DeepSpeed read in `environ` (os.environ),
    whichever launcher started the job (srun and mpirun set none of them). LOCAL_RANK becomes the index of
    this rank's GPU (`engine_local_rank`), also where torchrun set it to the local rank. A rank variable that
    the job already set to something else than ntdist found is a mistake in the job script; OMP_NUM_THREADS
    is only filled in."""
    environ = os.environ if environ is None else environ
    wanted = engine_variables(world.rank, world.size, engine_local_rank(world), world.local_size, world.master_addr,
                              world.master_port, world.threads)
    for key, value in wanted.items():
        have = environ.get(key)
        launcher_set = key == "LOCAL_RANK" and have == str(world.local_rank)   # replaced by the GPU's index
        if key in RANK_VARIABLES and have not in (None, value) and not launcher_set:
            raise UserError(f"{key}={have} in the environment, but the {world.launcher} launcher makes this process "
                            f"{key}={value}; unset {key} in the job script")
        if key == "OMP_NUM_THREADS":
            environ.setdefault(key, value)
        else:
            environ[key] = value


def engine_local_rank(world: World) -> int:
    """The LOCAL_RANK the engines get: the index of this rank's GPU, which accelerate's PartialState and DeepSpeed
    pass to `set_device`. It differs from the launcher's local rank when each task sees only its own GPU (srun
    --gpus-per-task=1 or --gpu-bind=single:1: every rank's device is cuda:0); on a CPU the local rank."""
    return (world.device.index or 0) if world.device.type == "cuda" else world.local_rank


def ensure_process_group(world: World) -> None:
    """Give libraries (DeepSpeed) what they expect: a process group even for one process (NCCL on a GPU, whose
    tensors gloo would refuse), and the torchrun-style variables, whichever launcher actually started the job."""
    export_engine_variables(world)
    if world.size == 1 and not dist.is_initialized():
        backend = "nccl" if world.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                device_id=world.device if backend == "nccl" else None)


def shutdown(world: World, clean: bool = True, failed: bool = False) -> None:
    """Stop the heartbeat and destroy the process group at exit (DeepSpeed and NCCL abort otherwise).

    After an error or a preemption (`clean=False`) there is no final barrier: the other ranks may
    never arrive. `failed` tells the peers' heartbeats that this rank ended with an error.
    """
    if dist.is_initialized():
        Heartbeat.stop(failed)
        if clean:   # DeepSpeed aborts at exit unless every rank gets here before the group goes; rank 0 may
            dist.barrier(group=world.waits)   # still be writing the report, hence the wait group's timeout
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
