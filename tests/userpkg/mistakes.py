"""Models with one mistake each, as users write them: `model.name: userpkg.mistakes:<builder>`.

Not a test file: tests/unit/test_model_mistakes.py, tests/unit/test_fusion_ties.py and
tests/unit/test_dryrun_checks.py name these builders.
"""

import sys

import torch
import torch.nn as nn


def raises(input_dim: int, num_classes: int):
    raise RuntimeError("CUDA kernels for my_op are not compiled")


def three_classes(input_dim: int, num_classes: int):
    """Ignores num_classes: always 3 outputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_dim, 8), nn.ReLU(), nn.Linear(8, 3))


def no_parameters(input_dim: int, num_classes: int):
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def float64(input_dim: int, num_classes: int):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_dim, 8), nn.ReLU(), nn.Linear(8, num_classes)).double()


def exits(input_dim: int, num_classes: int):
    sys.exit(0)


class GRUNet(nn.Module):
    """A recurrent layer: no channel analysis for NT."""

    def __init__(self, input_dim: int, num_classes: int):
        super().__init__()
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], -1, 8))
        return self.head(out[:, -1])


def gru(input_dim: int, num_classes: int):
    return GRUNet(input_dim, num_classes)


class CalledTwice(nn.Module):
    """One square Linear applied twice in forward: its weight is tied to itself across two uses."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 12):
        super().__init__()
        self.inp = nn.Linear(input_dim, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = torch.relu(self.inp(x.flatten(1)))
        x = torch.relu(self.fc(x))
        x = torch.relu(self.fc(x))
        return self.head(x)


def called_twice(input_dim: int, num_classes: int, hidden: int = 12):
    return CalledTwice(input_dim, num_classes, hidden)


class SharedWeight(nn.Module):
    """Two Linear modules holding one weight Parameter (`self.b.weight = self.a.weight`)."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 12):
        super().__init__()
        self.inp = nn.Linear(input_dim, hidden)
        self.a = nn.Linear(hidden, hidden)
        self.b = nn.Linear(hidden, hidden)
        self.b.weight = self.a.weight
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = torch.relu(self.inp(x.flatten(1)))
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        return self.head(x)


def shared_weight(input_dim: int, num_classes: int, hidden: int = 12):
    return SharedWeight(input_dim, num_classes, hidden)


class ReadsAValue(nn.Module):
    """Reads a value out of a tensor in forward (`.item()`): fine on real tensors, impossible on `meta`."""

    def __init__(self, input_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(input_dim, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x) * (1.0 if x.abs().max().item() >= 0 else 0.0)


def reads_a_value(input_dim: int, num_classes: int):
    return ReadsAValue(input_dim, num_classes)
