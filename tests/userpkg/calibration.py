"""Calibration callables as users write them for `ntdist fuse --calibration package.module:callable`.

Not a test file: tests/unit/test_fuse_calibration.py names them.
"""

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

INPUTS = torch.randn(200, 12, generator=torch.Generator().manual_seed(3))


def loader() -> DataLoader:
    """A DataLoader of (input, label) batches."""
    return DataLoader(TensorDataset(INPUTS, torch.zeros(200, dtype=torch.long)), batch_size=32)


def bare_inputs() -> list:
    """A list of single inputs, without labels."""
    return list(INPUTS)


class _Dicts(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return {"x": INPUTS[index], "y": 0}


def dict_items() -> Dataset:
    """A dataset whose items are dicts: not (input, label) pairs."""
    return _Dicts()
