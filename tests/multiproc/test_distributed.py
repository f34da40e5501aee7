"""Multi-process gloo tests of the distributed pipeline (CPU, free ports, hard time-outs).

Run: .venv/bin/python -m pytest tests/multiproc/test_distributed.py
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import torch
from torch.utils.data import Subset

from helpers import ROOT, free_port, make_run, spawn, torchrun_cmd, wait_for
from ntdist.distributed.layout import MemberLayout
from ntdist.distributed.world import DistributedConfig, init_world, shutdown
from ntdist.errors import UserError
from ntdist.models import ModelSpec
from ntdist.records.results import read_results
from ntdist.models.weights import build_member
from ntdist.stages.members import train_member

MLP = ["model.kwargs.width=16", "model.kwargs.depth=2", "train.epochs=2", "train.lr=0.05"]
SPEC = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 16, "depth": 2})


def _world():
    return init_world(DistributedConfig(threads_per_rank=1, timeout_s=60))


def _train_parallel(rank, out_dir):
    from ntdist.pipeline import train_stage
    world = _world()
    held = train_stage(make_run(out_dir, *MLP, world=world))
    for i, model in held.items():
        torch.save(model.state_dict(), os.path.join(out_dir, f"m{i}.pt"))
    shutdown(world)


def test_layout_arithmetic():
    assert MemberLayout(2, 4).group_ranks(1) == [2, 3]
    assert MemberLayout(3, 2).members_of(0) == [0, 1] and MemberLayout(3, 2).members_of(1) == [2]
    try:
        MemberLayout(2, 3)
    except UserError as err:
        assert "3 % 2 = 1" in str(err) and "2 or 4 ranks" in str(err)
    else:
        raise AssertionError("3 ranks for 2 members must be refused")


def test_members_on_two_ranks_equal_sequential_training(tmp_path):
    spawn(_train_parallel, 2, str(tmp_path))
    torch.set_num_threads(1)
    alone_run = make_run(tmp_path / "alone", *MLP)
    for i in range(2):
        alone = train_member(alone_run, i)[0]
        parallel = torch.load(tmp_path / f"m{i}.pt", weights_only=True)
        for key, value in alone.state_dict().items():
            assert torch.equal(value, parallel[key]), key


def _members(n):
    return [build_member(SPEC, 100 + i) for i in range(n)]


def _calibration():
    return torch.randn(300, 64, generator=torch.Generator().manual_seed(5))


def _tree(rank, out_dir, k, pruner="ntdist", repair=False):
    from ntdist.distributed.tree import tree_fuse
    from ntdist.fusion import NTOptions
    world = _world()
    layout = MemberLayout(k, world.size)
    members = _members(k)
    held = {i: members[i] for i in layout.held_by(rank)}
    x = torch.zeros(2, 64)
    sent = []
    fused = tree_fuse(world, held, layout.holders, SPEC.build, NTOptions(pruner=pruner), example_inputs=x, sent=sent,
                      calibration=_calibration() if repair else None)
    assert max(sent) <= 1, sent   # at most one model per rank per round
    torch.save(fused.state_dict(), os.path.join(out_dir, f"fused{rank}.pt"))
    shutdown(world)


def test_tree_fusion_on_ranks_equals_single_process_recursive(tmp_path):
    """k = 5 on 2 ranks (a rank holding several members), Torch-Pruning's pruner, and the repair. One member per
    rank on 4 ranks is the acceptance smoke's `nccl_tree` (tests/multiproc/test_gpu_acceptance_multi.py)."""
    from ntdist.fusion import fuse
    for k, nprocs, pruner, repair in ((5, 2, "ntdist", False), (3, 2, "torch_pruning", False), (3, 2, "ntdist", True)):
        spawn(_tree, nprocs, str(tmp_path), k, pruner, repair)
        expected = fuse(_members(k), method="nt", schedule="recursive", example_inputs=torch.zeros(2, 64),
                        calibration=_calibration() if repair else None)
        for rank in range(nprocs):
            got = torch.load(tmp_path / f"fused{rank}.pt", weights_only=True)
            for key, value in expected.state_dict().items():
                torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)


def _ddp(rank, out_dir, batch):
    from ntdist.stages.finetune import finetune
    world = _world()
    run = make_run(os.path.join(out_dir, f"run{world.size}"), *MLP, "finetune.epochs=1", "finetune.lr=0.05",
                   f"data.batch_size={batch}", world=world)
    # 4 full steps: with a ragged last batch, padding would make the two runs see different samples
    run = dataclasses.replace(run, splits=dataclasses.replace(run.splits, train=Subset(run.splits.train, range(64))))
    model = build_member(run.spec, 7)
    finetune(run, model, "t", 3)
    if world.is_main:
        torch.save(model.state_dict(), os.path.join(out_dir, f"ddp{world.size}.pt"))
    shutdown(world)


def test_ddp_two_ranks_batch_b_matches_one_process_batch_2b(tmp_path):
    spawn(_ddp, 2, str(tmp_path), 8)
    spawn(_ddp, 1, str(tmp_path), 16)
    one, two = (torch.load(tmp_path / f"ddp{n}.pt", weights_only=True) for n in (1, 2))
    assert not torch.equal(one["net.1.weight"], build_member(SPEC, 7).state_dict()["net.1.weight"])
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)


def test_torchrun_quickstart_nt_beats_averaging(tmp_path):
    out = tmp_path / "run"
    cmd = torchrun_cmd("run", "configs/quickstart.yaml", f"output.dir={out}", "distributed.threads_per_rank=1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(str(out))
    assert results.world["size"] == 2 and len({r["pid"] for r in results.world["ranks"]}) == 2
    nt, avg = results.fusion["nt"], results.fusion["avg"]
    assert nt.post_fusion > avg.post_fusion + 0.10   # about 96% against 81% on this config
    assert nt.finetune[-1] >= sum(results.members) / len(results.members)
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    assert (out / "checkpoints" / "finetuned_nt.safetensors").exists()


def two_training_ranks(out):
    """A long quickstart run on two ranks started by hand (20 s timeouts); returns once rank 1 is training."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "ntdist", "run", "configs/quickstart.yaml", f"output.dir={out}",
               "train.epochs=400", "distributed.timeout_s=20", "distributed.heartbeat_timeout_s=20",
               "distributed.rendezvous_timeout_s=60", "distributed.threads_per_rank=1"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    wait_for(out / "checkpoints" / "member1.state.safetensors", procs[1])
    return procs


def test_killed_peer_ends_the_job_within_the_timeout(tmp_path):
    procs = two_training_ranks(tmp_path / "run")
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode not in (0, None)
    assert time.time() - start < 25   # the heartbeat notices within seconds, the timeout is 20 s
    assert procs[0].returncode == 4, err[-2000:]   # EXIT_PEER_LOST
    assert "rank 0" in err and "peer" in err, err[-2000:]


def test_sigterm_after_a_peer_died_is_a_lost_peer_not_a_preemption(tmp_path):
    """torchrun's agent SIGTERMs the survivors when a worker dies: that must not read as a preemption (exit 3,
    which tells SLURM to requeue) but as a lost peer (exit 4), however fast the survivor reaches its boundary."""
    procs = two_training_ranks(tmp_path / "run")
    procs[1].send_signal(signal.SIGKILL)
    procs[0].send_signal(signal.SIGTERM)   # at once, as torchrun does
    try:
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 4, err[-2000:]   # EXIT_PEER_LOST
    assert "peer" in err and "preempted" not in err, err[-2000:]
