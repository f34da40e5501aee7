"""Tiny datasets for Hugging Face members: `userpkg.hfdata:images` and `userpkg.hfdata:tokens`."""

import torch
from torch.utils.data import TensorDataset


def images(samples: int = 24, size: int = 16, classes: int = 3):
    """(train, None, test): noisy images whose mean brightness tells the class."""
    g = torch.Generator().manual_seed(0)

    def draw(n):
        y = torch.arange(n) % classes
        return TensorDataset(y.float()[:, None, None, None] + 0.3 * torch.randn(n, 3, size, size, generator=g), y)
    return draw(samples), None, draw(12)


def tokens(samples: int = 24, length: int = 8, vocab: int = 50, classes: int = 3):
    """(train, None, test): token ids (stored as float32, as ntdist's datasets hold them) whose range tells the
    class."""
    g = torch.Generator().manual_seed(0)

    def draw(n):
        y = torch.arange(n) % classes
        ids = y[:, None] * (vocab // classes) + torch.randint(0, vocab // classes, (n, length), generator=g)
        return TensorDataset(ids.float(), y)
    return draw(samples), None, draw(12)
