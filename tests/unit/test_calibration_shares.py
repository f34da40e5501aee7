"""Repair across ranks: each rank draws its own calibration inputs (`Run.calibration_inputs`); which ranks
repair a pairwise step of the fusion tree and how its models reach them (`step_ranks`, `spread`).

Run: .venv/bin/python -m pytest tests/unit/test_calibration_shares.py
"""

from types import SimpleNamespace

import torch
from torch.utils.data import TensorDataset

from ntdist.stages.context import Run

SIZE = 300


def _run(samples: int, seed: int = 4):
    """What `calibration_inputs` reads of a `Run`: a training set whose input i is the number i, the config."""
    train = TensorDataset(torch.arange(SIZE, dtype=torch.float32)[:, None], torch.zeros(SIZE, dtype=torch.long))
    cfg = SimpleNamespace(fusion=SimpleNamespace(calibration_samples=samples), train=SimpleNamespace(seed=seed))
    return SimpleNamespace(splits=SimpleNamespace(train=train), cfg=cfg)


def _drawn(run, share=0, shares=1):
    return Run.calibration_inputs(run, share, shares)[:, 0].long().tolist()


def test_every_rank_draws_its_own_block_and_rank_zero_draws_what_one_process_does():
    run = _run(40)
    order = torch.randperm(SIZE, generator=torch.Generator().manual_seed(4)).tolist()
    assert _drawn(run) == sorted(order[:40])                     # one process: the seed's first 40, in order
    shares = [_drawn(run, r, 3) for r in range(3)]
    assert shares[0] == _drawn(run)
    assert [set(s) for s in shares] == [set(order[40 * r:40 * (r + 1)]) for r in range(3)]
    halves = [set(_drawn(_run(SIZE), r, 2)) for r in range(2)]    # more than the set holds: half each
    assert [len(h) for h in halves] == [SIZE // 2] * 2 and not halves[0] & halves[1]


def test_the_ranks_of_a_pairwise_step_and_how_its_models_reach_them():
    from ntdist.distributed.layout import MemberLayout
    from ntdist.distributed.tree import spread, step_ranks
    two_per_member = MemberLayout(2, 4).holders                      # [0, 2]: ranks 0-1 train member 0
    assert step_ranks(two_per_member, 4, 0, 2) == [0, 1, 2, 3]
    assert step_ranks(two_per_member, 4, 1, 1) == [2, 3]
    three_on_two = MemberLayout(3, 2).holders                        # [0, 0, 1]
    assert step_ranks(three_on_two, 2, 0, 2) == [0] and step_ranks(three_on_two, 2, 0, 3) == [0, 1]
    assert step_ranks(MemberLayout(8, 4).holders, 4, 4, 4) == [2, 3]
    assert spread([0], [0, 1, 2, 3]) == [[(0, 1)], [(0, 2), (1, 3)]]  # a binomial tree: log2 stages
    assert spread([2, 3], [0, 1, 2, 3]) == [[(2, 0), (3, 1)]] and spread([0], [0]) == []
