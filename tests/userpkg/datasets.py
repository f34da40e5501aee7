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


# Datasets with one mistake each, as users make them: ntdist must refuse them at load time.

def blobs_with(mistake: str, split: str = "train", index: int = 7, as_list: bool = False):
    """`blobs` (with a validation set) with one `mistake` in `split` at sample `index`; `as_list`: the splits
    as plain lists of (input, label) pairs, read one sample at a time like a Dataset class of one's own."""
    parts = dict(zip(("train", "val", "test"), blobs(with_val=True)))
    x, y = (t.clone() for t in parts[split].tensors)
    if mistake == "nan":
        x[index, 1] = float("nan")
    elif mistake == "inf":
        x[index, 2] = float("-inf")
    elif mistake == "label57":
        y[index] = 57
    elif mistake == "negative":
        y[index] = -1
    elif mistake == "float_labels":
        y = y.float()
    elif mistake == "one_hot":
        y = torch.nn.functional.one_hot(y, 3)
    elif mistake == "int_inputs":
        x = (10 * x).long()
    elif mistake == "wider":
        x = torch.cat([x, torch.zeros(len(x), 1)], dim=1)
    else:
        raise ValueError(f"no mistake '{mistake}'")
    parts[split] = TensorDataset(x, y)
    if as_list:
        return tuple(list(zip(*part.tensors)) for part in parts.values())
    return tuple(parts.values())


def ragged(index: int = 4):
    """A list of (input, label) pairs whose sample `index` is shorter than the others."""
    train = [(torch.randn(5 if i == index else 6), i % 3) for i in range(300)]
    return train, None, None


def raises():
    raise FileNotFoundError("[Errno 2] No such file or directory: '/data/blobs.csv'")


def returns_text():
    return "blobs.csv"


def empty():
    return TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), None, None


def few(samples: int = 3):
    """`samples` samples in all: no validation or test set of their own."""
    return blobs(samples=samples)[0], None, None
