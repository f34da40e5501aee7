"""Multi-layer perceptron: flatten, `depth` hidden layers of `width` ReLU units, a linear classifier."""

import torch.nn as nn


class MLP(nn.Module):
    """Fully connected classifier; the paper's main test bed for widths and depths."""

    def __init__(self, input_dim: int = 64, num_classes: int = 10, width: int = 32,
                 depth: int = 2, bias: bool = True):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"MLP needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        layers = [nn.Flatten()]
        dim = input_dim
        for _ in range(depth):
            layers += [nn.Linear(dim, width, bias=bias), nn.ReLU()]
            dim = width
        layers.append(nn.Linear(dim, num_classes, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
