"""The CPU thread count ntdist picks when the job sets none: one thread for small work or a busy machine.

Run: .venv/bin/python -m pytest tests/unit/test_thread_default.py
"""

import torch
import torch.nn as nn

from ntdist.distributed.launchers import threads_asked
from ntdist.distributed.world import World
from ntdist.training.hardware import SERIAL_FLOPS, fit_threads, forward_flops, intra_op_threads

BIG = 100 * SERIAL_FLOPS


def test_small_work_runs_on_one_thread_even_on_idle_cores():
    assert intra_op_threads(load=0.0, cores=16, work=SERIAL_FLOPS / 2) == 1


def test_large_work_takes_the_cores_the_load_leaves_idle():
    assert intra_op_threads(load=0.0, cores=8, work=BIG) == 8
    assert intra_op_threads(load=3.0, cores=8, work=BIG) == 5
    assert intra_op_threads(load=0.4, cores=2, work=BIG) == 2
    assert intra_op_threads(load=1.0, cores=2, work=BIG) == 1


def test_a_busy_machine_gets_one_thread():
    assert intra_op_threads(load=14.0, cores=2, work=BIG) == 1
    assert intra_op_threads(load=40.0, cores=16, work=BIG) == 1


def test_the_demo_mlp_counts_as_small_work():
    mlp = lambda: nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    flops = forward_flops(mlp, (32, 40))
    assert flops == 2 * 32 * (40 * 64 + 64 * 64 + 64 * 10)
    assert flops < SERIAL_FLOPS


def test_only_a_thread_count_ntdist_chose_is_changed():
    assert threads_asked({"OMP_NUM_THREADS": "2"}) and threads_asked({}, configured=3)
    assert not threads_asked({})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tiny = lambda: nn.Linear(4, 2)
        assert fit_threads(World(threads=2, threads_chosen=False), tiny, (8, 4)) == 2
        assert fit_threads(World(threads=2, threads_chosen=True), tiny, (8, 4)) == 1
    finally:
        torch.set_num_threads(before)
