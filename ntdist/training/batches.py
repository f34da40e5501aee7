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

Images of an `ImageTensors` dataset (`ntdist.images`: CIFAR, SVHN, MNIST, ...) stay uint8 on the device
and are normalised per batch, after the training augmentation of the dataset (random crop and flip) is
applied to the whole batch. The augmentation is drawn per epoch for every position of the epoch's order
from the generator of the permutation, so it depends only on (seed, epoch): the same on any device, on
any rank layout, on both paths (the DataLoader's batches are augmented the same way) and after a resume.
"""

import itertools
import math
import weakref
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ntdist.images import ImageTensors, augment_batch

_HOST = weakref.WeakKeyDictionary()    # dataset -> (inputs, labels) on the CPU
_DEVICE = weakref.WeakKeyDictionary()  # dataset -> {device: (inputs, labels)}


def _unwrap(data: Dataset) -> Tuple[Dataset, Optional[torch.Tensor]]:
    """(the dataset under any Subsets of `data`, the indices of `data` in it, or None when not a Subset)."""
    index = None
    while isinstance(data, Subset):
        inner = torch.as_tensor(data.indices, dtype=torch.long)
        index = inner if index is None else inner[index]
        data = data.dataset
    return data, index


def image_source(data: Dataset) -> Tuple[Optional[ImageTensors], Optional[torch.Tensor]]:
    """(the `ImageTensors` under `data`, the indices of `data` in it), or (None, None) when `data` is not a
    view of one."""
    base, index = _unwrap(data)
    if not isinstance(base, ImageTensors):
        return None, None
    return base, torch.arange(len(base)) if index is None else index


def _sample_bytes(data: Dataset) -> int:
    images, _ = image_source(data)
    if images is not None:
        return images.images[0].numel() + 8
    x, _ = data[0]
    return torch.as_tensor(x).numel() * torch.as_tensor(x).element_size() + 8


def resident(data: Dataset, device, max_mb: float) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) of all of `data` on `device` (uint8 images for an `ImageTensors` view), or None when
    it is empty, over `max_mb` MiB, or reads differently each time (`varies_per_read`: random transforms)."""
    if len(data) == 0 or max_mb <= 0 or len(data) * _sample_bytes(data) > max_mb * 2 ** 20:
        return None
    if getattr(_unwrap(data)[0], "varies_per_read", False):
        return None
    device = torch.device(device)
    on_device = _DEVICE.setdefault(data, {})
    if device not in on_device:
        if data not in _HOST:
            images, index = image_source(data)
            if images is not None:
                _HOST[data] = (images.images[index], images.labels[index])
            else:
                parts = list(DataLoader(data, batch_size=1024, shuffle=False, generator=torch.Generator()))
                _HOST[data] = (torch.cat([x for x, _ in parts]), torch.cat([torch.as_tensor(y) for _, y in parts]))
        x, y = _HOST[data]
        on_device[device] = (x.to(device), y.to(device))
    return on_device[device]


def _permutation(n: int, seed: int, epoch: int) -> Tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g), g


def _rank_share(per_sample: torch.Tensor, n: int, num_replicas: int, rank: int) -> torch.Tensor:
    """Rows of this rank: every W-th of the epoch's order, padded by wrapping around as DistributedSampler does."""
    total = math.ceil(n / num_replicas) * num_replicas
    if total > n:
        per_sample = torch.cat([per_sample] * math.ceil(total / n))[:total]
    return per_sample[rank:total:num_replicas]


def sampler_indices(n: int, seed: int, epoch: int, num_replicas: int = 1, rank: int = 0) -> torch.Tensor:
    """The indices `DistributedSampler(shuffle=True, seed=seed, drop_last=False)` yields on `rank` in `epoch`."""
    return _rank_share(_permutation(n, seed, epoch)[0], n, num_replicas, rank)


def augment_draws(images: ImageTensors, n: int, seed: int, epoch: int, num_replicas: int = 1,
                  rank: int = 0) -> torch.Tensor:
    """The augmentation of each sample this rank takes in `epoch` (rows in the order of `sampler_indices`):
    drawn for the n positions of the epoch's order right after its permutation, from the same generator."""
    _, g = _permutation(n, seed, epoch)
    return _rank_share(images.augment.draw(g, n), n, num_replicas, rank)


class TensorBatches:
    """Shuffled training batches gathered from resident tensors (see the module docstring); `images` is the
    `ImageTensors` the tensors come from (uint8: augmented and normalised per batch), or None."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, num_replicas: int = 1,
                 rank: int = 0, images: Optional[ImageTensors] = None):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.num_replicas, self.rank, self.epoch, self.start_step, self.images = num_replicas, rank, 0, 0, images

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def order(self) -> torch.Tensor:
        """The current epoch's permutation of the samples, before it is split between the ranks (on the CPU)."""
        return sampler_indices(len(self.y), self.seed, self.epoch)

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.y) / self.num_replicas) / self.batch_size)

    def indices_and_draws(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This epoch's indices on the device and, with augmentation, their draws ([len, 3]), else None."""
        n = len(self.y)
        idx = sampler_indices(n, self.seed, self.epoch, self.num_replicas, self.rank).to(self.y.device)
        if self.images is None or not self.images.augment:
            return idx, None
        return idx, augment_draws(self.images, n, self.seed, self.epoch, self.num_replicas, self.rank).to(idx.device)

    def gather(self, take: torch.Tensor, draws: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch of indices `take` (any shape, e.g. [k, B] for k members) with its `draws` applied."""
        x = self.x[take]
        if self.images is None:
            return x, self.y[take]
        if draws is not None:
            flat = augment_batch(x.flatten(0, take.dim() - 1), draws.flatten(0, take.dim() - 1),
                                 self.images.augment.padding, 0)
            x = flat.view(x.shape)
        return self.images.normalise(x), self.y[take]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx, draws = self.indices_and_draws()
        for start in range(self.start_step * self.batch_size, len(idx), self.batch_size):
            end = start + self.batch_size
            yield self.gather(idx[start:end], None if draws is None else draws[start:end])


def stacked_batches(members: List[TensorBatches]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The batches of k members over the same resident tensors as one gather per step: ([k, B, ...], [k, B]),
    row i being exactly what `members[i]` yields (each member's own order and augmentation)."""
    first = members[0]
    assert all(m.start_step == 0 for m in members), "vectorised members resume at epoch ends only"
    assert all(m.x is first.x and m.batch_size == first.batch_size for m in members), "members share one dataset"
    drawn = [m.indices_and_draws() for m in members]
    idx = torch.stack([i for i, _ in drawn])
    draws = None if drawn[0][1] is None else torch.stack([d for _, d in drawn])
    for start in range(0, idx.shape[1], first.batch_size):
        end = start + first.batch_size
        yield first.gather(idx[:, start:end], None if draws is None else draws[:, start:end])


class EvalBatches:
    """Evaluation batches of resident tensors in order (uint8 images normalised per batch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, images: Optional[ImageTensors] = None):
        self.x, self.y, self.batch_size, self.images = x, y, batch_size, images

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.y), self.batch_size):
            x = self.x[start:start + self.batch_size]
            yield (x if self.images is None else self.images.normalise(x)), self.y[start:start + self.batch_size]


CUDA_LOADER_WORKERS = 4   # data.loader_workers on CUDA by default, at most (one per CPU thread of the rank)


def feed(cfg, device) -> dict:
    """The keyword arguments of `train_batches` / `eval_batches` from a `DataConfig` and the training device."""
    return {"device": device, "max_mb": cfg.resident_max_mb, "workers": loader_workers(cfg.loader_workers, device)}


def loader_workers(configured: Optional[int], device) -> int:
    """DataLoader workers: `data.loader_workers` when set; else none on a CPU (they would take the training
    threads' cores) and, with CUDA, up to `CUDA_LOADER_WORKERS`, one per CPU thread of this rank (torch's
    thread count, which `init_world` set), so that decoding overlaps the GPU's steps."""
    if configured is not None:
        return configured
    if torch.device(device).type != "cuda":
        return 0
    return min(CUDA_LOADER_WORKERS, torch.get_num_threads())


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
    """The DataLoader fallback for data that does not fit: the same order and augmentation, batches copied
    per step. Augmented images are copied to `device` first (from pinned memory, asynchronously, with CUDA)
    and cropped and flipped there."""

    def __init__(self, data: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 options: Optional[dict] = None, device="cpu"):
        self.sampler = _SkippingSampler(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                        drop_last=False)
        self.batch_size, self.seed, self.start_step = batch_size, seed, 0
        self.num_replicas, self.rank, self.n = num_replicas, rank, len(data)
        self.generator = torch.Generator()   # the workers' base seed: drawn from here, not from torch's global RNG
        self.loader = DataLoader(data, batch_size=batch_size, sampler=self.sampler, generator=self.generator,
                                 **(options or {}))
        images, _ = image_source(data)
        self.images = images if images is not None and images.augment else None
        self.device = torch.device(device)

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
        if self.images is None:
            yield from self.loader
            return
        draws = augment_draws(self.images, self.n, self.seed, self.sampler.epoch, self.num_replicas,
                              self.rank).to(self.device)
        fill = self.images.fill(self.device)
        start = self.sampler.skip   # the draws belong to positions of the whole epoch
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            yield augment_batch(x, draws[start:start + len(y)], self.images.augment.padding, fill), y
            start += len(y)


def train_batches(data: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0, *,
                  device="cpu", max_mb: float = 0, workers: int = 0):
    """Training batches whose order and augmentation depend only on `seed` and the epoch (call `set_epoch`
    before each).

    With `num_replicas` ranks each rank sees every `num_replicas`-th sample of the same permutation, so
    W ranks with batch B see the same samples per step as one process with batch W*B.
    """
    tensors = resident(data, device, max_mb)
    if tensors is None:
        return LoaderBatches(data, batch_size, seed, num_replicas, rank, loader_options(device, workers), device)
    return TensorBatches(*tensors, batch_size, seed, num_replicas, rank, image_source(data)[0])


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
    return EvalBatches(x[rank::num_replicas], y[rank::num_replicas], batch_size, image_source(data)[0])
