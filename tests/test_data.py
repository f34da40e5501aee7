"""Dataset splits: deterministic, disjoint, and clear errors. Run: .venv/bin/python -m pytest tests/test_data.py"""

import pytest
import torch

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
