"""Tied weights: one layer called twice, or one layer under two names, is one space seen twice and fuses
exactly (through torch.export); one Parameter under two module names, or a tie met without example inputs, is
refused by the channel analysis with one line naming the tie; a parameterless module reused is no tie. (`ntdist run` refuses tied models before training: tests/unit/test_model_mistakes.py.)

Run: .venv/bin/python -m pytest tests/unit/test_fusion_ties.py
"""

import pytest
import torch
import torch.nn as nn

from ntdist.errors import UserError
from ntdist.fusion import concat, fuse
from userpkg.mistakes import called_twice, shared_weight

X = torch.randn(4, 10)


def pair(build):
    torch.manual_seed(0)
    a = build(10, 3)
    torch.manual_seed(1)
    return [a, build(10, 3)]


@pytest.mark.parametrize("build, words, how", [
    (shared_weight, "SharedWeight ties its weights: 'b.weight' is the same tensor as 'a.weight'",
     lambda ms: fuse(ms, "nt", example_inputs=X)),
    (shared_weight, "SharedWeight ties its weights: 'b.weight' is the same tensor as 'a.weight'",
     lambda ms: concat(ms, example_inputs=X)),
    (shared_weight, "SharedWeight ties its weights: 'b.weight' is the same tensor as 'a.weight'",
     lambda ms: fuse(ms, "ot")),
    (called_twice, "CalledTwice calls layer 'fc' (Linear) 2 times in forward, so its weights are tied",
     lambda ms: fuse(ms, "ot")),   # without example inputs there is no graph of aten operations to read the tie from
])
def test_tied_weights_that_cannot_be_followed_are_refused(build, words, how):
    models = pair(build)
    with pytest.raises(UserError, match="cannot keep a tie") as err:
        how(models)
    assert words in str(err.value) and len(str(err.value).splitlines()) == 1
    averaged = fuse(models, "avg")   # averaging needs no channel analysis: the tie stays, the weights average
    assert torch.allclose(averaged.inp.weight, (models[0].inp.weight + models[1].inp.weight) / 2)


def test_a_layer_called_twice_is_one_space_seen_twice_and_fuses_exactly():
    """Through torch.export the two calls read and write one space: its concatenation is block-diagonal."""
    models = pair(called_twice)
    with torch.no_grad():
        wide = concat(models, example_inputs=X)
        assert torch.allclose(wide(X), (models[0](X) + models[1](X)) / 2, atol=1e-5)
        fused = fuse(models, "nt", example_inputs=X)
    pair(called_twice)[0].load_state_dict(fused.state_dict(), strict=True)
    assert fused.fc.weight.shape == models[0].fc.weight.shape


class Reused(nn.Module):
    """A ReLU module called twice; with `alias`, the Linear `fc` also registered as `body.0`."""

    def __init__(self, alias: bool):
        super().__init__()
        self.fc = nn.Linear(10, 12)
        if alias:
            self.body = nn.Sequential(self.fc)
        self.act = nn.ReLU()
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.act(self.act(self.fc(x))))


def test_a_reused_activation_is_no_tie_and_a_layer_under_two_names_stays_one_layer():
    models = [Reused(alias=False), Reused(alias=False)]
    wide = concat(models, example_inputs=X)
    assert torch.allclose(wide(X), (models[0](X) + models[1](X)) / 2, atol=1e-5)
    aliased = [Reused(alias=True), Reused(alias=True)]
    with torch.no_grad():
        wide = concat(aliased, example_inputs=X)
        assert torch.allclose(wide(X), (aliased[0](X) + aliased[1](X)) / 2, atol=1e-5)
        fused = fuse(aliased, "nt", example_inputs=X)
    assert fused.fc.weight is fused.body[0].weight   # one tensor under both names, as in the members
    Reused(alias=True).load_state_dict(fused.state_dict(), strict=True)
