"""NT's repair across ranks (gloo, CPU, free ports): each rank repairs on its own share of the calibration inputs,
and the sums are added over the ranks of the pair, so the result is what one process with all of them computes.

Run: .venv/bin/python -m pytest tests/multiproc/test_distributed_repair.py
"""

import os

import torch

from helpers import spawn
from ntdist.distributed.layout import MemberLayout
from ntdist.distributed.world import DistributedConfig, init_world, shutdown
from ntdist.models import ModelSpec
from ntdist.models.weights import build_member

SPEC = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 16, "depth": 2})
EXAMPLE = torch.zeros(2, 64)


def _members(k):
    return [build_member(SPEC, 200 + i) for i in range(k)]


def _calibration():
    return torch.randn(360, 64, generator=torch.Generator().manual_seed(7))


def _fuse_on_ranks(rank, out_dir, k):
    from ntdist.distributed.tree import tree_fuse
    from ntdist.fusion import NTOptions
    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=60))
    layout = MemberLayout(k, world.size)
    members = _members(k)
    share = _calibration().tensor_split(world.size)[rank]          # this rank's own inputs only
    sent = []
    fused = tree_fuse(world, {i: members[i] for i in layout.held_by(rank)}, layout.holders, SPEC.build,
                      NTOptions(), example_inputs=EXAMPLE, sent=sent, calibration=share)
    torch.save({"state": fused.state_dict(), "sent": sent}, os.path.join(out_dir, f"fused{rank}.pt"))
    shutdown(world)


def test_ranks_with_a_share_each_repair_as_one_process_with_all_inputs(tmp_path):
    from ntdist.fusion import fuse
    for k, ranks in ((2, 2), (2, 4)):      # one rank per member; a group of two ranks per member
        spawn(_fuse_on_ranks, ranks, str(tmp_path), k, timeout=60)
        alone = fuse(_members(k), schedule="recursive", example_inputs=EXAMPLE, calibration=_calibration())
        one_share = fuse(_members(k), schedule="recursive", example_inputs=EXAMPLE,
                         calibration=_calibration().tensor_split(ranks)[0])
        assert any((one_share.state_dict()[key] - value).abs().max() > 1e-3
                   for key, value in alone.state_dict().items())
        for rank in range(ranks):
            got = torch.load(tmp_path / f"fused{rank}.pt", weights_only=True)
            for key, value in alone.state_dict().items():
                torch.testing.assert_close(got["state"][key], value, rtol=0, atol=1e-5, msg=f"{k}, {ranks}: {key}")
        sent = [torch.load(tmp_path / f"fused{rank}.pt", weights_only=True)["sent"] for rank in range(ranks)]
        assert sum(sum(s) for s in sent) == 2 * (ranks - 1), sent     # each model reaches each other rank once
