"""Models torch.fx cannot trace because forward branches on shapes: captured on example_inputs, or refused.

`if x.dim() == 3`, `if c == 1` after `n, c, h, w = x.shape`: `symbolic_trace` fails on
both, `capture` decides them on the example and the fusion is exact. What capture refuses (a
branch on a hidden tensor's shape, a loop over a hidden tensor's rows) torch.export fixes in
the graph that concat widens (the last export kept for the next analysis of the same model, until
`drop_kept_export`); a branch on tensor values is refused with one line naming the module.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_capture.py
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import symbolic_trace

from ntdist.errors import UserError
from ntdist.fusion import Ensemble, analyze, concat, fuse
from ntdist.fusion.analysis.export import drop_kept_export


class Block(nn.Module):
    def __init__(self, channels, branch_on_hidden=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.branch_on_hidden = branch_on_hidden

    def forward(self, x):
        h = self.bn(self.conv(x))
        if self.branch_on_hidden and h.shape[1] > 4:        # the wide model would take another path
            h = h * 2
        return F.relu(h + x)


class Branchy(nn.Module):
    """Grey or colour images, batched or not: forward branches on the input's rank and channels."""

    def __init__(self, branch_on_hidden=False, branch_on_values=False):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.block = Block(6, branch_on_hidden)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.branch_on_values = branch_on_values

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        n, c, h, w = x.shape
        if c == 1:
            x = x.expand(-1, 3, -1, -1)
        y = F.max_pool2d(self.block(F.relu(self.bn(self.stem(x)))), 2)
        if self.branch_on_values and y.mean() > 0:
            y = -y
        return self.fc(y.reshape(n, -1))


def members(k, **kw):
    torch.manual_seed(0)
    models = [Branchy(**kw).eval() for _ in range(k)]
    for m in models:
        for bn in (m.bn, m.block.bn):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return models


def test_fx_alone_cannot_trace_it():
    with pytest.raises(Exception):
        symbolic_trace(Branchy())
    with pytest.raises(UserError, match="pass example_inputs"):
        analyze(Branchy())


@pytest.mark.parametrize("k", [2, 3])
def test_captured_model_concatenates_exactly_and_fuses(k):
    x = torch.randn(4, 1, 8, 8)
    models = members(k)
    plan = analyze(models[0], x)
    assert plan.captured and len(plan.sizes) == 1       # the residual makes stem and block one stream
    assert {"stem", "bn", "block.conv", "block.bn", "fc"} <= set(plan.layers)
    with torch.no_grad():
        assert torch.allclose(concat(models, example_inputs=x)(x), Ensemble(models)(x), atol=1e-5)
        for schedule in ("flat", "recursive"):
            fused = fuse(models, schedule=schedule, example_inputs=x)
            assert type(fused) is Branchy
            Branchy().load_state_dict(fused.state_dict(), strict=True)
            assert fused(x[0]).shape == (1, 5)             # the other branches still run
        theirs = fuse(models, example_inputs=x, pruner="torch_pruning")
        ours = fuse(models, example_inputs=x)
        assert all(torch.equal(t, theirs.state_dict()[n]) for n, t in ours.state_dict().items())
        # an unbatched example: the shape read is of x.unsqueeze(0), computed from the input alone
        assert torch.allclose(concat(models, example_inputs=x[0])(x[0]), Ensemble(models)(x[0]), atol=1e-5)


class Loops(nn.Module):
    def __init__(self, over_values=False):
        super().__init__()
        self.a, self.b, self.over_values = nn.Linear(4, 6), nn.Linear(6, 3), over_values

    def forward(self, x):
        size = 1
        for d in x.shape[1:]:
            size = size * d
        h = torch.relu(self.a(x.reshape(-1, size)))
        if self.over_values:
            for row in h:
                h = h + row
        return self.b(h)


def test_loops_over_the_input_shape_are_captured_and_over_rows_exported():
    torch.manual_seed(0)
    x, models = torch.randn(5, 2, 2), [Loops(), Loops()]
    with torch.no_grad():
        assert torch.allclose(concat(models, example_inputs=x)(x), Ensemble(models)(x), atol=1e-5)
        # a loop over the rows of a hidden tensor: capture refuses it, torch.export unrolls it over the batch
        rows = [Loops(True), Loops(True)]
        assert analyze(rows[0], x).graph is not None
        assert torch.allclose(concat(rows, example_inputs=x)(x), Ensemble(rows)(x), atol=1e-5)
        assert type(fuse(rows, example_inputs=x)) is Loops


def test_members_are_left_in_their_mode():
    models = members(2)
    models[0].train()
    analyze(models[0], torch.randn(4, 1, 8, 8))
    assert models[0].training and models[0].block.bn.training


def test_branches_on_values_are_refused():
    with pytest.raises(UserError, match=r"the forward of Branchy branches on tensor values") as err:
        fuse(members(2, branch_on_values=True), example_inputs=torch.randn(4, 1, 8, 8))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("k", [2, 3])
def test_branch_on_a_hidden_shape_is_exported_and_exact(k):
    """torch.export fixes the members' branch in the graph that concat widens, so the wide model takes it too."""
    x, models = torch.randn(4, 1, 8, 8), members(k, branch_on_hidden=True)
    assert analyze(models[0], x).graph is not None
    with torch.no_grad():
        assert torch.allclose(concat(models, example_inputs=x)(x), Ensemble(models)(x), atol=1e-5)
        fused = fuse(models, example_inputs=x)
    assert type(fused) is Branchy
    Branchy(branch_on_hidden=True).load_state_dict(fused.state_dict(), strict=True)


def test_the_kept_export_serves_the_next_analysis_until_dropped():
    x, model = torch.randn(4, 1, 8, 8), members(1, branch_on_hidden=True)[0]
    kept = analyze(model, x).graph
    assert kept is not None and analyze(model, x).graph is kept
    drop_kept_export()
    again = analyze(model, x).graph
    assert again is not None and again is not kept and analyze(model, x).graph is again
