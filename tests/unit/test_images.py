"""uint8 images on the device: the same values as the float path, seeded batched augmentation, resumable.

Run: .venv/bin/python -m pytest tests/unit/test_images.py
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

from helpers import make_run, write_cifar
from ntdist.data import DataConfig, load_splits
from ntdist.errors import UserError
from ntdist.images import Augment, ImageTensors, augment_batch
from ntdist.training.batches import (LoaderBatches, TensorBatches, eval_batches, image_source, stacked_batches,
                                     train_batches)

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _images(n=90, augment=Augment()):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 6, 5), dtype=torch.uint8, generator=g)
    return ImageTensors(images, torch.arange(n) % 10, MEAN, STD, augment)


def _torchvision_floats(data: ImageTensors) -> TensorDataset:
    """The float32 dataset torchvision's ToTensor + Normalize make of the same images (the old path)."""
    from torchvision import transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    x = torch.stack([tf(img.permute(1, 2, 0).numpy()) for img in data.images])
    return TensorDataset(x, data.labels)


@pytest.mark.parametrize("replicas", [1, 2])
def test_uint8_batches_equal_the_float_path_without_augmentation(replicas):
    data = _images()
    floats = _torchvision_floats(data)
    keep = list(range(3, 80))
    for rank in range(replicas):
        uint8 = train_batches(Subset(data, keep), 16, 5, replicas, rank, max_mb=10)
        plain = train_batches(Subset(floats, keep), 16, 5, replicas, rank, max_mb=10)
        assert isinstance(uint8, TensorBatches) and uint8.x.dtype == torch.uint8 and plain.x.dtype == torch.float32
        assert uint8.x.numel() * 4 == plain.x.numel() * plain.x.element_size()   # a quarter of the memory
        for epoch in (1, 2):
            uint8.set_epoch(epoch)
            plain.set_epoch(epoch)
            pairs = list(zip(uint8, plain))
            assert len(pairs) == len(plain)
            for (x1, y1), (x2, y2) in pairs:
                assert x1.dtype == torch.float32 and torch.equal(y1, y2)
                torch.testing.assert_close(x1, x2, rtol=0, atol=1e-6)
    evaluated = torch.cat([x for x, _ in eval_batches(Subset(data, keep), 7, 2, 1, max_mb=10)])
    torch.testing.assert_close(evaluated, floats.tensors[0][keep][1::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(data[4][0], floats[4][0], rtol=0, atol=1e-6)


def test_augment_batch_crops_the_padded_image_and_flips():
    x = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8)
    draws = torch.tensor([[0, 0, 0], [4, 4, 1], [2, 1, 0], [3, 0, 1]])
    got = augment_batch(x, draws, 2, 0)
    for image, (top, left, flip), out in zip(x, draws.tolist(), got):
        want = F.pad(image, (2, 2, 2, 2))[:, top:top + 6, left:left + 5]
        assert torch.equal(out, want.flip(2) if flip else want)
    assert torch.equal(augment_batch(x, torch.zeros(4, 3, dtype=torch.long), 0, 0), x)


def test_augmentation_depends_only_on_seed_and_epoch_on_every_path_and_layout():
    data = Subset(_images(augment=Augment(2, True)), list(range(80)))
    first, again = train_batches(data, 8, 3, max_mb=10), train_batches(data, 8, 3, max_mb=10)
    first.set_epoch(1)
    again.set_epoch(1)
    one = [x for x, _ in first]
    assert all(torch.equal(a, b) for a, b in zip(one, [x for x, _ in again]))   # reproducible
    plain = [x for x, _ in train_batches(Subset(_images(), list(range(80))), 8, 3, max_mb=10)]
    assert not all(torch.equal(a, b) for a, b in zip(one, plain))              # and it does augment
    first.set_epoch(2)
    assert not all(torch.equal(a, b) for a, b in zip(one, [x for x, _ in first]))   # redrawn per epoch
    loader = train_batches(data, 8, 3, max_mb=0)                                # the DataLoader path
    assert isinstance(loader, LoaderBatches)
    loader.set_epoch(1)
    for a, b in zip(one, [x for x, _ in loader]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    ranks = [train_batches(data, 4, 3, 2, rank, max_mb=10) for rank in (0, 1)]  # 2 ranks of batch 4
    for r in ranks:
        r.set_epoch(1)
    for whole, (x0, _), (x1, _) in zip(one, *ranks):
        assert torch.equal(whole[0::2], x0) and torch.equal(whole[1::2], x1)


def test_stacked_batches_are_each_members_own_batches():
    data = Subset(_images(augment=Augment(2, True)), list(range(75)))
    members = [train_batches(data, 8, seed, max_mb=10) for seed in (3, 4, 5)]
    for m in members:
        m.set_epoch(2)
    alone = [list(m) for m in members]
    stacked = list(stacked_batches(members))
    assert len(stacked) == len(alone[0]) == 10 and stacked[-1][0].shape == (3, 3, 3, 6, 5)
    for step, (x, y) in enumerate(stacked):
        for i in range(3):
            assert torch.equal(x[i], alone[i][step][0]) and torch.equal(y[i], alone[i][step][1])


def test_image_tensors_refuse_what_they_cannot_hold():
    with pytest.raises(UserError, match="uint8"):
        ImageTensors(torch.zeros(2, 3, 4, 4), torch.zeros(2), MEAN, STD)
    with pytest.raises(UserError, match="one mean and std per channel"):
        ImageTensors(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2), (0.5,), (0.5,))
    with pytest.raises(UserError, match="crop_padding"):
        DataConfig(crop_padding=-1)


def _cifar10(root, monkeypatch):
    import torchvision
    write_cifar(root, "cifar-10-batches-py", [(f"data_batch_{i}", 24) for i in range(1, 6)] + [("test_batch", 30)],
                "batches.meta", "label_names", "labels", 10)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


def test_cifar_is_kept_as_uint8_and_augmented_in_training_only(tmp_path, monkeypatch):
    from torchvision import datasets, transforms
    _cifar10(tmp_path, monkeypatch)
    splits = load_splits(DataConfig(name="cifar10", root=str(tmp_path)))
    train, _ = image_source(splits.train)
    val, _ = image_source(splits.val)
    assert train.images.dtype == torch.uint8 and train.augment == Augment(4, True) and not val.augment
    assert not load_splits(DataConfig(name="cifar10", root=str(tmp_path), augment=False)).train.dataset.augment
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.4914, 0.4822, 0.4465),
                                                                         (0.2470, 0.2435, 0.2616))])
    reference = datasets.CIFAR10(str(tmp_path), train=False, transform=tf)
    assert torch.equal(splits.test[3][0], reference[3][0]) and int(splits.test[3][1]) == reference[3][1]


def test_augmented_training_resumes_bit_identically_and_vectorises(tmp_path, monkeypatch):
    import ntdist.stages.vectorized as vectorized
    from ntdist.errors import Preempted
    from ntdist.stages.members import train_members

    _cifar10(tmp_path, monkeypatch)
    args = ["data.name=cifar10", f"data.root={tmp_path}", "model.kwargs.width=8", "fusion.k=4", "train.epochs=2",
            "data.batch_size=16"]
    whole = train_members(make_run(tmp_path / "whole", *args, "train.vectorize=off"), [0, 1, 2, 3], {})
    together = train_members(make_run(tmp_path / "together", *args, "train.vectorize=on"), [0, 1, 2, 3], {})
    monkeypatch.setattr(vectorized, "preempt_requested", lambda: True)
    cut = make_run(tmp_path / "cut", *args, "train.vectorize=on")
    with pytest.raises(Preempted, match="after epoch 1"):
        train_members(cut, [0, 1, 2, 3], {})
    cut.rundir.release()
    monkeypatch.setattr(vectorized, "preempt_requested", lambda: False)
    resumed = train_members(make_run(tmp_path / "cut", *args, "train.vectorize=on", resume=True), [0, 1, 2, 3], {})
    for i in range(4):
        for key, a in whole[i][0].state_dict().items():
            torch.testing.assert_close(together[i][0].state_dict()[key], a, rtol=0, atol=1e-4)
            assert torch.equal(resumed[i][0].state_dict()[key], together[i][0].state_dict()[key])
