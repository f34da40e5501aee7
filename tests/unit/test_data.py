"""Dataset splits: deterministic, disjoint, and clear errors. Run: .venv/bin/python -m pytest tests/unit/test_data.py"""

import pytest
import torch

from helpers import write_cifar
from ntdist.data import DataConfig, load_splits
from ntdist.errors import UserError


def as_tensor(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_digits_split_is_deterministic_and_disjoint():
    a, b = load_splits(DataConfig()), load_splits(DataConfig())
    assert (len(a.train), len(a.val), len(a.test)) == (1294, 144, 359)
    assert sum(map(len, (a.train, a.val, a.test))) == 1797
    for part in ("train", "val", "test"):
        assert torch.equal(as_tensor(getattr(a, part)), as_tensor(getattr(b, part)))
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10
    keys = lambda ds: {tuple(x.flatten().tolist()) for x in as_tensor(ds)}  # noqa: E731
    assert not keys(a.test) & keys(a.val)
    other = load_splits(DataConfig(split_seed=1))
    assert not torch.equal(as_tensor(a.test), as_tensor(other.test))


def test_train_fraction_and_synthetic():
    quarter = load_splits(DataConfig(train_fraction=0.25))
    assert len(quarter.train) == round(1294 * 0.25)
    syn = load_splits(DataConfig(name="synthetic", synthetic_samples=500, synthetic_shape=[3, 4, 4]))
    assert syn.in_shape == (3, 4, 4) and len(syn.train) + len(syn.val) + len(syn.test) == 500


def test_missing_torchvision_root_says_what_to_put_where(tmp_path):
    with pytest.raises(UserError) as info:
        load_splits(DataConfig(name="cifar10", root=str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path) in message and "cifar-10-batches-py" in message and "data.download=true" in message


def test_unknown_dataset():
    with pytest.raises(UserError, match="did you mean 'mnist'"):
        load_splits(DataConfig(name="mnsit"))


def write_idx(path, array, magic):
    import numpy as np
    with open(path, "wb") as f:
        f.write(np.array([magic, *array.shape], dtype=">i4").tobytes())
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_format_files_written_here_load(tmp_path, name, folder):
    import numpy as np
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), 2049)
    splits = load_splits(DataConfig(name=name, root=str(tmp_path), val_fraction=0.2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y) < 10


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_cifar_and_svhn_format_files_written_here_load(tmp_path, monkeypatch, name):
    """torchvision checks these files' md5 sums against the official ones; the check is bypassed here
    so that small files in the same on-disk format exercise the real loading code."""
    import numpy as np
    import torchvision
    if name == "cifar10":
        write_cifar(tmp_path, "cifar-10-batches-py", [(f"data_batch_{i}", 10) for i in range(1, 6)] +
                     [("test_batch", 20)], "batches.meta", "label_names", "labels", 10)
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    elif name == "cifar100":
        write_cifar(tmp_path, "cifar-100-python", [("train", 50), ("test", 20)], "meta", "fine_label_names",
                     "fine_labels", 100)
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    else:
        from scipy.io import savemat
        rng = np.random.default_rng(0)
        for split, n in (("train", 50), ("test", 20)):
            savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8),
                                                       "y": rng.integers(1, 11, (n, 1))})
        monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    splits = load_splits(DataConfig(name=name, root=str(tmp_path), val_fraction=0.2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and splits.in_shape == (3, 32, 32)
    assert 0 <= int(y) < splits.num_classes == (100 if name == "cifar100" else 10)


def test_mnist1d_regenerates_the_published_split_offline(monkeypatch):
    import mnist1d.data
    import numpy as np
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must be regenerated offline, never downloaded")
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)
    np.random.seed(7)
    expected_next = np.random.get_state()[1].copy()
    splits = load_splits(DataConfig(name="mnist1d"))
    assert np.array_equal(np.random.get_state()[1], expected_next)   # the global RNG is left as it was
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3600, 400, 1000)   # published 4000 / 1000
    assert splits.in_shape == (1, 40) and splits.num_classes == 10
    counts = lambda ds: torch.bincount(torch.stack([ds[i][1] for i in range(len(ds))]), minlength=10)  # noqa: E731
    assert (counts(splits.train) + counts(splits.val) + counts(splits.test)).tolist() == [500] * 10
    assert counts(splits.test).tolist() == [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]
    x = as_tensor(splits.test)
    assert x.shape == (1000, 1, 40) and abs(x.mean().item()) < 0.1
