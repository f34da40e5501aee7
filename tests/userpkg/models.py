"""A small model defined outside ntdist: `model.name: userpkg.models:small_net`."""

import torch.nn as nn


class SmallNet(nn.Module):
    """Flatten, one hidden ReLU layer, a classifier head named `head`."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(input_dim, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def small_net(input_dim: int, num_classes: int, hidden: int = 16) -> nn.Module:
    """ntdist fills in input_dim and num_classes from the data because this signature names them."""
    return SmallNet(input_dim, num_classes, hidden)


def not_a_model(**kwargs):
    return "a string"


_FORWARDS = [0]


def sigterm_net(input_dim: int, num_classes: int, hidden: int = 16, at: int = 50) -> nn.Module:
    """`small_net` that sends its own process SIGTERM at the `at`-th training forward pass of the process, as a
    scheduler's preemption would."""
    import os
    import signal

    model = SmallNet(input_dim, num_classes, hidden)

    def hook(module, inputs):
        if module.training:
            _FORWARDS[0] += 1
            if _FORWARDS[0] == at:
                os.kill(os.getpid(), signal.SIGTERM)
    model.register_forward_pre_hook(hook)
    return model


def conv1d_net(num_classes: int, width: int = 32) -> nn.Module:
    """A small 1-D CNN for signals of shape [1, 40] (MNIST-1D), as docs/USAGE.md writes it: its signature says
    nothing about the input's shape."""
    return nn.Sequential(nn.Conv1d(1, width, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                         nn.Flatten(), nn.Linear(width * 20, num_classes))


def bn_net(input_dim: int, num_classes: int, hidden: int = 32, depth: int = 2) -> nn.Module:
    """An MLP with BatchNorm after each hidden layer: a fused copy needs its running statistics re-estimated."""
    layers, dim = [nn.Flatten()], input_dim
    for _ in range(depth):
        layers += [nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        dim = hidden
    return nn.Sequential(*layers, nn.Linear(dim, num_classes))
