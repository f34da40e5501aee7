"""OT fusion and the near-duplicate check across ranks, without gathering the members on one rank: OT
broadcasts its anchor and sums the aligned members in one all-reduce, the check moves only the sampled
rows; both equal the single-process results (k=3 on 2 ranks: rank 0 holds members 0 and 1, rank 1 member 2).
On 4 ranks with k=2, the ranks that hold no member wait for OT's alignments beyond the collective timeout.

Run: .venv/bin/python -m pytest tests/multiproc/test_fuse_in_place.py
"""

import os

import pytest
import torch

from helpers import spawn
from ntdist.distributed.layout import MemberLayout
from ntdist.models import ModelSpec
from ntdist.models.weights import build_member

K, RANKS, MAX_UNITS = 3, 2, 12
SPEC = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 32, "depth": 3})
X = torch.zeros(2, 64)


def _members():
    members = [build_member(SPEC, 100 + i) for i in range(K)]
    with torch.no_grad():   # near-copies of member 0's first hidden units in member 2: some duplicates to find
        members[2].state_dict()["net.1.weight"][:10] = members[0].state_dict()["net.1.weight"][:10] * 1.001
    return members


def _on_ranks(rank, out_dir):
    from ntdist.distributed.diagnostics import duplicate_units_across_ranks
    from ntdist.distributed.tree import ot_reduce
    from ntdist.distributed.world import DistributedConfig, init_world, shutdown
    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=60))
    layout = MemberLayout(K, world.size)
    members = _members()
    held = {i: members[i] for i in layout.held_by(rank)}
    fused = ot_reduce(world, held, layout.holders, SPEC.build, X)
    duplicates = [duplicate_units_across_ranks(world, held, layout.holders, SPEC.build, 0.95, max_units)
                  for max_units in (None, MAX_UNITS)]
    torch.save({"ot": fused.state_dict(), "duplicates": duplicates}, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown(world)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("in_place")
    spawn(_on_ranks, RANKS, str(out), timeout=90)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(RANKS)]


def test_ot_across_ranks_equals_single_process_ot(saved):
    from ntdist.fusion import fuse
    expected = fuse(_members(), method="ot", schedule="flat", example_inputs=X).state_dict()
    for got in saved:
        assert got["ot"].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got["ot"][key], value, rtol=0, atol=1e-5)


def test_duplicate_check_across_ranks_gives_the_single_process_fractions(saved):
    from ntdist.fusion.diversity import duplicate_units
    for index, max_units in enumerate((None, MAX_UNITS)):
        expected = duplicate_units(_members(), 0.95, max_units)
        assert expected["net.1"] > 0   # the planted near-copies are found
        for got in saved:
            assert got["duplicates"][index] == expected, (max_units, got["duplicates"][index], expected)


WIDE = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 2048, "depth": 2})
ALIGN_S = 4.0   # each alignment lasts at least this long: twice the collective timeout below


def _slow_ot_on_four_ranks(rank, out_dir):
    import time

    import ntdist.distributed.tree as tree
    from ntdist.distributed.world import DistributedConfig, init_world, shutdown

    def slow_align(*args, **kwargs):   # POT on wide members takes minutes on real models; here at least ALIGN_S
        started = time.time()
        aligned = align_to(*args, **kwargs)
        time.sleep(max(0.0, ALIGN_S - (time.time() - started)))
        return aligned
    align_to = tree.align_to
    tree.align_to = slow_align
    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=2.0, wait_timeout_s=120))
    layout = MemberLayout(2, world.size)   # members 0 and 1 on ranks 0 and 2; ranks 1 and 3 hold none
    held = {i: build_member(WIDE, 200 + i) for i in layout.held_by(rank)}
    fused = tree.ot_reduce(world, held, layout.holders, WIDE.build, X)
    torch.save(fused.state_dict(), os.path.join(out_dir, f"wide{rank}.pt"))
    shutdown(world)


def test_ot_ranks_without_members_wait_for_the_alignment_beyond_the_collective_timeout(tmp_path):
    """Ranks holding no member used to wait in the all-reduce under distributed.timeout_s while the holders
    aligned (exit 4 after 300 s on real models); they wait under distributed.wait_timeout_s now."""
    spawn(_slow_ot_on_four_ranks, 4, str(tmp_path), timeout=240)
    states = [torch.load(tmp_path / f"wide{rank}.pt", weights_only=True) for rank in range(4)]
    for state in states[1:]:
        assert all(torch.equal(state[key], value) for key, value in states[0].items())
