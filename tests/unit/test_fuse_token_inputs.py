"""`fuse` of user models in other forward styles: inputs that are tokens, [N, T, C] (a Linear embedding,
LayerNorm, MLP, a mean over tokens), where the calibration inputs alone are enough for the analysis to read the
input's rank, also where forward reshapes a flat input into tokens; a forward with a keyword argument left at a number's default (`scale=1.0`). NT's repaired result
loads back strictly into the user's class.

Run: .venv/bin/python -m pytest tests/unit/test_fuse_token_inputs.py
"""

import torch
import torch.nn as nn

from ntdist.fusion import fuse


class TokenMLP(nn.Module):
    """Tokens of 4 features, embedded to 16, one pre-norm residual MLP block, mean over the tokens, 3 logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mlp(self.norm(h))
        return self.head(h.mean(1))


def _member(seed: int) -> TokenMLP:
    torch.manual_seed(seed)
    return TokenMLP().eval()


def _gap(model, members, x) -> float:
    with torch.no_grad():
        ensemble = sum(m(x) for m in members) / len(members)
        return ((model(x) - ensemble).norm() / ensemble.norm()).item()


def test_calibration_of_tokens_is_traced_and_repaired():
    members = [_member(1), _member(2)]
    cal = torch.randn(256, 6, 4, generator=torch.Generator().manual_seed(3))
    held_out = torch.randn(128, 6, 4, generator=torch.Generator().manual_seed(4))
    repaired = fuse(members, calibration=cal)
    plain = fuse(members, example_inputs=cal[:4])
    assert _gap(repaired, members, held_out) < 0.5 * _gap(plain, members, held_out)
    back = TokenMLP()
    back.load_state_dict(repaired.state_dict(), strict=True)
    assert torch.allclose(back.eval()(held_out), repaired(held_out), atol=1e-6)


def test_calibration_of_tokens_traces_pairwise_schedules_too():
    members = [_member(1), _member(2), _member(5)]
    cal = torch.randn(128, 6, 4, generator=torch.Generator().manual_seed(3))
    fused = fuse(members, schedule="recursive", calibration=cal)
    assert isinstance(fused, TokenMLP) and fused(cal[:2]).shape == (2, 3)


class Scaled(nn.Module):
    """An MLP whose forward takes the input by keyword and a scale with a number's default."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x=None, scale=0.5):
        return self.out(torch.relu(self.hidden(x))) * scale


def test_keyword_with_a_number_default_is_a_constant():
    torch.manual_seed(1)
    members = [Scaled(), Scaled()]
    cal = torch.randn(256, 8, generator=torch.Generator().manual_seed(3))
    held_out = torch.randn(128, 8, generator=torch.Generator().manual_seed(4))
    plain = fuse(members)
    repaired = fuse(members, calibration=cal)
    assert _gap(repaired, members, held_out) < 0.5 * _gap(plain, members, held_out)
    back = Scaled()
    back.load_state_dict(repaired.state_dict(), strict=True)
    assert torch.allclose(back(held_out), repaired(held_out), atol=1e-6)


class FlatTokens(TokenMLP):
    """TokenMLP on flat inputs of 24 features, which forward reshapes into 6 tokens of 4."""

    def forward(self, x):
        return super().forward(x.view(x.shape[0], 6, 4))


def test_flat_inputs_reshaped_into_tokens_are_measured():
    torch.manual_seed(1)
    members = [FlatTokens().eval(), FlatTokens().eval()]
    cal = torch.randn(256, 24, generator=torch.Generator().manual_seed(3))
    held_out = torch.randn(128, 24, generator=torch.Generator().manual_seed(4))
    plain = fuse(members, example_inputs=cal[:4])
    repaired = fuse(members, calibration=cal)
    assert _gap(repaired, members, held_out) < 0.5 * _gap(plain, members, held_out)
    back = FlatTokens()
    back.load_state_dict(repaired.state_dict(), strict=True)
    assert torch.allclose(back.eval()(held_out), repaired(held_out), atol=1e-6)
