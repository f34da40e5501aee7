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
