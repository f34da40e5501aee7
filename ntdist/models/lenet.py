"""LeNet-5 style network that adapts to the input size (8x8 digits, 28x28 MNIST, 32x32 CIFAR)."""

import torch.nn as nn


class LeNet(nn.Module):
    """Two 5x5 convolutions with max pooling, then three fully connected layers."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 bias: bool = True, channels=(6, 16), hidden=(120, 84)):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        if side < 1:
            raise ValueError(f"LeNet needs images of at least 4x4, got {image_size}")
        h1, h2 = hidden
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, h1, bias=bias), nn.ReLU(),
            nn.Linear(h1, h2, bias=bias), nn.ReLU(),
            nn.Linear(h2, num_classes, bias=bias),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
