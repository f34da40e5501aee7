"""NT dedup on models that route a layer's channels apart: a residual adding a channel concat, a split, a shuffle.

`y + cat([b(y), c(y)])` ties each channel of `y` to one channel of a part, so the analysis gives every
channel a space of its own (an atom), as it does for a split inside a layer's output and for a channel
shuffle; a concatenated model holds k units of each. Dedup fuses such models for two or more parts of
equal or different sizes, along a convolution's channels or a Linear's features: self-fusion returns the
member (for every overflow and the activation criterion), and members with nothing above the threshold
fuse exactly as plain NT, from an exact concatenation.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_dedup_concat.py
"""

import copy

import pytest
import torch
import torch.nn as nn

from ntdist.fusion import Ensemble, concat, fuse


class ResidualConcat(nn.Module):
    """relu(y + cat([part(y) for part in parts])) with y = first(x), then a Linear head."""

    def __init__(self, parts, conv=True):
        super().__init__()
        width, self.conv = sum(parts), conv
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.first = nn.Conv2d(3, width, 3, padding=1) if conv else nn.Linear(3, width)
        self.parts = nn.ModuleList(layer(width, p) for p in parts)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        y = self.first(x)
        h = torch.relu(y + torch.cat([part(y) for part in self.parts], 1))
        return self.head(h.mean((2, 3)) if self.conv else h)


class SwappedHalves(nn.Module):
    """A Linear's output cut in two and put back the other way round."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 4)

    def forward(self, x):
        first, second = torch.relu(self.fc1(x)).chunk(2, dim=1)
        return self.fc2(torch.cat([second, first], 1))


class ChannelShuffle(nn.Module):
    """A convolution's channels shuffled between two groups (ShuffleNet's view, transpose, view back)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1), nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(torch.relu(self.conv2(y)).mean((2, 3)))


CASES = {    # name -> (build, input shape, hidden units of a member)
    "conv_2+2": (lambda: ResidualConcat((2, 2)), (3, 5, 5), 4),
    "conv_2+4": (lambda: ResidualConcat((2, 4)), (3, 5, 5), 6),
    "conv_1+2+3": (lambda: ResidualConcat((1, 2, 3)), (3, 5, 5), 6),
    "linear_3+5": (lambda: ResidualConcat((3, 5), conv=False), (3,), 8),
    "swapped_halves": (SwappedHalves, (3,), 6),
    "channel_shuffle": (ChannelShuffle, (3, 4, 4), 12),
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def member(case, seed=0):
    torch.manual_seed(seed)
    build, shape, _ = CASES[case]
    return build().eval(), torch.randn(16, *shape)


def max_error(fused, model, x):
    with torch.no_grad():
        return (fused.eval()(x) - model(x)).abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_self_fusion_with_dedup_returns_the_member(case, k):
    model, x = member(case)
    schedule = "recursive" if k == 4 else "flat"
    merged = {}
    fused = fuse([copy.deepcopy(model) for _ in range(k)], schedule=schedule, example_inputs=x, dedup=True,
                 merged=merged)
    assert max_error(fused, model, x) <= 1e-5
    assert sum(merged.values()) == (k - 1) * CASES[case][2]        # every copy of every unit merged
    plain = fuse([copy.deepcopy(model) for _ in range(k)], schedule=schedule, example_inputs=x)
    assert max_error(plain, model, x) > 1e-3                       # plain NT keeps copies, drops units
    CASES[case][0]().load_state_dict(fused.state_dict(), strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("options", [{"dedup_overflow": "merge"}, {"dedup_overflow": "match"},
                                     {"dedup_criterion": "activations"}], ids=["merge", "match", "activations"])
def test_self_fusion_is_exact_for_every_overflow_and_the_activation_criterion(case, options):
    model, x = member(case)
    merged = {}
    fused = fuse([copy.deepcopy(model) for _ in range(3)], example_inputs=x, dedup=True, merged=merged, **options)
    assert max_error(fused, model, x) <= 1e-5
    assert sum(merged.values()) == 2 * CASES[case][2]


@pytest.mark.parametrize("case", sorted(CASES))
def test_diverse_members_concatenate_exactly_and_fuse_as_plain_nt(case):
    models = [member(case, seed)[0] for seed in range(2)]
    x = member(case)[1]
    with torch.no_grad():
        ref = Ensemble(models)(x)
        assert (concat(models, example_inputs=x)(x) - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-7
    merged = {}
    on = fuse(models, example_inputs=x, dedup=True, dedup_threshold=0.99, merged=merged)
    off = fuse(models, example_inputs=x)
    assert set(merged.values()) == {0}
    assert on.state_dict().keys() == off.state_dict().keys()
    for (key, a), b in zip(on.state_dict().items(), off.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), key
