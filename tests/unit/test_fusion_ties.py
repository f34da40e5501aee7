"""Tied weights (one layer called twice, one Parameter under two module names) are refused by the channel
analysis with one line naming the tie; a layer registered under two names, or a parameterless one reused, is
no tie. (`ntdist run` refuses tied models before training: tests/unit/test_model_mistakes.py.)

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


@pytest.mark.parametrize("build, words", [
    (called_twice, "CalledTwice calls layer 'fc' (Linear) 2 times in forward, so its weights are tied"),
    (shared_weight, "SharedWeight ties its weights: 'b.weight' is the same tensor as 'a.weight'"),
])
@pytest.mark.parametrize("how", [lambda ms: fuse(ms, "nt", example_inputs=X), lambda ms: fuse(ms, "ot"),
                                 lambda ms: concat(ms, example_inputs=X)])
def test_tied_weights_are_refused_by_every_method_that_widens_or_aligns(build, words, how):
    models = pair(build)
    with pytest.raises(UserError, match="cannot keep a tie") as err:
        how(models)
    assert words in str(err.value) and len(str(err.value).splitlines()) == 1
    averaged = fuse(models, "avg")   # averaging needs no channel analysis: the tie stays, the weights average
    assert torch.allclose(averaged.inp.weight, (models[0].inp.weight + models[1].inp.weight) / 2)


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


def test_a_reused_activation_is_no_tie_and_a_layer_under_two_names_is_refused():
    models = [Reused(alias=False), Reused(alias=False)]
    wide = concat(models, example_inputs=X)
    assert torch.allclose(wide(X), (models[0](X) + models[1](X)) / 2, atol=1e-5)
    with pytest.raises(UserError, match="'body.0.weight' is the same tensor as 'fc.weight'"):
        concat([Reused(alias=True), Reused(alias=True)], example_inputs=X)
