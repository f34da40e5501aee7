"""Members that see different data: the training set dealt out among the k members (`data.member_split`).

`iid` keeps today's setting (every member trains on the whole training set, in its own order). `classes`
and `dirichlet` partition the training set, the heterogeneous settings of the OT-fusion paper and of
federated learning: under `classes` member i owns the classes c with c % k == i and gives a share
`member_split_other` of each to the other members; under `dirichlet` each class is dealt out in
proportions drawn from Dirichlet(alpha, ..., alpha). Both are seeded by `data.split_seed`, so every rank and
every rerun deals the same shards. Only member training uses the shards; fine-tuning and the control train
on the whole training set.
"""

from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ntdist.errors import UserError
from ntdist.images import ImageTensors


def labels_of(data: Dataset) -> torch.Tensor:
    """The class index of every sample of `data`, read without decoding images where the data allows."""
    base, index = data, None
    while isinstance(base, Subset):
        inner = torch.as_tensor(base.indices, dtype=torch.long)
        index = inner if index is None else inner[index]
        base = base.dataset
    if isinstance(base, ImageTensors):
        labels = base.labels
    elif isinstance(base, TensorDataset):
        labels = base.tensors[1]
    else:
        return torch.as_tensor([int(data[i][1]) for i in range(len(data))], dtype=torch.long)
    labels = torch.as_tensor(labels).long()
    return labels if index is None else labels[index]


def shard_indices(labels: torch.Tensor, k: int, how: str, seed: int, alpha: float, other: float) -> List[np.ndarray]:
    """The sorted sample indices of each of `k` members (a partition of range(len(labels)))."""
    rng = np.random.default_rng([seed, k, 7919])   # 7919: a stream apart from the train/val/test split's
    labels = np.asarray(labels)
    parts: List[List[np.ndarray]] = [[] for _ in range(k)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if how == "classes":
            owner = int(c) % k
            own = len(idx) if k == 1 else int(round(len(idx) * (1 - other)))
            parts[owner].append(idx[:own])
            for member, piece in zip([m for m in range(k) if m != owner], np.array_split(idx[own:], k - 1)):
                parts[member].append(piece)
        else:
            cuts = (np.cumsum(rng.dirichlet([alpha] * k))[:-1] * len(idx)).round().astype(int)
            for member, piece in enumerate(np.split(idx, cuts)):
                parts[member].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def member_shards(train: Dataset, k: int, cfg) -> Optional[List[Dataset]]:
    """Each member's training set under `cfg.member_split` (a `DataConfig`), or None for `iid` (all of it)."""
    if cfg.member_split == "iid":
        return None
    shards = shard_indices(labels_of(train), k, cfg.member_split, cfg.split_seed, cfg.member_split_alpha,
                           cfg.member_split_other)
    for i, shard in enumerate(shards):
        if len(shard) == 0:
            hint = ("raise data.member_split_alpha" if cfg.member_split == "dirichlet"
                    else "use fewer members than classes or a larger data.member_split_other")
            raise UserError(f"data.member_split={cfg.member_split} leaves member {i} of {k} without training "
                            f"samples ({len(train)} samples to deal out); {hint}")
    return [Subset(train, s.tolist()) for s in shards]
