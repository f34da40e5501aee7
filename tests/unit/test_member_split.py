"""Members that see different data (`data.member_split`): the shards are a seeded partition with the skew
asked for, runs train each member on its own shard, and the mistakes are one line.

Run: pytest tests/unit/test_member_split.py
"""

import numpy as np
import pytest
import torch

from ntdist.cli import main
from ntdist.config import load_config
from ntdist.data import load_splits
from ntdist.errors import UserError
from ntdist.records.checkpoint import load_model
from ntdist.records.results import read_results
from ntdist.shards import labels_of, member_shards, shard_indices

LABELS = torch.arange(10).repeat_interleave(50)   # 10 classes, 50 samples each


@pytest.mark.parametrize("how", ["classes", "dirichlet"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_shards_partition_the_training_set_and_are_seeded(how, k):
    shards = shard_indices(LABELS, k, how, seed=3, alpha=0.5, other=0.1)
    joined = np.concatenate(shards)
    assert len(shards) == k and sorted(joined.tolist()) == list(range(len(LABELS)))   # each sample once
    again = shard_indices(LABELS, k, how, seed=3, alpha=0.5, other=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other_seed = shard_indices(LABELS, k, how, seed=4, alpha=0.5, other=0.1)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other_seed))


def test_classes_gives_each_owner_its_classes_and_a_share_of_the_rest():
    shards = shard_indices(LABELS, 2, "classes", seed=0, alpha=0.5, other=0.1)
    for member, shard in enumerate(shards):
        counts = np.bincount(LABELS[shard].numpy(), minlength=10)
        own = counts[member::2]
        others = np.delete(counts, np.arange(member, 10, 2))
        assert (own == 45).all() and (others == 5).all()
    only_own = shard_indices(LABELS, 2, "classes", seed=0, alpha=0.5, other=0.0)
    assert set(LABELS[only_own[1]].tolist()) == {1, 3, 5, 7, 9}


def test_dirichlet_skew_follows_alpha():
    def spread(alpha):   # mean over classes of the largest member share: 1/k when even, 1 when one owns all
        shards = shard_indices(LABELS, 4, "dirichlet", seed=1, alpha=alpha, other=0.1)
        counts = np.stack([np.bincount(LABELS[s].numpy(), minlength=10) for s in shards])
        return (counts.max(0) / counts.sum(0)).mean()
    assert spread(0.05) > 0.8 > 0.4 > spread(1000.0)


def test_labels_are_read_through_subsets_without_iterating():
    cfg = load_config(None, ["data.name=digits"]).data
    train = load_splits(cfg).train
    assert torch.equal(labels_of(train), torch.tensor([int(train[i][1]) for i in range(len(train))]))


@pytest.mark.parametrize("override, words", [
    ("data.member_split=shards", "unknown data.member_split 'shards'"),
    ("data.member_split_alpha=0", "data.member_split_alpha must be a positive number"),
    ("data.member_split_other=1", "data.member_split_other must be in [0, 1)"),
])
def test_config_mistakes_are_one_line(override, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_a_member_left_without_samples_is_refused():
    cfg = load_config(None, ["data.member_split=classes"]).data
    tiny = torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([0, 0, 0]))
    with pytest.raises(UserError, match="leaves member 1 of 2 without training samples"):
        member_shards(tiny, 2, cfg)


def test_each_member_trains_on_its_own_classes(tmp_path):
    run = tmp_path / "run"
    code = main(["run", "configs/quickstart.yaml", f"output.dir={run}", "train.epochs=4", "finetune.epochs=1",
                 "fusion.methods=[avg]", "data.member_split=classes", "data.member_split_other=0"])
    assert code == 0
    x = torch.stack([s[0] for s in load_splits(load_config("configs/quickstart.yaml").data).test])
    for member in range(2):
        model, _ = load_model(str(run / "checkpoints" / f"member{member}.safetensors"))
        predicted = model.eval()(x).argmax(1)
        assert (predicted % 2 == member).float().mean() > 0.99   # a member never saw the other's classes
    results = read_results(str(run))
    assert results.ensemble > max(results.members) + 0.2   # the two halves together know every class


def test_modes_that_train_no_sharded_members_refuse_it(tmp_path):
    code = main(["run", "configs/sync_sgd.yaml", f"output.dir={tmp_path / 'run'}", "data.member_split=dirichlet"])
    assert code == 2
