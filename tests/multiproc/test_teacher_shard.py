"""The sharded distillation teacher equals the whole one (all k members on every rank) while each rank keeps at
most ceil(k/W) members: its outputs on batches of different sizes per rank, and a distillation fine-tune.

Run: .venv/bin/python -m pytest tests/multiproc/test_teacher_shard.py
"""

import dataclasses
import math
import os

import pytest
import torch
from torch.utils.data import Subset

from helpers import make_run, spawn
from ntdist.distributed.world import DistributedConfig, init_world, shutdown
from ntdist.models.weights import build_member

MLP = ["model.kwargs.width=16", "model.kwargs.depth=2", "finetune.distill=true"]


def _members(run, k):
    return [build_member(run.spec, 100 + i).eval() for i in range(k)]


def _outputs(world, rank, out_dir, k):
    from ntdist.stages.finetune import distill_teacher
    from ntdist.training.teacher import ShardedTeacher, member_bytes
    run = make_run(os.path.join(out_dir, "run"), *MLP, f"fusion.k={k}", "data.batch_size=8", world=world)
    members = _members(run, k)
    held = {i: members[i] for i in run.layout.held_by(rank)}
    teacher = distill_teacher(run, held)
    assert isinstance(teacher, ShardedTeacher)
    # batches of a different size on every rank and call: 8, 6, 4 rows on rank 0; 7, 5, 3 on rank 1; ...
    xs = [torch.stack([run.splits.test[i][0] for i in range(start, start + 8 - rank - 2 * j)])
          for j, start in enumerate((0, 20, 40))]
    got = [teacher.eval()(x) for x in xs]
    torch.save({"x": xs, "teacher": got, "bytes": member_bytes(list(teacher.members)),
                "member_bytes": member_bytes(members[:1])}, os.path.join(out_dir, f"teacher{rank}.pt"))
    run.rundir.release()


def _distill(world, rank, out_dir, k):
    from ntdist.stages.finetune import distill_teacher, finetune
    for shard in ("on", "off"):
        run = make_run(os.path.join(out_dir, f"run_{shard}"), *MLP, f"fusion.k={k}", "finetune.epochs=1",
                       "finetune.lr=0.05", "data.batch_size=8", f"finetune.teacher_shard={shard}", world=world)
        # 35 samples per rank: four full batches of 8, then 3 rows, padded to 8 in the sharded teacher
        splits = dataclasses.replace(run.splits, train=Subset(run.splits.train, range(70)))
        run = dataclasses.replace(run, splits=splits)
        members = _members(run, k)
        teacher = distill_teacher(run, {i: members[i] for i in run.layout.held_by(rank)})
        model = build_member(run.spec, 7)
        finetune(run, model, "t", 3, teacher)
        if world.is_main:
            torch.save(model.state_dict(), os.path.join(out_dir, f"student_{shard}.pt"))
        run.rundir.release()


def _on_ranks(rank, out_dir, k, distill):
    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=60))
    _outputs(world, rank, out_dir, k)
    if distill:
        _distill(world, rank, out_dir, k)
    shutdown(world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """k=3 on 2 ranks: rank 0 holds members 0 and 1, rank 1 member 2; the teacher's outputs and two fine-tunes."""
    out = tmp_path_factory.mktemp("two_ranks")
    spawn(_on_ranks, 2, str(out), 3, True, timeout=120)
    return out


def _check_outputs(out, k, ranks):
    from ntdist.fusion import Ensemble
    run = make_run(out / "alone", *MLP, f"fusion.k={k}")
    whole = Ensemble(_members(run, k)).eval()
    for rank in range(ranks):
        saved = torch.load(out / f"teacher{rank}.pt", weights_only=True)
        for x, got in zip(saved["x"], saved["teacher"]):
            assert got.shape[0] == x.shape[0]
            with torch.no_grad():
                torch.testing.assert_close(got, whole(x), rtol=0, atol=1e-6)
        assert 0 < saved["bytes"] <= math.ceil(k / ranks) * saved["member_bytes"], saved["bytes"]
    run.rundir.release()


def test_sharded_teacher_equals_the_whole_one_and_holds_at_most_ceil_k_over_w_members(two_ranks):
    _check_outputs(two_ranks, 3, 2)


def test_two_ranks_sharing_each_member_split_its_work_and_give_the_same_outputs(tmp_path):
    spawn(_on_ranks, 4, str(tmp_path), 2, False, timeout=90)   # k=2 on 4 ranks: ranks 0, 1 run member 0
    _check_outputs(tmp_path, 2, 4)


def test_distillation_with_the_sharded_teacher_gives_the_same_weights(two_ranks):
    on, off = (torch.load(two_ranks / f"student_{shard}.pt", weights_only=True) for shard in ("on", "off"))
    start = build_member(make_run(two_ranks / "alone_spec", *MLP).spec, 7).state_dict()
    assert not torch.equal(on["net.1.weight"], start["net.1.weight"])   # it trained
    for key in off:
        torch.testing.assert_close(on[key], off[key], rtol=0, atol=1e-5)
