"""Process groups: the member groups of one run are destroyed when its members are trained, so the
number of live groups stays the same from one sweep point to the next.

Run: .venv/bin/python -m pytest tests/multiproc/test_groups.py
"""

import json
import os

import torch.distributed as dist

from helpers import make_run, spawn
from ntdist.distributed.world import DistributedConfig, init_world, shutdown

POINT = ["fusion.k=2", "model.kwargs.width=8", "model.kwargs.depth=1", "train.epochs=1"]


def _live_groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def _two_points(rank, out):
    from ntdist.pipeline import train_stage
    world = init_world(DistributedConfig(threads_per_rank=1))
    counts = [_live_groups()]
    for point in range(2):   # what a sweep does: one run after another in the same world
        run = make_run(os.path.join(out, f"point{point}"), *POINT, world=world)
        assert run.layout.group_size == 2   # 4 ranks, 2 members: each member trained by a group of 2
        held = train_stage(run)
        run.rundir.release()
        counts.append(_live_groups())
        assert len(held) == (1 if rank in (0, 2) else 0)
    with open(os.path.join(out, f"groups{rank}.json"), "w") as f:
        json.dump(counts, f)
    shutdown(world)


def test_member_groups_do_not_accumulate_across_sweep_points(tmp_path):
    spawn(_two_points, 4, str(tmp_path), timeout=240)
    for rank in range(4):
        counts = json.loads((tmp_path / f"groups{rank}.json").read_text())
        assert counts[0] >= 3 and counts == [counts[0]] * 3, (rank, counts)   # default, wait, heartbeat groups
