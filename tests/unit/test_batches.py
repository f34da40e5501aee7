"""Tensor-resident batches are the DataLoader's batches: same samples, same order, any layout.

Run: .venv/bin/python -m pytest tests/unit/test_batches.py
"""

import pytest
import torch
from torch.utils.data import DistributedSampler, Subset, TensorDataset

from ntdist.training.batches import LoaderBatches, TensorBatches, eval_batches, sampler_indices, train_batches


@pytest.mark.parametrize("n, replicas", [(1, 1), (7, 2), (64, 1), (101, 2), (101, 3), (5, 4)])
def test_indices_equal_distributed_sampler(n, replicas):
    for rank in range(replicas):
        for epoch in (0, 1, 7):
            sampler = DistributedSampler(range(n), num_replicas=replicas, rank=rank, shuffle=True, seed=11,
                                         drop_last=False)
            sampler.set_epoch(epoch)
            assert sampler_indices(n, 11, epoch, replicas, rank).tolist() == list(sampler)


@pytest.mark.parametrize("replicas, rank", [(1, 0), (2, 0), (2, 1)])
def test_resident_batches_equal_loader_batches(replicas, rank):
    full = TensorDataset(torch.randn(130, 2, 3), torch.arange(130) % 10)
    data = Subset(full, list(range(3, 120)))
    resident = train_batches(data, 16, 5, replicas, rank, max_mb=10)
    loader = train_batches(data, 16, 5, replicas, rank, max_mb=0)
    assert isinstance(resident, TensorBatches) and isinstance(loader, LoaderBatches)
    for epoch in (1, 2):
        resident.set_epoch(epoch)
        loader.set_epoch(epoch)
        got, want = list(resident), list(loader)
        assert len(got) == len(want) == len(resident) == len(loader)
        for (x1, y1), (x2, y2) in zip(got, want):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    resident.set_epoch(1)
    first = [y for _, y in resident]
    resident.set_epoch(2)
    assert any(not torch.equal(a, b) for a, b in zip(first, [y for _, y in resident]))   # reshuffled per epoch


def test_eval_batches_cover_every_sample_once_across_ranks():
    data = TensorDataset(torch.randn(23, 4), torch.arange(23))
    seen = []
    for rank in range(3):
        resident = [y for _, y in eval_batches(data, 5, 3, rank, max_mb=10)]
        loader = [y for _, y in eval_batches(data, 5, 3, rank, max_mb=0)]
        assert torch.equal(torch.cat(resident), torch.cat(loader))
        seen += torch.cat(resident).tolist()
    assert sorted(seen) == list(range(23))


def test_data_over_the_limit_uses_the_loader():
    data = TensorDataset(torch.zeros(2048, 256), torch.zeros(2048, dtype=torch.long))   # about 2 MiB
    assert isinstance(train_batches(data, 8, 0, max_mb=1), LoaderBatches)
    assert isinstance(train_batches(data, 8, 0, max_mb=4), TensorBatches)


def test_fallback_loader_takes_the_worker_settings():
    data = TensorDataset(torch.zeros(40, 3), torch.zeros(40, dtype=torch.long))
    batches = train_batches(data, 8, 0, device="cpu", max_mb=0, workers=2)
    assert batches.loader.num_workers == 2 and batches.loader.persistent_workers and not batches.loader.pin_memory
    batches.set_epoch(1)
    assert sum(len(y) for _, y in batches) == 40
