"""Layers written as functions on a module's own parameters, and resizing, fused through the op rules.

Hand-written modules in the style of other model libraries: a conv, a
BatchNorm+activation and a linear layer that call `F.conv2d`, `F.batch_norm`
and `F.linear` on their own tensors inside forward, `F.interpolate` and
`nn.Upsample` between them. Concatenation must equal the output average at
k = 2 and 3, and NT must return the original architecture (strict load).

Run: .venv/bin/python -m pytest tests/unit/test_fusion_functional.py
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import randomise_bn
from ntdist.errors import UserError
from ntdist.fusion import Ensemble, concat, fuse


class FConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1)


class FBatchNormAct(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))
        self.bias = nn.Parameter(torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training, 0.1, 1e-5))


class FLinear(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) * 0.3)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Pyramid(nn.Module):
    """Two resolutions joined by upsampling, as multi-resolution nets do."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = FConv(3, 6), FBatchNormAct(6)
        self.down, self.up = FConv(6, 6), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.mix = FConv(6, 8)
        self.fc1, self.fc2 = FLinear(8 * 4 * 4, 10), FLinear(10, 3)

    def forward(self, x):
        x = self.norm(self.stem(x))
        low = self.up(F.relu(self.down(F.avg_pool2d(x, 2))))
        x = F.interpolate(self.mix(x + low), scale_factor=0.5, mode="nearest")
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@pytest.mark.parametrize("k", [2, 3])
def test_functional_layers_and_resizing_concatenate_exactly(k):
    torch.manual_seed(k)
    models = [Pyramid().eval() for _ in range(k)]
    x = torch.randn(2, 3, 8, 8)
    wide = concat(models, example_inputs=x)
    assert wide.stem.weight.shape == (6 * k, 3, 3, 3) and wide.norm.running_var.shape == (6 * k,)
    with torch.no_grad():
        ref, out = Ensemble(models)(x), wide(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_nt_returns_the_original_functional_architecture():
    torch.manual_seed(0)
    models = [randomise_bn(Pyramid()).eval() for _ in range(2)]
    x = torch.randn(2, 3, 8, 8)
    fused = fuse(models, example_inputs=x)
    fresh = Pyramid()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.isfinite(fresh.eval()(x)).all() and fresh(x).shape == (2, 3)


class TwoOwners(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = FLinear(4, 5), FLinear(4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(F.linear(x, self.a.weight, self.b.bias))


def test_a_functional_layer_on_two_modules_parameters_is_refused_by_name():
    with pytest.raises(UserError, match="calls linear on"):
        concat([TwoOwners(), TwoOwners()])
