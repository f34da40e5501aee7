"""Batches for training and evaluation, straight from tensors on the training device when the data fits.

A dataset under `data.resident_max_mb` is decoded once into two tensors (inputs, labels), copied to the
training device once, and every batch is an index gather there: no per-sample `__getitem__`, no collate,
no host-to-device copy per step. The order is exactly a DataLoader's over a seeded `DistributedSampler`
(shuffle, no drop_last): rank r of W takes every W-th index of the epoch's permutation, padded by
wrapping around, so a member trained on any layout sees the same samples in the same order. Larger data
falls back to that DataLoader, with the same interface (`set_epoch`, `len`, iteration, `order`).
`set_epoch(epoch, start_step)` starts the epoch's iteration at batch `start_step`: a run resumed from a
state written inside an epoch continues with exactly the batches it had not yet trained on. Every
DataLoader here has a generator of its own, so loading data never draws from torch's global RNG,
which stays the model's (dropout), is saved in the state files and is restored bit for bit.
"""

import itertools
import math
import weakref
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

_HOST = weakref.WeakKeyDictionary()    # dataset -> (inputs, labels) on the CPU
_DEVICE = weakref.WeakKeyDictionary()  # dataset -> {device: (inputs, labels)}


def _sample_bytes(data: Dataset) -> int:
    x, _ = data[0]
    return torch.as_tensor(x).numel() * torch.as_tensor(x).element_size() + 8


def resident(data: Dataset, device, max_mb: float) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) of all of `data` on `device`, or None when it is empty or over `max_mb` MiB."""
    if len(data) == 0 or max_mb <= 0 or len(data) * _sample_bytes(data) > max_mb * 2 ** 20:
        return None
    device = torch.device(device)
    on_device = _DEVICE.setdefault(data, {})
    if device not in on_device:
        if data not in _HOST:
            parts = list(DataLoader(data, batch_size=1024, shuffle=False, generator=torch.Generator()))
            _HOST[data] = (torch.cat([x for x, _ in parts]), torch.cat([torch.as_tensor(y) for _, y in parts]))
        x, y = _HOST[data]
        on_device[device] = (x.to(device), y.to(device))
    return on_device[device]


def sampler_indices(n: int, seed: int, epoch: int, num_replicas: int = 1, rank: int = 0) -> torch.Tensor:
    """The indices `DistributedSampler(shuffle=True, seed=seed, drop_last=False)` yields on `rank` in `epoch`."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g)
    total = math.ceil(n / num_replicas) * num_replicas
    if total > n:
        order = torch.cat([order] * math.ceil(total / n))[:total]
    return order[rank:total:num_replicas]


class TensorBatches:
    """Shuffled training batches gathered from resident tensors (see the module docstring)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, num_replicas: int = 1,
                 rank: int = 0):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.num_replicas, self.rank, self.epoch, self.start_step = num_replicas, rank, 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def order(self) -> torch.Tensor:
        """The current epoch's permutation of the samples, before it is split between the ranks (on the CPU)."""
        return sampler_indices(len(self.y), self.seed, self.epoch)

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.y) / self.num_replicas) / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = sampler_indices(len(self.y), self.seed, self.epoch, self.num_replicas, self.rank).to(self.y.device)
        for start in range(self.start_step * self.batch_size, len(idx), self.batch_size):
            take = idx[start:start + self.batch_size]
            yield self.x[take], self.y[take]


def feed(cfg, device) -> dict:
    """The keyword arguments of `train_batches` / `eval_batches` from a `DataConfig` and the training device."""
    return {"device": device, "max_mb": cfg.resident_max_mb, "workers": cfg.loader_workers}


def loader_options(device, workers: int) -> dict:
    """DataLoader settings for the fallback path: pinned memory for CUDA, workers kept between epochs."""
    return {"num_workers": workers, "pin_memory": torch.device(device).type == "cuda",
            "persistent_workers": workers > 0}


class _SkippingSampler(DistributedSampler):
    """A DistributedSampler that leaves out the first `skip` indices of its epoch (a resumed epoch's done part)."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


class LoaderBatches:
    """The DataLoader fallback for data that does not fit: the same order, batches copied per step."""

    def __init__(self, data: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 options: Optional[dict] = None):
        self.sampler = _SkippingSampler(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                        drop_last=False)
        self.batch_size, self.seed, self.start_step = batch_size, seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.generator = torch.Generator()   # the workers' base seed: drawn from here, not from torch's global RNG
        self.loader = DataLoader(data, batch_size=batch_size, sampler=self.sampler, generator=self.generator,
                                 **(options or {}))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed + epoch)
        self.start_step = start_step
        self.sampler.skip = start_step * self.batch_size   # skipped in the sampler: those samples are not loaded

    def order(self) -> torch.Tensor:
        """The current epoch's permutation of the samples, before it is split between the ranks."""
        return sampler_indices(len(self.sampler.dataset), self.seed, self.sampler.epoch)

    def __len__(self) -> int:
        return math.ceil(self.sampler.num_samples / self.batch_size)

    def __iter__(self):
        return iter(self.loader)


def train_batches(data: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0, *,
                  device="cpu", max_mb: float = 0, workers: int = 0):
    """Training batches whose order depends only on `seed` and the epoch (call `set_epoch` before each).

    With `num_replicas` ranks each rank sees every `num_replicas`-th sample of the same permutation, so
    W ranks with batch B see the same samples per step as one process with batch W*B.
    """
    tensors = resident(data, device, max_mb)
    if tensors is None:
        return LoaderBatches(data, batch_size, seed, num_replicas, rank, loader_options(device, workers))
    return TensorBatches(*tensors, batch_size, seed, num_replicas, rank)


def eval_batches(data: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, *, device="cpu",
                 max_mb: float = 0, workers: int = 0):
    """Rank r evaluates samples r, r+W, ... in order: every sample is counted exactly once across ranks."""
    tensors = resident(data, device, max_mb)
    if tensors is None:
        if num_replicas > 1:
            data = Subset(data, list(range(rank, len(data), num_replicas)))
        return DataLoader(data, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                          **loader_options(device, workers))
    x, y = tensors
    x, y = x[rank::num_replicas], y[rank::num_replicas]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]
