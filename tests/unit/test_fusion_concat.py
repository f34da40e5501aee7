"""NT concat is exact: the wide model computes the (weighted) average of the members' outputs.

Covers MLP, the 1-D CNN of MNIST-1D, LeNet, VGG11 (with and without BN / bias), the CIFAR ResNet18,
torchvision's resnet18, depthwise and grouped convolutions, and the refusals
for layers that cannot be widened exactly.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_concat.py
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ntdist.errors import UserError
from ntdist.fusion import Ensemble, concat
from helpers import randomise_bn
from ntdist.models import build_model


def members(name, kwargs, k, seed=0):
    torch.manual_seed(seed)
    return [randomise_bn(build_model(name, kwargs)).eval() for _ in range(k)]


def assert_exact(wide, models, x, weights=None):
    with torch.no_grad():
        ref = Ensemble(models, weights)(x)
        out = wide.eval()(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-7


CASES = [
    ("mlp", {"input_dim": 64, "width": 12, "depth": 2, "bias": True}, (64,)),
    ("mlp", {"input_dim": 64, "width": 12, "depth": 3, "bias": False}, (1, 8, 8)),
    ("cnn1d", {"in_channels": 1, "length": 40, "bias": True}, (1, 40)),
    ("cnn1d", {"in_channels": 2, "length": 23, "channels": 6, "bias": False}, (2, 23)),
    ("lenet", {"in_channels": 1, "image_size": 8, "bias": True}, (1, 8, 8)),
    ("lenet", {"in_channels": 1, "image_size": 8, "bias": False}, (1, 8, 8)),
    ("vgg11", {"in_channels": 3, "image_size": 16, "width": 0.125, "batch_norm": True, "bias": True}, (3, 16, 16)),
    ("vgg11", {"in_channels": 3, "image_size": 8, "width": 0.125, "batch_norm": False, "bias": False}, (3, 8, 8)),
    ("vgg11", {"in_channels": 3, "image_size": 8, "width": 0.125, "batch_norm": True, "bias": False}, (3, 8, 8)),
    ("resnet18", {"in_channels": 3, "width": 4}, (3, 8, 8)),
]


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_concat_is_the_ensemble_average(name, kwargs, shape, k):
    models = members(name, kwargs, k, seed=k)
    x = torch.randn(5, *shape)
    wide = concat(models, example_inputs=x)
    assert_exact(wide, models, x)


def test_concat_widens_every_hidden_layer_and_keeps_the_output():
    models = members("mlp", {"input_dim": 64, "width": 12, "depth": 2}, 3)
    wide = concat(models)
    assert [tuple(p.shape) for p in wide.parameters()] == [(36, 64), (36,), (36, 36), (36,), (10, 36), (10,)]
    w = wide.net[3].weight
    assert torch.equal(w[:12, 12:], torch.zeros(12, 24))          # cross-member weights exactly zero
    assert torch.equal(w[12:24, 12:24], models[1].net[3].weight)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_concat_torchvision_resnet18(k):
    models = members("torchvision:resnet18", {"num_classes": 10}, k, seed=10 + k)
    x = torch.randn(2, 3, 32, 32)
    assert_exact(concat(models, example_inputs=x), models, x)


def test_weighted_concat_matches_weighted_average():
    models = members("lenet", {"in_channels": 1, "image_size": 8}, 3)
    x = torch.randn(4, 1, 8, 8)
    assert_exact(concat(models, weights=[2.0, 1.0, 1.0], example_inputs=x), models, x, [2.0, 1.0, 1.0])


class Separable(nn.Module):
    """A pointwise conv, a depthwise conv, a grouped conv and a residual, then global pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.group = nn.Conv2d(8, 12, 1, groups=4)
        self.proj = nn.Conv2d(12, 8, 1, bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = self.proj(F.relu(self.group(F.relu(self.dw(x)))))
        x = torch.relu(x + y)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("k", [2, 3])
def test_depthwise_and_grouped_convolutions(k):
    torch.manual_seed(k)
    models = [randomise_bn(Separable()).eval() for _ in range(k)]
    x = torch.randn(3, 3, 6, 6)
    wide = concat(models)                       # global pooling: no example_inputs needed
    assert wide.group.groups == 4 * k and wide.dw.groups == 8 * k
    assert_exact(wide, models, x)


@pytest.mark.parametrize("order", ["merge_prune", "prune_merge"])
def test_pruning_a_grouped_conv_keeps_whole_groups(order):
    from ntdist.fusion import fuse

    torch.manual_seed(5)
    models = [randomise_bn(Separable()).eval() for _ in range(3)]
    fused = fuse(models, order=order)
    assert fused.group.groups == 4 and tuple(fused.group.weight.shape) == (12, 2, 1, 1)
    Separable().load_state_dict(fused.state_dict(), strict=True)
    half = fuse(models, keep_ratio=0.5, order=order)        # 2 of the 4 groups: 4 inputs, 6 outputs
    assert half.group.groups == 2 and tuple(half.group.weight.shape) == (6, 2, 1, 1)
    assert half.dw.weight.shape[0] == 4 and torch.isfinite(half(torch.randn(2, 3, 6, 6))).all()


def test_grouped_conv_pruning_takes_its_blocks_from_the_members():
    from ntdist.fusion import fuse

    torch.manual_seed(6)
    a, b = Separable().eval(), Separable().eval()
    with torch.no_grad():
        b.group.weight[3:6].mul_(100.0)          # group 1 of member b (outputs 3..5) dominates
    fused = fuse([a, b])
    kept = [torch.equal(fused.group.weight[i:i + 3], b.group.weight[3:6]) for i in range(0, 12, 3)]
    assert sum(kept) == 1


class WithNorm(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc2 = nn.Linear(8, 3)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x):
        if self.kind == "layernorm":
            return self.fc2(self.norm(self.fc1(x)))
        if self.kind == "attention":
            return self.fc2(self.attn(x, x, x)[0])
        first, second = self.fc1(x).chunk(2, dim=1)        # cuts one layer's output in two
        return self.fc2(torch.cat([second, first], dim=1))


@pytest.mark.parametrize("kind,name", [("attention", "attn")])
def test_refuses_layers_it_cannot_widen_exactly(kind, name):
    models = [WithNorm(kind) for _ in range(2)]
    with pytest.raises(UserError, match=f"'{name}"):
        concat(models)


@pytest.mark.parametrize("k", [2, 3])
def test_a_split_inside_one_layers_output_routes_its_channels_apart(k):
    from ntdist.fusion import fuse

    torch.manual_seed(k)
    models = [WithNorm("split") for _ in range(k)]
    x = torch.randn(5, 6)
    assert_exact(concat(models), models, x)
    fused = fuse(models)
    WithNorm("split").load_state_dict(fused.state_dict(), strict=True)
    assert fused(x).shape == (5, 3)


@pytest.mark.parametrize("k", [2, 3])
def test_layernorm_normalises_each_member_block_in_the_concatenated_model(k):
    from ntdist.fusion import fuse

    torch.manual_seed(k)
    models = [WithNorm("layernorm").eval() for _ in range(k)]
    for m in models:
        nn.init.normal_(m.norm.weight)
        nn.init.normal_(m.norm.bias)
    x = torch.randn(4, 6)
    wide = concat(models)
    assert_exact(wide, models, x)
    fused = fuse(models)
    fresh = WithNorm("layernorm")
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert fresh.norm.normalized_shape == (8,) and fresh(x).shape == (4, 3)


def test_conv_model_with_flatten_asks_for_example_inputs():
    models = members("lenet", {"in_channels": 1, "image_size": 8}, 2)
    with pytest.raises(UserError, match="example_inputs"):
        concat(models)


def test_nonlinearity_after_the_output_layer_is_refused():
    models = [nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Softmax(dim=1)) for _ in range(2)]
    with pytest.raises(UserError, match="'3'"):
        concat(models)


class Tokens(nn.Module):
    """A patch embedding written as in vision transformers: conv, flatten(2), transpose to tokens, per-channel
    position embedding, Linear over channels-last tokens, then a mean over tokens."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 9, 6))
        self.mlp = nn.Linear(6, 10)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(F.gelu(self.mlp(t)).mean(1))


@pytest.mark.parametrize("k", [2, 3])
def test_patch_tokens_and_position_embedding_are_widened(k):
    from ntdist.fusion import fuse

    torch.manual_seed(k)
    models = [Tokens().eval() for _ in range(k)]
    x = torch.randn(2, 3, 6, 6)
    wide = concat(models, example_inputs=x)
    assert wide.pos.shape == (1, 9, 6 * k)
    assert_exact(wide, models, x)
    Tokens().load_state_dict(fuse(models, example_inputs=x).state_dict(), strict=True)
