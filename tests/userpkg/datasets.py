"""A dataset defined outside ntdist: `data.name: userpkg.datasets:blobs` with `data.kwargs`."""

import torch
from torch.utils.data import TensorDataset


def blobs(samples: int = 300, dim: int = 6, classes: int = 3, with_val: bool = False):
    """Gaussian blobs as (train, val, test); val is None unless `with_val` (then ntdist carves it)."""
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(classes, dim, generator=g)

    def draw(n):
        y = torch.arange(n) % classes
        return TensorDataset(centers[y] + torch.randn(n, dim, generator=g), y)
    return draw(samples), draw(30) if with_val else None, draw(60)


def not_three_parts():
    return [1, 2]
