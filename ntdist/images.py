"""Image datasets kept as uint8, normalised per batch, and the CIFAR training augmentation done in batches.

`ImageTensors` holds images as uint8 [N, C, H, W] (a quarter of the memory of normalised float32)
with their labels and normalisation. Read one sample at a time (a DataLoader, evaluation code that
indexes it) it returns exactly what torchvision's `ToTensor` + `Normalize` return; the resident
training path (`training.batches`) instead keeps the uint8 tensors on the training device and
normalises each batch there.

`Augment` is the usual CIFAR recipe: zero padding, a random crop back to the original size and a
random horizontal flip, drawn per sample. The draws of an epoch come from a generator seeded by the
member's seed and the epoch (`training.batches.augment_draws`), so they are the same on every
device, every rank layout and after a resume; `augment_batch` applies them to a whole batch at once.
Cropping and flipping commute with the per-channel normalisation, so augmenting uint8 images before
normalising (padding with 0) equals augmenting normalised images (padding with the normalised 0).
"""

from dataclasses import dataclass
from typing import Dict, Sequence

import torch
from torch.utils.data import Dataset

from ntdist.errors import UserError


@dataclass(frozen=True)
class Augment:
    """Random crop after `padding` pixels of zero padding on each side, and a random horizontal flip."""

    padding: int = 0
    flip: bool = False

    def __bool__(self) -> bool:
        return self.padding > 0 or self.flip

    def draw(self, generator: torch.Generator, n: int) -> torch.Tensor:
        """[n, 3] int64 on the CPU: per sample the crop's top and left offset (0..2*padding) and 1 to flip.

        All three columns are always drawn, so the stream of draws does not depend on the recipe."""
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n, 1), generator=generator)
        return torch.cat([offsets, flips if self.flip else torch.zeros_like(flips)], dim=1)


def augment_batch(x: torch.Tensor, draws: torch.Tensor, padding: int, fill) -> torch.Tensor:
    """Crop and flip every image of `x` [B, C, H, W] as `draws` [B, 3] (from `Augment.draw`) say.

    `fill` is the value of the padding: a number, or one value per channel as a [1, C, 1, 1] tensor.
    """
    draws = draws.to(x.device)
    batch, channels, height, width = x.shape
    if padding > 0:
        padded = x.new_empty(batch, channels, height + 2 * padding, width + 2 * padding)
        padded[:] = fill
        padded[:, :, padding:padding + height, padding:padding + width] = x
        rows = draws[:, 0, None] + torch.arange(height, device=x.device)            # [B, H]
        cols = draws[:, 1, None] + torch.arange(width, device=x.device)             # [B, W]
        x = padded[torch.arange(batch, device=x.device)[:, None, None, None],
                   torch.arange(channels, device=x.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    flip = draws[:, 2].bool().view(batch, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


class ImageTensors(Dataset):
    """uint8 images [N, C, H, W] with labels [N], normalised by per-channel `mean` and `std` (of x / 255).

    `augment` is the training augmentation the batches apply (`training.batches`); reading a single
    sample never augments it. `without_augment()` is the same data for evaluation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: Augment = Augment()):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise UserError(f"ImageTensors needs uint8 images [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(labels) != len(images) or len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise UserError(f"ImageTensors: {len(images)} images of {images.shape[1]} channels need as many "
                             f"labels and one mean and std per channel; got {len(labels)} labels, "
                             f"{len(mean)} means, {len(std)} stds")
        self.images, self.labels, self.augment = images, labels.long(), augment
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._stats: Dict[torch.device, tuple] = {}   # device -> (mean, std) as [1, C, 1, 1] tensors there

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.normalise(self.images[index][None])[0], self.labels[index]

    def without_augment(self) -> "ImageTensors":
        """The same tensors without training augmentation (validation and test views)."""
        return ImageTensors(self.images, self.labels, self.mean, self.std)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (x / 255 - mean) / std of a uint8 batch [B, C, H, W], on the batch's device.

        The same operations in the same order as torchvision's `ToTensor` and `Normalize`, so the
        values are bit-identical to theirs."""
        if x.device not in self._stats:
            shape = (1, len(self.mean), 1, 1)
            self._stats[x.device] = (torch.tensor(self.mean, device=x.device).view(shape),
                                     torch.tensor(self.std, device=x.device).view(shape))
        mean, std = self._stats[x.device]
        return x.float().div(255).sub(mean).div(std)

    def fill(self, device) -> torch.Tensor:
        """The normalised value of a zero pixel, per channel [1, C, 1, 1]: the padding of normalised images."""
        return self.normalise(torch.zeros(1, len(self.mean), 1, 1, dtype=torch.uint8, device=device))
