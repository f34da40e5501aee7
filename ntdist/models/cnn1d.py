"""A 1-D convolutional network for signals such as MNIST-1D (Greydanus & Kobak's CNN shape).

Three convolutions with ReLU (kernel 5 then 3 and 3, stride 2, padding 1, `channels`
filters each), flattened into one linear classifier. On length-40 MNIST-1D signals
the feature map shrinks 40 -> 19 -> 10 -> 5, so the classifier sees 25 x 5 = 125
features, as in the dataset paper's model.
"""

import torch.nn as nn

# (kernel, stride, padding) of the three convolutions
LAYERS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))


def conv_output_length(length: int) -> int:
    """Length of the feature map after the three convolutions of `CNN1D` (floor division, as in Conv1d)."""
    for kernel, stride, padding in LAYERS:
        length = (length + 2 * padding - kernel) // stride + 1
    return length


class CNN1D(nn.Module):
    """conv(5) -> conv(3) -> conv(3), each strided by 2 and followed by ReLU; flatten; linear."""

    def __init__(self, in_channels: int = 1, length: int = 40, num_classes: int = 10,
                 channels: int = 25, bias: bool = True):
        super().__init__()
        out_length = conv_output_length(length)
        if channels < 1 or out_length < 1:
            raise ValueError(f"CNN1D needs channels >= 1 and signals of length >= 3, "
                             f"got channels={channels}, length={length}")
        layers, width = [], in_channels
        for kernel, stride, padding in LAYERS:
            layers += [nn.Conv1d(width, channels, kernel, stride=stride, padding=padding, bias=bias), nn.ReLU()]
            width = channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * out_length, num_classes, bias=bias))

    def forward(self, x):
        return self.classifier(self.features(x))
