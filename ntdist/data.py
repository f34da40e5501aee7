"""Datasets: scikit-learn's bundled digits (the default), MNIST-1D, torchvision image sets, an image
folder tree, synthetic data, or a dataset of one's own (`data.name: package.module:callable`).

Every dataset is returned as train / validation / test splits. Validation is
carved out of the training data with a fixed seed (unless the data brings its
own validation set), so checkpoints are selected without looking at the test set.
"""

import functools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ntdist.datacheck import call_dataset, check_splits
from ntdist.errors import UserError, check_choice
from ntdist.images import Augment, ImageFiles, ImageTensors, list_image_files
from ntdist.options import is_import_path, opt

TORCHVISION_SETS = {
    # name: (class name, in_shape, classes, files expected under root, normalisation mean/std)
    "mnist": ("MNIST", (1, 28, 28), 10, "MNIST/raw/train-images-idx3-ubyte (and the other three idx files)",
              (0.1307,), (0.3081,)),
    "fashionmnist": ("FashionMNIST", (1, 28, 28), 10,
                     "FashionMNIST/raw/train-images-idx3-ubyte (and the other three idx files)",
                     (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", (3, 32, 32), 10, "cifar-10-batches-py/data_batch_1..5 and test_batch",
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", (3, 32, 32), 100, "cifar-100-python/train and test",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ("SVHN", (3, 32, 32), 10, "train_32x32.mat and test_32x32.mat",
             (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
CROP_AND_FLIP = {"cifar10": True, "cifar100": True, "svhn": False}   # sets with a random crop: flip too?
DATASETS = ["digits", "mnist1d", "synthetic", "imagefolder", *TORCHVISION_SETS]
MEMBER_SPLITS = ("iid", "classes", "dirichlet")   # how members share the training set (`member_shards`)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # imagefolder normalisation


@dataclass
class DataConfig:
    """Which data the members train on and how it is split and batched."""

    name: str = opt("digits", " | ".join(DATASETS) + " | package.module:callable")
    root: str = opt("data", "directory of torchvision datasets, or of an imagefolder tree: root/train/<class>/*.png, "
                            "optional root/val and root/test")
    kwargs: dict = opt({}, "package.module:callable datasets: keyword arguments of the callable")
    image_size: int = opt(224, "imagefolder: side of the square images the model sees")
    augment: bool = opt(True, "augment training images: imagefolder a random resized crop and horizontal flip; "
                              "cifar10/cifar100 a random crop after zero padding (data.crop_padding) and "
                              "horizontal flip, svhn the crop only (batched on the device); the others none")
    crop_padding: int = opt(4, "cifar10/cifar100/svhn with data.augment: pixels of padding before the random crop")
    download: bool = opt(False, "let torchvision download missing datasets (needs internet)")
    batch_size: int = opt(32, "batch size per rank")
    eval_batch_size: int = opt(256, "batch size for evaluation")
    val_fraction: float = opt(0.1, "share of the training data held out for validation")
    test_fraction: float = opt(0.2, "share held out for testing (digits and synthetic only; the others have a test set)")
    train_fraction: float = opt(1.0, "use only this share of the remaining training data")
    split_seed: int = opt(0, "seed of the train/validation/test split (fixed across members)")
    member_split: str = opt("iid", "which training samples each member sees: iid (all of them, each member in its "
                                   "own order), classes (the training set dealt out: member i owns classes c with "
                                   "c % k == i, and a share data.member_split_other of every other class), "
                                   "dirichlet (each class dealt out in proportions drawn from "
                                   "Dirichlet(data.member_split_alpha)); seeded by data.split_seed. Fine-tuning "
                                   "and the control train on the whole training set")
    member_split_alpha: float = opt(0.5, "data.member_split=dirichlet: the concentration (smaller: more skewed)")
    member_split_other: float = opt(0.1, "data.member_split=classes: share of each class its owner gives to the "
                                         "other members (split evenly among them)")
    resident_max_mb: float = opt(2048.0, "keep a split up to this size (MiB) as tensors on the training device; "
                                         "larger ones are read by a DataLoader (0: always)")
    loader_workers: Optional[int] = opt(None, "DataLoader worker processes for splits too large to keep resident "
                                              "(default: 0 on a CPU, min(4, CPU threads of the rank) with CUDA; "
                                              "pinned memory and persistent workers follow: on with CUDA / with "
                                              "workers)")
    synthetic_samples: int = opt(4096, "synthetic: number of samples")
    synthetic_shape: list = opt([64], "synthetic: shape of one sample")
    synthetic_classes: int = opt(10, "synthetic: number of classes")

    def __post_init__(self):
        if self.loader_workers is not None and self.loader_workers < 0:
            raise UserError(f"data.loader_workers must be >= 0, got {self.loader_workers}")
        if not is_import_path(self.name):
            check_choice(self.name, DATASETS, "dataset data.name")
        if self.crop_padding < 0:
            raise UserError(f"data.crop_padding must be >= 0, got {self.crop_padding}")
        if self.image_size < 1:
            raise UserError(f"data.image_size must be >= 1, got {self.image_size}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise UserError(f"data.batch_size and data.eval_batch_size must be >= 1, got {self.batch_size} "
                            f"and {self.eval_batch_size}")
        for key in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"data.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 < self.train_fraction <= 1:
            raise UserError(f"data.train_fraction must be in (0, 1], got {self.train_fraction}")
        check_choice(self.member_split, MEMBER_SPLITS, "data.member_split")
        if not 0 < self.member_split_alpha < float("inf"):
            raise UserError(f"data.member_split_alpha must be a positive number, got {self.member_split_alpha}")
        if not 0 <= self.member_split_other < 1:
            raise UserError(f"data.member_split_other must be in [0, 1), got {self.member_split_other}")


@dataclass
class Splits:
    """The three splits plus what a model needs to know about the inputs."""

    train: Dataset
    val: Dataset
    test: Dataset
    in_shape: tuple
    num_classes: int


def _split_indices(n: int, fractions, seed: int):
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for frac in fractions:
        size = int(round(n * frac))
        out.append(perm[start:start + size])
        start += size
    out.append(perm[start:])
    return out


def _holdout(full: Dataset, test: Dataset, cfg: DataConfig, in_shape, classes, val: Optional[Dataset] = None,
             eval_view: Optional[Dataset] = None) -> Splits:
    """Split `full` into train/val (seeded; a given `val` is used as it is) and subsample train by
    `train_fraction`. Carved validation samples are read through `eval_view` (the same samples without
    training augmentation) when given."""
    val_idx, train_idx = _split_indices(len(full), [cfg.val_fraction if val is None else 0.0], cfg.split_seed)
    if val is None and len(val_idx) == 0:
        _refuse_carving(cfg, "val", len(full))
    train_idx = np.sort(train_idx[:max(1, int(round(len(train_idx) * cfg.train_fraction)))])
    if val is None:
        val = Subset(full if eval_view is None else eval_view, np.sort(val_idx).tolist())
    return Splits(Subset(full, train_idx.tolist()), val, test, tuple(in_shape), classes)


def _carve_test(n: int, cfg: DataConfig):
    """(test indices, the rest) of n samples: the test set carved out of a dataset that brings none."""
    test_idx, rest = _split_indices(n, [cfg.test_fraction], cfg.split_seed)
    if len(test_idx) == 0:
        _refuse_carving(cfg, "test", n)
    return np.sort(test_idx), rest


def _refuse_carving(cfg: DataConfig, part: str, n: int):
    """A val or test set to be carved out of `n` samples would be empty: say why."""
    fraction, which = getattr(cfg, f"{part}_fraction"), {"val": "validation", "test": "test"}[part]
    if n == 0:
        raise UserError(f"{_where(cfg)} has no samples to split (an empty split cannot be trained, "
                        "validated or tested on); give it samples")
    if fraction == 0:
        raise UserError(f"{_where(cfg)} brings no {which} set and data.{part}_fraction=0 carves none; "
                        f"members are chosen on validation and compared on test: set data.{part}_fraction > 0")
    samples = "samples" if part == "test" else "samples left for training"
    raise UserError(f"{_where(cfg)}: its {n} {samples} are too few to carve a {which} set out of "
                    f"(data.{part}_fraction={fraction} of {n} rounds to 0); give more samples, raise "
                    f"data.{part}_fraction, or bring a {which} set of the dataset's own")


def _tensor_splits(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig, classes: int) -> Splits:
    test_idx, rest = _carve_test(len(x), cfg)
    test = TensorDataset(x[test_idx], y[test_idx])
    return _holdout(TensorDataset(x[rest], y[rest]), test, cfg, x.shape[1:], classes)


def load_digits_splits(cfg: DataConfig) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0   # [1797, 1, 8, 8] in [0, 1]
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.long)
    return _tensor_splits(x, y, cfg, 10)


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays():
    """The published MNIST-1D split (Greydanus & Kobak), regenerated offline from its templates.

    `make_dataset(get_dataset_args())` with the package's own arguments (seed 42, 5000 samples,
    length 40) gives the 4000/1000 split of the published file; the downloader is never called.
    The generator seeds Python's and NumPy's global RNGs: their states are put back afterwards.
    """
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise UserError("data.name=mnist1d needs the mnist1d package (a dependency of ntdist): "
                        "pip install mnist1d, or reinstall ntdist") from None
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def load_mnist1d_splits(cfg: DataConfig) -> Splits:
    """MNIST-1D as [N, 1, 40] float signals; the published test set, validation carved from train."""
    x, y, x_test, y_test = _mnist1d_arrays()
    as_x = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    test = TensorDataset(as_x(x_test), as_y(y_test))
    return _holdout(TensorDataset(as_x(x), as_y(y)), test, cfg, (1, x.shape[1]), 10)


def load_synthetic_splits(cfg: DataConfig) -> Splits:
    """Gaussian class clusters in `synthetic_shape`: cheap data of any size for scale tests."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    shape = tuple(cfg.synthetic_shape)
    dim = int(np.prod(shape))
    centers = torch.randn(cfg.synthetic_classes, dim, generator=g)
    y = torch.randint(0, cfg.synthetic_classes, (cfg.synthetic_samples,), generator=g)
    x = centers[y] + 1.5 * torch.randn(cfg.synthetic_samples, dim, generator=g)
    return _tensor_splits(x.view(-1, *shape), y, cfg, cfg.synthetic_classes)


def synthetic_shapes(cfg: DataConfig) -> Splits:
    """The splits `load_synthetic_splits` makes, as `meta` tensors: their sizes and shapes without the data
    (what `ntdist run --dry-run` needs of a million samples)."""
    x = torch.empty(cfg.synthetic_samples, *cfg.synthetic_shape, device="meta")
    y = torch.empty(cfg.synthetic_samples, dtype=torch.long, device="meta")
    return _tensor_splits(x, y, cfg, cfg.synthetic_classes)


def _image_tensors(data, in_shape, mean, std, augment: Augment = Augment()) -> ImageTensors:
    """A torchvision set's decoded uint8 `data` ([N, H, W], [N, H, W, C] or [N, C, H, W]) as `ImageTensors`."""
    images = torch.as_tensor(data.data)
    if tuple(images.shape[1:]) != tuple(in_shape):   # channels last (CIFAR) or none (MNIST)
        images = images.reshape(len(images), in_shape[1], in_shape[2], in_shape[0]).permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(data.labels if hasattr(data, "labels") else data.targets))
    return ImageTensors(images.contiguous(), labels, mean, std, augment)


def load_torchvision_splits(cfg: DataConfig) -> Splits:
    """A torchvision set decoded once into uint8 `ImageTensors` (normalised per batch, augmented in batches)."""
    import torchvision

    cls_name, in_shape, classes, expected, mean, std = TORCHVISION_SETS[cfg.name]
    cls = getattr(torchvision.datasets, cls_name)
    root = os.path.expanduser(cfg.root)
    try:
        if cfg.name == "svhn":
            full = cls(root, split="train", download=cfg.download)
            test = cls(root, split="test", download=cfg.download)
        else:
            full = cls(root, train=True, download=cfg.download)
            test = cls(root, train=False, download=cfg.download)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise UserError(
            f"{cls_name} not found under '{root}' ({str(err).splitlines()[0]}): expected {expected} there; "
            f"set data.root to the folder that holds them, or data.download=true on a machine with internet") from None
    augment = Augment(cfg.crop_padding, CROP_AND_FLIP[cfg.name]) if cfg.augment and cfg.name in CROP_AND_FLIP \
        else Augment()
    full = _image_tensors(full, in_shape, mean, std, augment)
    return _holdout(full, _image_tensors(test, in_shape, mean, std), cfg, in_shape, classes,
                    eval_view=full.without_augment())


def load_imagefolder_splits(cfg: DataConfig) -> Splits:
    """root/train/<class>/<image> (any format PIL reads), optional root/val and root/test with the same classes;
    what is missing is carved out of train (data.val_fraction, data.test_fraction). Every file is checked
    before anything trains (`images.list_image_files`)."""
    from torchvision import transforms
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = os.path.expanduser(cfg.root)
    folders = {part: os.path.join(root, part) for part in ("train", "val", "test")}
    if not os.path.isdir(folders["train"]):
        raise UserError(f"data.name=imagefolder needs '{folders['train']}' with one folder of images per class "
                        "(optionally val/ and test/ beside it); set data.root to the folder that holds train/")
    size, norm = cfg.image_size, transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = transforms.Compose([transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size),
                                  transforms.ToTensor(), norm])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm]) if cfg.augment else eval_tf
    try:
        listed = {part: list_image_files(folder, IMG_EXTENSIONS, root) for part, folder in folders.items()
                  if part == "train" or os.path.isdir(folder)}
    except OSError as err:
        raise UserError(f"imagefolder under '{root}': {str(err).splitlines()[0]}") from None
    classes = listed["train"][0]
    for part, (names, _) in listed.items():
        if names != classes:
            raise UserError(f"'{folders[part]}' has classes {names}, but train/ has {classes}; "
                            "every split needs the same class folders")
    full = ImageFiles(*listed["train"], train_tf, varies_per_read=cfg.augment)
    plain = ImageFiles(*listed["train"], eval_tf)
    given = {part: ImageFiles(*listed[part], eval_tf) for part in ("val", "test") if part in listed}
    test = given.get("test")
    if test is None:
        test_idx, rest = _carve_test(len(full), cfg)
        test = Subset(plain, test_idx.tolist())
        full, plain = Subset(full, rest.tolist()), Subset(plain, rest.tolist())
    return _holdout(full, test, cfg, (3, size, size), len(classes), val=given.get("val"), eval_view=plain)


def load_callable_splits(cfg: DataConfig) -> Splits:
    """`package.module:callable(**data.kwargs)` returns (train, val, test) datasets of (input, label) pairs;
    val and test may be None (then they are carved out of train). The class count is the train set's
    `classes` attribute when it has one, else the largest label + 1. The sets are checked as returned
    (`ntdist.datacheck`), so a message's sample index is one in the user's own set."""
    train, val, test = call_dataset(cfg.name, cfg.kwargs)
    in_shape, classes = check_splits({"train": train, "val": val, "test": test}, _where(cfg), cfg.resident_max_mb)
    if test is None:
        test_idx, rest = _carve_test(len(train), cfg)
        train, test = Subset(train, rest.tolist()), Subset(train, test_idx.tolist())
    return _holdout(train, test, cfg, in_shape, classes, val=val)


def load_splits(cfg: DataConfig) -> Splits:
    """Load the dataset named in `cfg` and return its seeded train/val/test splits, checked before anything
    trains (`ntdist.datacheck`; image folders file by file)."""
    if is_import_path(cfg.name):
        splits = load_callable_splits(cfg)
    elif cfg.name == "imagefolder":
        splits = load_imagefolder_splits(cfg)
    else:
        if cfg.name == "digits":
            splits = load_digits_splits(cfg)
        elif cfg.name == "mnist1d":
            splits = load_mnist1d_splits(cfg)
        elif cfg.name == "synthetic":
            splits = load_synthetic_splits(cfg)
        else:
            check_choice(cfg.name, DATASETS, "dataset data.name")
            splits = load_torchvision_splits(cfg)
        check_splits({"train": splits.train, "val": splits.val, "test": splits.test}, _where(cfg),
                     cfg.resident_max_mb, splits.num_classes)
    _check_sizes(splits, cfg)
    return splits


def _check_sizes(splits: Splits, cfg: DataConfig) -> None:
    """A val or test set the dataset brings must have samples (carved ones are checked as they are carved)."""
    for part in ("val", "test"):
        if len(getattr(splits, part)) == 0:
            raise UserError(f"{_where(cfg)} brings an empty {part} set; give it samples, or bring none (None, or no "
                            f"{part}/ folder) to have it carved out of train")


def _where(cfg: DataConfig) -> str:
    """How messages name the dataset."""
    return f"data.name '{cfg.name}'" if is_import_path(cfg.name) else f"dataset '{cfg.name}'"
