"""Separate timeouts: a rank that works alone longer than distributed.timeout_s is waited for (up to
distributed.wait_timeout_s), while a collective that waits too long still fails with a clear line.

Run: .venv/bin/python -m pytest tests/multiproc/test_timeouts.py
"""

import json
import os
import time

import torch

from helpers import make_run, spawn
from ntdist.distributed.world import DistributedConfig, init_world, shutdown
from ntdist.errors import EXIT_PEER_LOST, PeerLostError

SLOW_S = 3.0   # longer than the collective timeouts below (with a margin for a loaded machine), shorter than the waits


def _phases(rank, out):
    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=1.0, wait_timeout_s=6.0))
    seen = {}
    if rank == 1:
        time.sleep(SLOW_S)                 # a long step on one rank, then the wait before the next collective
    world.wait_for("a slow step")
    seen["sum_after_wait"] = world.reduce_sum(torch.tensor([rank + 1.0])).item()
    if rank == 1:
        time.sleep(SLOW_S + 6.0)           # beyond the wait timeout too
    try:
        world.wait_for("a step that never ends")
    except PeerLostError as err:
        seen["wait_error"] = (str(err), err.exit_code)
    if rank == 1:
        time.sleep(SLOW_S)                 # a collective without the wait: the old single timeout
    started = time.time()
    try:
        world.reduce_sum(torch.ones(1))
        seen["bare"] = "passed"
    except PeerLostError as err:
        seen["bare"] = f"failed after {time.time() - started:.1f} s: {err}"
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    shutdown(world, clean=False)


def test_a_slow_rank_is_waited_for_while_a_bare_collective_times_out(tmp_path):
    spawn(_phases, 2, str(tmp_path), timeout=90)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["sum_after_wait"] == 3.0   # waited 3 s with a 1 s collective timeout, then summed
    message, code = rank0["wait_error"]
    assert code == EXIT_PEER_LOST and "did not finish a step that never ends" in message
    assert "distributed.wait_timeout_s=6" in message and "\n" not in message
    assert rank0["bare"].startswith("failed after") and "peer" in rank0["bare"], rank0["bare"]
    assert float(rank0["bare"].split()[2]) < SLOW_S   # the 1 s collective timeout, not the wait timeout


def _slow(fn, seconds):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)
    return slow


def _slow_once(fn, seconds):
    calls = []

    def slow(*args, **kwargs):
        if not calls:
            calls.append(1)
            time.sleep(seconds)
        return fn(*args, **kwargs)
    return slow


def _pipeline_with_slow_rank0(rank, out):
    import ntdist.distributed.diagnostics as diagnostics
    import ntdist.distributed.tree as tree
    import ntdist.pipeline as pipeline
    if rank == 0:   # each step that rank 0 does alone lasts longer than the collective timeout
        pipeline.train_members = _slow(pipeline.train_members, 2 * SLOW_S)
        diagnostics.has_near_copy = _slow_once(diagnostics.has_near_copy, 2 * SLOW_S)   # its share of the check
        tree.fuse = _slow(tree.fuse, 2 * SLOW_S)
    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=2.5, wait_timeout_s=60))
    run = make_run(out, "fusion.k=3", "fusion.methods=[avg]", "train.epochs=1", "finetune.epochs=1",
                   "finetune.control=false", "model.kwargs.width=16", world=world)
    results = pipeline.run_stages(run)
    run.rundir.release()
    with open(os.path.join(out, f"post_fusion{rank}.json"), "w") as f:
        json.dump([results.fusion["avg"].post_fusion, results.diversity is not None], f)
    shutdown(world)


def test_the_pipeline_waits_for_a_rank_that_works_alone_longer_than_the_collective_timeout(tmp_path):
    out = tmp_path / "run"
    spawn(_pipeline_with_slow_rank0, 2, str(out), timeout=150)
    both = [json.loads((out / f"post_fusion{r}.json").read_text()) for r in range(2)]
    assert both[0] == both[1] and both[0][1] is True   # one fused model, the diversity check ran
