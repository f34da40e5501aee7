"""Vision models written outside torchvision: one small model per code pattern that fuses exactly.

Each pattern was refused before the analysis could fall back to `torch.export`: an affine-only
norm (`x * self.alpha + self.beta`) on tokens, `F.group_norm` on a module's own weights and
`nn.GroupNorm`, a convolution with "same" padding that branches on its weight's shape, and a
channel slice `x[:, :self.out_channels]` after a concatenation, and a timm-style
`qkv.reshape(B, N, 3, heads, head_dim)` (the projection opens three parts, heads within each), and a
CSP block (C2f: a layer's output chunked, the parts concatenated again with a new branch); and two that were refused
outright: a flatten with the channels last (`permute(0, 2, 3, 1).flatten(1)`, features position-major) and an
MLP-Mixer's token mixing (an nn.Linear over the tokens, applied per member in the concatenated graph). For each:
`concat` equals the members' average output (1e-5) at k = 2 and 3, and NT returns the class with its original shapes.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_styles.py
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ntdist.errors import UserError
from ntdist.fusion import Ensemble, concat, fuse


class Affine(nn.Module):
    """A norm that only scales and shifts, reading its parameters in forward."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(1, 1, channels) + 0.5)
        self.beta = nn.Parameter(torch.randn(1, 1, channels))

    def forward(self, x):
        return x * self.alpha + self.beta


class AffineMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(4, 8), Affine(8)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.mean(1))


class GroupNorm(nn.Module):
    """A norm calling F.group_norm on its own weights."""

    def __init__(self, channels, groups):
        super().__init__()
        self.groups = groups
        self.weight, self.bias = nn.Parameter(torch.rand(channels) + 0.5), nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight, self.bias)


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 8, 3, padding=1), GroupNorm(8, 2)
        self.conv2, self.gn2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.gn2(self.conv2(F.relu(self.gn(self.conv(x)))))).mean((2, 3)))


class SameConv(nn.Conv2d):
    """'Same' padding decided on the kernel size read from the weight."""

    def forward(self, x):
        k = self.weight.shape[-1]
        if k % 2 == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, (k // 2, k // 2) if k % 2 else 0)


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = SameConv(3, 8, 3), SameConv(8, 8, 2), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


class SliceNet(nn.Module):
    """Two branches concatenated, then the first branch's channels taken back by a slice."""

    def __init__(self):
        super().__init__()
        self.out_channels = 6
        self.a, self.b, self.c, self.fc = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(6, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        return self.fc(F.relu(self.c(h[:, :self.out_channels])).mean((2, 3)))


class QkvAttention(nn.Module):
    """timm-style attention: one q/k/v projection viewed as [3, heads, head_dim], channels split across dims."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class QkvViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch, self.norm = nn.Conv2d(3, 16, 4, 4), nn.LayerNorm(16)
        self.attn, self.head = QkvAttention(16, 4), nn.Linear(16, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm(x))
        return self.head(x.mean(1))


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k=1):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class CrossStage(nn.Module):
    """A CSP block as YOLOv8's C2f: one layer's output chunked in two, a list grown in forward, concatenated."""

    def __init__(self, cin, cout):
        super().__init__()
        self.half = cout // 2
        self.cv1, self.cv2, self.m = ConvBN(cin, cout), ConvBN(3 * self.half, cout), ConvBN(self.half, self.half, 3)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class CSPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = ConvBN(3, 8, 3), CrossStage(8, 16), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class ChannelsLastNet(nn.Module):
    """Channels moved last before the flatten: feature index = position * channels + channel."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.fc, self.out = nn.Linear(16 * 4, 10), nn.Linear(10, 5)

    def features(self, h):
        return h.permute(0, 2, 3, 1).flatten(1)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.out(F.relu(self.fc(self.features(h))))


class ChannelsLastReshapeNet(ChannelsLastNet):
    def features(self, h):
        return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)


class TokenMixer(nn.Module):
    """MLP-Mixer: a Linear over the tokens (channels moved to dimension 1), then Linears over the channels."""

    def __init__(self, parts=(8,)):
        super().__init__()
        self.embeds, self.norm = nn.ModuleList(nn.Linear(4, n) for n in parts), nn.LayerNorm(sum(parts))
        self.mix1, self.mix2 = nn.Linear(6, 12), nn.Linear(12, 6)
        self.fc1, self.fc2, self.head = nn.Linear(sum(parts), 16), nn.Linear(16, sum(parts)), nn.Linear(sum(parts), 5)

    def mixed(self, x):
        return self.mix2(F.gelu(self.mix1(self.norm(x).transpose(1, 2)))).transpose(1, 2)

    def forward(self, x):
        x = torch.cat([embed(x) for embed in self.embeds], 2)
        x = x + self.mixed(x)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


class TokenMixerParts(TokenMixer):
    """Token mixing over channels concatenated from two layers: each member's channels interleave in the wide model."""

    def __init__(self):
        super().__init__((6, 2))

    def mixed(self, x):
        return self.mix2(F.relu(self.mix1(x.transpose(1, 2)))).transpose(1, 2)


PATTERNS = {QkvViT: (2, 3, 16, 16), CSPNet: (2, 3, 8, 8), AffineMixer: (2, 6, 4), GroupNormNet: (2, 3, 8, 8),
            SameNet: (2, 3, 8, 8), SliceNet: (2, 3, 8, 8), ChannelsLastNet: (2, 3, 8, 8),
            ChannelsLastReshapeNet: (2, 3, 8, 8), TokenMixer: (2, 6, 4), TokenMixerParts: (2, 6, 4)}


@pytest.mark.parametrize("cls", PATTERNS, ids=lambda c: c.__name__)
def test_pattern_concatenates_exactly_and_fuses(cls):
    torch.manual_seed(0)
    members, x = [cls().eval() for _ in range(3)], torch.randn(*PATTERNS[cls])
    with torch.no_grad():
        for k in (2, 3):
            assert torch.allclose(concat(members[:k], example_inputs=x)(x), Ensemble(members[:k])(x), atol=1e-5)
        fused = fuse(members, example_inputs=x)
    assert type(fused) is cls
    shapes = {n: t.shape for n, t in members[0].state_dict().items()}
    assert {n: t.shape for n, t in fused.state_dict().items()} == shapes


def _source(value, members):
    """(member, unit) whose bias entry equals `value`: which member's unit the fused model kept."""
    return next((m, u) for m, b in enumerate(members) for u in range(len(b)) if torch.equal(b[u], value))


def test_channels_last_flatten_keeps_each_column_with_its_channel():
    torch.manual_seed(0)
    members, x = [ChannelsLastNet().eval() for _ in range(2)], torch.randn(2, 3, 8, 8)
    fused = fuse(members, example_inputs=x)
    kept = [_source(v, [m.c2.bias for m in members]) for v in fused.c2.bias]
    rows = [_source(v, [m.fc.bias for m in members]) for v in fused.fc.bias]
    compared = 0
    for r, (m, u) in enumerate(rows):
        mine = [i for i, (mi, _) in enumerate(kept) if mi == m]
        wide, own = fused.fc.weight[r].view(16, 4), members[m].fc.weight[u].view(16, 4)
        assert torch.equal(wide[:, mine], own[:, [kept[i][1] for i in mine]])
        compared += len(mine)
    assert compared > 0




def test_token_mixing_layers_of_the_fused_model_are_member_zeros():
    torch.manual_seed(0)
    members, x = [TokenMixerParts().eval() for _ in range(2)], torch.randn(2, 6, 4)
    fused = fuse(members, example_inputs=x)
    for name in ("mix1.weight", "mix1.bias", "mix2.weight", "mix2.bias"):
        assert torch.equal(fused.state_dict()[name], members[0].state_dict()[name])
    assert not torch.equal(fused.state_dict()["fc1.weight"], members[0].state_dict()["fc1.weight"])


class NarrowTokenMixer(TokenMixerParts):
    """Token mixing on one layer's channels, without a norm: members may differ in that width."""

    def __init__(self, width):
        super().__init__()
        self.embeds, self.norm = nn.ModuleList([nn.Linear(4, width)]), nn.Identity()
        self.fc1, self.fc2, self.head = nn.Linear(width, 16), nn.Linear(16, width), nn.Linear(width, 5)


def test_token_mixing_concatenates_members_of_different_widths_exactly():
    torch.manual_seed(0)
    members, x = [NarrowTokenMixer(w).eval() for w in (8, 5, 11)], torch.randn(2, 6, 4)
    with torch.no_grad():
        assert torch.allclose(concat(members, example_inputs=x)(x), Ensemble(members)(x), atol=1e-5)


class MixedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head, self.mix = nn.Linear(4, 8), nn.Linear(8, 5), nn.Linear(6, 1)

    def forward(self, x):
        return self.mix(self.head(F.relu(self.fc(x))).transpose(1, 2)).flatten(1)


def test_token_mixing_of_the_output_channels_is_refused_in_one_line():
    members, x = [MixedOutput().eval() for _ in range(2)], torch.randn(2, 6, 4)
    with pytest.raises(UserError, match=r"layer 'mix'.*positions of the output channels") as err:
        concat(members, example_inputs=x)
    assert "\n" not in str(err.value)
