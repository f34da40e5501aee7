"""Data from anywhere: an image folder tree of small PNGs written here, and a dataset from an import path.

Run: .venv/bin/python -m pytest tests/unit/test_own_data.py
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ntdist.cli import main
from ntdist.data import DataConfig, load_splits
from ntdist.errors import UserError
from ntdist.records.results import read_results
from ntdist.training.batches import LoaderBatches, TensorBatches, train_batches

COLOURS = {"blue": (20, 40, 220), "red": (220, 30, 30)}


def write_tree(root, parts=(("train", 20), ("test", 6))):
    """root/<part>/<class>/<i>.png: 12x10 images of one noisy colour per class."""
    rng = np.random.default_rng(0)
    for part, n in parts:
        for name, colour in COLOURS.items():
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (10, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_an_image_folder_tree_trains(tmp_path):
    write_tree(tmp_path / "images")
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {{name: imagefolder, root: {tmp_path / 'images'}, image_size: 8, batch_size: 8}}\n"
                      "model: {name: mlp, kwargs: {width: 8}}\ntrain: {epochs: 3}\nfinetune: {epochs: 1}\n"
                      "fusion: {k: 2, methods: [nt]}\n")
    assert main(["run", str(config), f"output.dir={tmp_path / 'run'}"]) == 0
    results = read_results(str(tmp_path / "run"))
    assert len(results.members) == 2 and results.ensemble > 0.9   # the colours are easy to tell apart
    assert results.fusion["nt"].finetune[-1] > 0.9


def test_image_folder_splits_transforms_and_mistakes(tmp_path):
    write_tree(tmp_path, (("train", 20), ("val", 3), ("test", 4)))
    splits = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 6, 8)   # val/ and test/ used as given
    assert splits.in_shape == (3, 8, 8) and splits.num_classes == 2
    assert torch.equal(splits.val[0][0], splits.val[0][0])   # no augmentation outside training
    torch.manual_seed(0)
    assert not torch.equal(splits.train[0][0], splits.train[0][0])   # random crop and flip while training
    fixed = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, augment=False))
    assert torch.equal(fixed.train[0][0], fixed.train[0][0])   # data.augment=false
    # randomly transformed images are read anew each epoch, never decoded once and kept on the device
    assert isinstance(train_batches(splits.train, 8, 0, max_mb=100), LoaderBatches)
    assert isinstance(train_batches(fixed.train, 8, 0, max_mb=100), TensorBatches)
    with pytest.raises(UserError, match="needs '.*train' with one folder of images per class"):
        load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "missing")))
    (tmp_path / "test" / "green").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "test" / "green" / "0.png")
    with pytest.raises(UserError, match="every split needs the same class folders"):
        load_splits(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_a_tree_without_val_and_test_is_carved(tmp_path):
    write_tree(tmp_path, (("train", 25),))
    splits = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (32, 8, 10)


def test_a_dataset_from_an_import_path():
    splits = load_splits(DataConfig(name="userpkg.datasets:blobs", kwargs={"samples": 200, "dim": 5}))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 60)
    assert splits.in_shape == (5,) and splits.num_classes == 3
    given = load_splits(DataConfig(name="userpkg.datasets:blobs", kwargs={"with_val": True}))
    assert (len(given.train), len(given.val)) == (300, 30)
    with pytest.raises(UserError, match="must return \\(train, val, test\\)"):
        load_splits(DataConfig(name="userpkg.datasets:not_three_parts"))
    with pytest.raises(UserError, match="has no 'nope'"):
        load_splits(DataConfig(name="userpkg.datasets:nope"))
