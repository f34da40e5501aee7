"""Mistakes in the data are refused while loading: one line naming the split, the first bad sample or file and
the fix, exit 2, before anything trains and before the run directory exists.

Run: .venv/bin/python -m pytest tests/unit/test_data_mistakes.py
"""

import os

import numpy as np
import pytest
from PIL import Image

from helpers import QUICK, ROOT
from ntdist.cli import main
from ntdist.data import DataConfig, load_splits
from ntdist.errors import UserError
from ntdist.images import ImageFiles, list_image_files

BLOBS = "data.name=userpkg.datasets:blobs_with"


def refused(tmp_path, capsys, *overrides) -> str:
    """The one line `ntdist run` prints for `overrides` on the quickstart; it must exit 2 and write nothing."""
    out = tmp_path / "run"
    code = main(["run", os.path.join(ROOT, QUICK[0]), *QUICK[1:], f"output.dir={out}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ntdist: error: "), err
    assert not out.exists()   # refused before the run directory was made
    return err


@pytest.mark.parametrize("split, mistake, words", [
    ("train", "nan", "train sample 7 has NaN in its inputs"),
    ("val", "inf", "val sample 7 has an infinite value in its inputs"),
    ("test", "nan", "test sample 7 has NaN in its inputs"),
])
@pytest.mark.parametrize("as_list", [False, True])   # tensors, and samples read one at a time
def test_nan_or_inf_in_any_split_is_refused_at_load(tmp_path, capsys, split, mistake, words, as_list):
    err = refused(tmp_path, capsys, BLOBS, f"data.kwargs.mistake={mistake}", f"data.kwargs.split={split}",
                  f"data.kwargs.as_list={str(as_list).lower()}")
    assert "data.name 'userpkg.datasets:blobs_with'" in err and words in err and "torch.nan_to_num" in err


def test_a_lazy_split_that_fits_the_resident_budget_is_read_whole(tmp_path, capsys):
    err = refused(tmp_path, capsys, BLOBS, "data.kwargs.mistake=nan", "data.kwargs.index=290",
                  "data.kwargs.as_list=true")   # past the first 256 samples
    assert "train sample 290 has NaN" in err


@pytest.mark.parametrize("split, mistake, words", [
    ("test", "label57", "test sample 7 has label 57, but there are 3 classes (labels 0..2, counted"),
    ("train", "negative", "train sample 7 has label -1"),
    ("train", "float_labels", "train sample 0 has a torch.float32 label (0.0); labels must be integer class "
                              "indices 0..C-1: convert them with .long()"),
    ("train", "one_hot", "train sample 0 has a label of shape [3] ([1, 0, 0]); ntdist needs one class index"),
    ("train", "int_inputs", "train sample 0 has torch.int64 inputs; models take float32: convert the inputs "
                            "with .float()"),
    ("val", "wider", "val sample 0 has inputs of shape [7], the train set's are [6]"),
])
@pytest.mark.parametrize("as_list", [False, True])
def test_labels_and_inputs_that_would_fail_in_training_are_refused_at_load(tmp_path, capsys, split, mistake,
                                                                           words, as_list):
    err = refused(tmp_path, capsys, BLOBS, f"data.kwargs.mistake={mistake}", f"data.kwargs.split={split}",
                  f"data.kwargs.as_list={str(as_list).lower()}")
    assert words in err


def test_ragged_samples_name_the_first_one_of_another_shape(tmp_path, capsys):
    err = refused(tmp_path, capsys, "data.name=userpkg.datasets:ragged")
    assert "train sample 4 has inputs of shape [5], sample 0's are [6]; every input needs the same shape" in err


def test_a_dataset_callable_that_raises_is_named_with_its_exception(tmp_path, capsys):
    err = refused(tmp_path, capsys, "data.name=userpkg.datasets:raises")
    assert "data.name 'userpkg.datasets:raises' raised FileNotFoundError: [Errno 2] No such file or directory: " \
           "'/data/blobs.csv'" in err


def test_a_callable_that_returns_text_or_an_empty_train_set(tmp_path, capsys):
    err = refused(tmp_path, capsys, "data.name=userpkg.datasets:returns_text")
    assert "must return (train, val, test) datasets" in err and "got str" in err
    err = refused(tmp_path, capsys, "data.name=userpkg.datasets:empty")
    assert "data.name 'userpkg.datasets:empty' returned an empty train set" in err


def test_three_samples_are_too_few_to_carve_validation_and_test_sets(tmp_path, capsys):
    err = refused(tmp_path, capsys, "data.name=userpkg.datasets:few")
    assert "too few to carve a validation set" in err and "data.val_fraction=0.1 of 2 rounds to 0" in err
    err = refused(tmp_path, capsys, "data.val_fraction=0")   # digits: nothing to choose the best member on
    assert "data.val_fraction=0 carves none" in err


def test_a_typo_in_data_kwargs_is_a_usage_error_with_a_suggestion(tmp_path, capsys):
    err = refused(tmp_path, capsys, "data.name=userpkg.datasets:blobs", "data.kwargs.sample=3")
    assert "data.kwargs do not fit 'userpkg.datasets:blobs': it takes no argument 'sample' " \
           "(did you mean 'samples'?)" in err


def write_tree(root, train=12, test=4):
    """root/{train,test}/{blue,red}/<i>.png: small images of one noisy colour per class."""
    rng = np.random.default_rng(0)
    for part, n in (("train", train), ("test", test)):
        for name, colour in (("blue", (20, 40, 220)), ("red", (220, 30, 30))):
            (root / part / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (10, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / part / name / f"{i}.png")


def images(tree, *more):
    return ("data.name=imagefolder", f"data.root={tree}", "data.image_size=8", "model.kwargs.width=8", *more)


@pytest.mark.parametrize("damage, words", [
    (lambda png: png.write_bytes(png.read_bytes()[:40]), "ends before the last chunk of a PNG (cut short?) and "
                                                         "cannot be decoded"),
    (lambda png: png.write_bytes(b""), "is empty (0 bytes)"),
])
def test_a_truncated_or_empty_image_file_is_named(tmp_path, capsys, damage, words):
    write_tree(tmp_path / "tree")
    damage(tmp_path / "tree" / "test" / "red" / "3.png")
    err = refused(tmp_path, capsys, *images(tmp_path / "tree"))
    assert f"image '{tmp_path / 'tree' / 'test' / 'red' / '3.png'}' {words}" in err


def test_a_folder_link_back_into_the_tree_is_refused_not_followed(tmp_path, capsys):
    write_tree(tmp_path / "tree")
    os.symlink("..", tmp_path / "tree" / "train" / "red" / "loop")   # ImageFolder reads red/loop/loop/... 40 deep
    err = refused(tmp_path, capsys, *images(tmp_path / "tree"))
    assert f"the folder link '{tmp_path / 'tree' / 'train' / 'red' / 'loop'}' leads back into the data tree" in err
    assert "ntdist does not follow such links" in err
    os.remove(tmp_path / "tree" / "train" / "red" / "loop")
    os.symlink(tmp_path / "tree" / "test" / "red", tmp_path / "tree" / "train" / "blue" / "more")   # test images
    assert "leads back into the data tree" in refused(tmp_path, capsys, *images(tmp_path / "tree"))


def test_folder_links_out_of_the_tree_are_followed_in_torchvisions_order(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    write_tree(tmp_path / "tree")
    write_tree(tmp_path / "elsewhere", train=3, test=0)
    (tmp_path / "tree" / "train" / "red" / "a").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tree" / "train" / "red" / "a" / "0.png")
    os.symlink(tmp_path / "elsewhere" / "train" / "red", tmp_path / "tree" / "train" / "red" / "more")
    classes, samples = list_image_files(str(tmp_path / "tree" / "train"), IMG_EXTENSIONS, str(tmp_path / "tree"))
    reference = ImageFolder(str(tmp_path / "tree" / "train"))
    assert classes == reference.classes and samples == reference.samples and len(samples) == 12 + 12 + 1 + 3
    splits = load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "tree"), image_size=8))
    assert isinstance(splits.test, ImageFiles) and len(splits.train) + len(splits.val) == 28


def test_an_image_that_fails_to_decode_while_training_names_the_file(tmp_path, capsys):
    write_tree(tmp_path / "tree")
    png = tmp_path / "tree" / "train" / "red" / "3.png"
    data = bytearray(png.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start + 2:start + 10] = b"\xff" * 8   # starts and ends as a PNG does: only decoding finds it
    png.write_bytes(bytes(data))
    code = main(["run", os.path.join(ROOT, QUICK[0]), *QUICK[1:], f"output.dir={tmp_path / 'run'}",
                 *images(tmp_path / "tree", "data.loader_workers=1", "train.epochs=1")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"ntdist: error: image '{png}' cannot be decoded (broken data stream when reading " \
                                "image file); delete or replace it"


def test_built_in_datasets_pass_the_checks():
    for name in ("digits", "mnist1d", "synthetic"):
        load_splits(DataConfig(name=name))
    with pytest.raises(UserError, match="has no samples to split \\(an empty split"):
        load_splits(DataConfig(name="synthetic", synthetic_samples=0))
