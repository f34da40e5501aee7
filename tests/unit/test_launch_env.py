"""What ntdist reads from and exports to the launchers' environment: CPU threads, the engines' variables.

Run: .venv/bin/python -m pytest tests/unit/test_launch_env.py
"""

import pytest
import torch

from ntdist.distributed.launchers import cpu_threads, usable_cpus
from ntdist.distributed.world import DistributedConfig, World, export_engine_variables, init_world
from ntdist.errors import UserError

SRUN = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0",
        "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_JOB_ID": "41"}


def test_thread_count_follows_the_setting_then_omp_then_slurm_then_the_usable_cores():
    assert cpu_threads({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "5"}, 1, configured=2) == 2
    assert cpu_threads({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "5"}, 1) == 3
    assert cpu_threads({"SLURM_CPUS_PER_TASK": "5"}, 4) == 5           # per task: not divided by local ranks
    assert cpu_threads({}, 1) == usable_cpus() and cpu_threads({}, 10 ** 6) == 1
    with pytest.raises(UserError, match="OMP_NUM_THREADS='two' is not a positive whole number"):
        cpu_threads({"OMP_NUM_THREADS": "two"}, 1)


def test_a_slurm_job_sets_torchs_thread_count():
    before = torch.get_num_threads()
    try:
        world = init_world(DistributedConfig(), env=dict(SRUN, SLURM_CPUS_PER_TASK="3"))
        assert world.launcher == "slurm" and world.size == 1
        assert world.threads == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_engine_variables_are_exported_for_a_launcher_that_sets_none():
    environ = {"OMPI_COMM_WORLD_RANK": "3"}   # what mpirun gives: none of torchrun's names
    world = World(rank=3, local_rank=1, size=4, local_size=2, launcher="mpi", master_addr="node07",
                  master_port=29511, threads=6)
    export_engine_variables(world, environ)
    assert [environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["3", "4", "1", "2"]
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"], environ["OMP_NUM_THREADS"]) == ("node07", "29511", "6")
    kept = {"OMP_NUM_THREADS": "2"}   # the job's own thread count stays
    export_engine_variables(world, kept)
    assert kept["OMP_NUM_THREADS"] == "2" and kept["RANK"] == "3"


def test_a_rank_variable_that_contradicts_the_launcher_is_refused():
    world = World(rank=1, size=2, launcher="slurm", master_addr="node07", master_port=29511)
    with pytest.raises(UserError, match="RANK=5 in the environment, but the slurm launcher makes this process RANK=1"):
        export_engine_variables(world, {"RANK": "5"})


def test_timeouts_must_be_positive():
    for name in ("timeout_s", "rendezvous_timeout_s", "wait_timeout_s", "heartbeat_timeout_s"):
        with pytest.raises(UserError, match=rf"distributed.{name} must be a number of seconds in \(0, "):
            DistributedConfig(**{name: 0})
