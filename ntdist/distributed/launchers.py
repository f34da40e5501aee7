"""Reading the launchers' environment variables: who this process is, and how many CPU threads it may use.

`detect()` recognises, in this order:

1. torchrun / torchelastic / accelerate: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT all set;
2. Open MPI's OMPI_COMM_WORLD_* (before SLURM, whose variables mpirun's daemons inherit on a cluster);
3. SLURM `srun` without torchrun: SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID,
   master address from the first host of SLURM_STEP_NODELIST / SLURM_NODELIST;
4. other MPIs' PMI_*; under MPI rank 0 shares its address and a free port through mpi4py;
5. otherwise one process.

`cpu_threads()` honours what the job asked for (OMP_NUM_THREADS, SLURM_CPUS_PER_TASK) before
dividing the CPUs this process may run on among the ranks of its node. `engine_variables()` are the
torchrun-style variables that Accelerate and DeepSpeed read, whichever launcher started the job.
This module and `world` are the only readers of `os.environ` for launch settings.
"""

import os
import re
import socket
from typing import Dict, Optional

from ntdist.errors import UserError


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


def _from_slurm(env, port: Optional[int]):
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:   # srun sets a step id; the batch script does not
        return None
    size = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", "localhost"))
    addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
    port = port or int(env.get("MASTER_PORT", 0)) or slurm_port(int(env.get("SLURM_JOB_ID", "0")))
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1"))
    local_size = int(re.match(r"\d+", tasks_per_node).group())
    return "slurm", int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", 0)), local_size, addr, port


def _from_mpi(env, port: Optional[int]):
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
    addr, port = comm.bcast((socket.gethostname(), port or free_port()) if comm.Get_rank() == 0 else None, root=0)
    return "mpi", rank, size, local, local_size, addr, port


def detect(env=None, port: Optional[int] = None):
    """(launcher, rank, size, local_rank, local_size, master_addr, master_port) of this process."""
    env = os.environ if env is None else env
    # Open MPI's own variables come before SLURM's: on several nodes mpirun starts its daemons with
    # srun, so its ranks also see SLURM_PROCID. PMI_* (which srun --mpi=pmi2 sets too) comes after.
    ompi = _from_mpi(env, port) if "OMPI_COMM_WORLD_RANK" in env else None
    return _from_torchrun(env) or ompi or _from_slurm(env, port) or _from_mpi(env, port) or \
        ("single", 0, 1, 0, 1, None, None)


def _positive_int(env, key: str) -> Optional[int]:
    value = env.get(key, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{key}={value!r} is not a positive whole number of threads; set it to e.g. 4, or unset it")
    return int(value)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what SLURM's cgroup or taskset allow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not on Linux
        return os.cpu_count() or 1


def threads_asked(env, configured: Optional[int] = None) -> bool:
    """Whether the job says how many CPU threads a rank takes (distributed.threads_per_rank, OMP_NUM_THREADS or
    SLURM_CPUS_PER_TASK); when not, ntdist may lower its guess once it knows the work (training.hardware)."""
    return bool(configured or _positive_int(env, "OMP_NUM_THREADS") or _positive_int(env, "SLURM_CPUS_PER_TASK"))


def cpu_threads(env, local_size: int, configured: Optional[int] = None) -> int:
    """Torch CPU threads for one rank: `configured` (distributed.threads_per_rank), else OMP_NUM_THREADS,
    else SLURM_CPUS_PER_TASK, else this process's usable CPUs shared among the `local_size` ranks of its node."""
    if configured:
        return configured
    asked = _positive_int(env, "OMP_NUM_THREADS") or _positive_int(env, "SLURM_CPUS_PER_TASK")
    return asked or max(1, usable_cpus() // max(local_size, 1))


def engine_variables(rank: int, size: int, local_rank: int, local_size: int, addr: Optional[str],
                     port: Optional[int], threads: int) -> Dict[str, str]:
    """What Accelerate and DeepSpeed read to find the job's ranks (they know only torchrun's names).

    Without LOCAL_RANK Accelerate thinks it runs alone and DeepSpeed picks no device; without
    OMP_NUM_THREADS Accelerate sets its own thread count on the CPU.
    """
    out = {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": local_size,
           "OMP_NUM_THREADS": threads}
    if addr is not None:
        out.update(MASTER_ADDR=addr, MASTER_PORT=port)
    return {key: str(value) for key, value in out.items()}
