"""Repair after NT's selection (`ntdist.fusion.repair`): exact cases, batch-wise sums, error against plain NT.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_repair.py
"""

import pytest
import torch
import torch.nn as nn
from userpkg.mistakes import called_twice

from ntdist.fusion import concat
from ntdist.fusion.analysis.graph import analyze
from ntdist.fusion.pruning.select import select, targets
from ntdist.fusion.repair import accumulate, repair, solve
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.models import CNN1D, MLP, VGG11, LeNet, ResNet18


class BNCNN1D(nn.Module):
    """Two conv-BN-ReLU blocks and a linear classifier on 1-D signals."""

    def __init__(self, channels=6):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1, bias=False), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(channels), nn.ReLU())
        self.fc = nn.Linear(channels * 5, 4)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class Grouped(nn.Module):
    """A depthwise and a grouped convolution; `twice` calls the last convolution a second time."""

    def __init__(self, twice=False):
        super().__init__()
        self.twice = twice
        self.a = nn.Conv2d(2, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect")
        self.d = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))))
        if self.twice:
            x = torch.relu(self.d(x))
        return self.fc(x.mean((2, 3)))


class Tokens(nn.Module):
    """A 1x1 conv embedding of a signal into tokens, then Linear layers on channels-last [batch, tokens, features]."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv1d(5, 12, 1), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        tokens = torch.relu(self.a(x)).transpose(1, 2)
        return self.c(torch.relu(self.b(tokens)).mean(1))


class LayerNormMLP(nn.Module):
    """Linear, LayerNorm, ReLU, then two Linear layers: the repair fits the pre-LayerNorm outputs."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b, self.c = nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.norm(self.a(x))))))


def members(make, x, k=2, seed=0):
    """k members of `make()`, their BatchNorm statistics set from a few passes over `x`."""
    torch.manual_seed(seed)
    out = [make() for _ in range(k)]
    with torch.no_grad():
        for i, m in enumerate(out):
            m.train()
            for j in range(3):
                m(x * (1 + 0.1 * i + 0.1 * j))
    return [m.eval() for m in out]


def nt(models, x):
    """(plan, weights, keep, NT's pruned model) at the members' width."""
    plan = analyze(models[0], x[:2])
    w = [1 / len(models)] * len(models)
    keep = select(models, plan, "group_l2", targets(plan, plan.space_sizes(tensors_of(models[0])), 1.0), w)
    return plan, w, keep, assemble(models, plan, w, keep)


def shapes(model):
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def scaled_copy(a: MLP) -> MLP:
    """An MLP whose hidden units are positive multiples of `a`'s (permuted), with its own output layer."""
    b = MLP(8, 3, 6, 2)
    p, q = torch.randperm(6), torch.randperm(6)
    with torch.no_grad():
        b.net[1].weight.copy_(0.5 * a.net[1].weight[p])
        b.net[1].bias.copy_(0.5 * a.net[1].bias[p])
        b.net[3].weight.copy_(1.4 * a.net[3].weight[q][:, p])      # h2_b = 0.7 * h2_a[q]
        b.net[3].bias.copy_(0.7 * a.net[3].bias[q])
    return b.eval(), p, q


def test_dropped_units_that_are_multiples_of_kept_ones_repair_exactly():
    torch.manual_seed(0)
    a = MLP(8, 3, 6, 2).eval()
    b, p, q = scaled_copy(a)
    plan = analyze(a)
    # keep units 0-2 of `a` and the copies in `b` of units 3-5: together they span every unit
    first = torch.sort(torch.cat([torch.arange(3), 6 + torch.nonzero(p[:, None] == torch.arange(3, 6))[:, 0]])).values
    second = torch.sort(torch.cat([torch.arange(3), 6 + torch.nonzero(q[:, None] == torch.arange(3, 6))[:, 0]])).values
    keep = {plan.order[0]: first, plan.order[1]: second}
    pruned = assemble([a, b], plan, [0.5, 0.5], keep)
    x, held = torch.randn(400, 8), torch.randn(100, 8)
    with torch.no_grad():
        wide = concat([a, b])(held)
        assert (pruned(held) - wide).abs().max() > 1e-2         # plain NT loses the dropped units
        repaired = repair([a, b], plan, [0.5, 0.5], keep, pruned, x, ridge=0.0)
        assert (repaired(held) - wide).abs().max() < 1e-5


def test_dropped_channels_that_are_multiples_of_kept_ones_repair_exactly():
    torch.manual_seed(1)
    a = CNN1D(channels=4).eval()
    b = CNN1D(channels=4).eval()
    with torch.no_grad():       # b's channels are 0.5 x a's, channel for channel; its classifier is its own
        for i in (0, 2, 4):
            scale = 0.5 if i == 0 else 1.0
            b.features[i].weight.copy_(scale * a.features[i].weight)
            b.features[i].bias.copy_(0.5 * a.features[i].bias)
    plan = analyze(a, torch.randn(2, 1, 40))
    keep = {s: torch.tensor([0, 1, 6, 7]) for s in plan.order}
    pruned = assemble([a, b], plan, [0.5, 0.5], keep)
    x, held = torch.randn(300, 1, 40), torch.randn(100, 1, 40)
    with torch.no_grad():
        wide = concat([a, b], example_inputs=x[:2])(held)
        assert (pruned(held) - wide).abs().max() > 1e-2
        repaired = repair([a, b], plan, [0.5, 0.5], keep, pruned, x, ridge=0.0)
        assert (repaired(held) - wide).abs().max() < 1e-5


def test_batchwise_sums_equal_one_batch():
    torch.manual_seed(0)
    x, y = torch.randn(2, 500, 7, dtype=torch.float64), torch.randn(2, 500, 3, dtype=torch.float64)
    whole = accumulate(None, x, y, bias=True)
    parts = None
    for lo in range(0, 500, 64):
        parts = accumulate(parts, x[:, lo:lo + 64], y[:, lo:lo + 64], bias=True)
    assert parts.rows == whole.rows == 500
    assert torch.allclose(parts.gram, whole.gram, rtol=0, atol=1e-8)
    assert torch.allclose(parts.cross, whole.cross, rtol=0, atol=1e-8)
    assert torch.allclose(solve(parts, 1e-3), solve(whole, 1e-3), rtol=0, atol=1e-8)
    lstsq = torch.linalg.lstsq(torch.cat([x, torch.ones(2, 500, 1, dtype=x.dtype)], 2), y).solution
    assert torch.allclose(solve(whole, 0.0), lstsq, atol=1e-8)     # ridge 0 is ordinary least squares


def test_batches_a_tensor_and_a_one_shot_iterator_give_the_same_repair():
    torch.manual_seed(0)
    x = torch.randn(300, 40)
    models = members(lambda: MLP(40, 10, 16, 2), x)
    plan, w, keep, _ = nt(models, x)
    whole = repair(models, plan, w, keep, assemble(models, plan, w, keep), x)
    loader = ((x[lo:lo + 50], torch.zeros(50)) for lo in range(0, 300, 50))      # (inputs, labels) batches
    split = repair(models, plan, w, keep, assemble(models, plan, w, keep), loader)
    for name, t in whole.state_dict().items():
        assert torch.allclose(t, split.state_dict()[name], atol=1e-5), name


CASES = {
    "mlp": (lambda: MLP(40, 10, 16, 2), (1, 40)),
    "cnn1d_bn": (BNCNN1D, (1, 1, 21)),
    "lenet": (lambda: LeNet(1, 8, channels=(4, 6), hidden=(12, 10)), (1, 1, 8, 8)),
    "vgg_bn": (lambda: VGG11(3, 8, width=0.0625), (1, 3, 8, 8)),
    "resnet": (lambda: ResNet18(3, 8, 10, width=4), (1, 3, 8, 8)),
    "grouped": (Grouped, (1, 2, 6, 6)),
    "tokens": (Tokens, (1, 5, 6)),
    "layernorm": (LayerNormMLP, (1, 12)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_repair_beats_plain_nt_and_keeps_the_class(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(500, *shape[1:])
    cal, held = x[:400], x[400:]
    models = members(make, cal)
    plan, w, keep, pruned = nt(models, x)
    before = shapes(pruned)
    with torch.no_grad():
        wide = concat(models, example_inputs=x[:2]).eval()(held)
        error_nt = (pruned(held) - wide).pow(2).mean()
        notes = []
        repaired = repair(models, plan, w, keep, pruned, cal, notes=notes)
        error = (repaired(held) - wide).pow(2).mean()
    assert notes == []
    assert error < 0.7 * error_nt, (float(error), float(error_nt))
    assert type(repaired) is type(models[0]) and shapes(repaired) == before == shapes(models[0])
    assert not repaired.training


def test_subsampled_positions_still_repair():
    torch.manual_seed(0)
    x = torch.randn(500, 1, 8, 8)
    models = members(CASES["lenet"][0], x)
    plan, w, keep, pruned = nt(models, x)
    with torch.no_grad():
        wide = concat(models, example_inputs=x[:2])(x[400:])
        error_nt = (pruned(x[400:]) - wide).pow(2).mean()
        repaired = repair(models, plan, w, keep, pruned, x[:400], positions=6)     # of 64 per input
        assert (repaired(x[400:]) - wide).pow(2).mean() < 0.7 * error_nt


def test_layers_it_cannot_refit_are_named_and_left_alone():
    """A layer called twice (fused through torch.export, its input and output one space) has two sets of
    inputs for one weight: repair leaves it as NT pruned it and says so."""
    torch.manual_seed(0)
    x = torch.randn(200, 10)
    models = members(lambda: called_twice(10, 3), x)
    plan, w, keep, pruned = nt(models, x)
    fc = pruned.fc.weight.clone()
    notes = []
    with torch.no_grad():
        repaired = repair(models, plan, w, keep, pruned, x, notes=notes)
    assert notes == ["repair: 'fc' left as pruned: forward calls it more than once"]
    assert torch.equal(repaired.fc.weight, fc) and torch.isfinite(repaired(x)).all()


def test_a_pruned_model_that_keep_does_not_describe_is_refused():
    torch.manual_seed(0)
    x = torch.randn(50, 40)
    models = members(lambda: MLP(40, 10, 8, 2), x)
    plan, w, keep, _ = nt(models, x)
    other = assemble(models, plan, w, {s: idx[:-1] for s, idx in keep.items()})
    with pytest.raises(ValueError, match="must be assemble"):
        repair(models, plan, w, keep, other, x)


def test_nothing_pruned_changes_nothing():
    x = torch.randn(50, 40)
    models = members(lambda: MLP(40, 10, 8, 1), x)
    plan = analyze(models[0])
    pruned = assemble(models, plan, [0.5, 0.5], None)
    state = {n: t.clone() for n, t in pruned.state_dict().items()}
    out = repair(models, plan, [0.5, 0.5], {}, pruned, x)
    assert all(torch.equal(t, state[n]) for n, t in out.state_dict().items())
