"""CIFAR-style VGG11 with optional BatchNorm and biases (OT fusion needs neither).

`width` scales every channel count (1.0 gives 64..512). Max pooling stops once
the feature map is 1x1, so the same network runs on 8x8 digits and 32x32 CIFAR.
"""

import torch.nn as nn

VGG11_PLAN = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(nn.Module):
    """Eight 3x3 convolutions, five max pools, one linear classifier."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 batch_norm: bool = True, bias: bool = True, width: float = 1.0):
        super().__init__()
        layers, channels, side = [], in_channels, image_size
        for item in VGG11_PLAN:
            if item == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            out = max(1, int(round(item * width)))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, num_classes, bias=bias))

    def forward(self, x):
        return self.classifier(self.features(x))
