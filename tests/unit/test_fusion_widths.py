"""Members of different widths: the concatenation is exact, NT and OT return the first member's structure
(at the target width), repair brings NT closer to the concatenation, and what cannot be fused so is one line.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_widths.py
"""

import pytest
import torch
import torch.nn as nn

from helpers import randomise_bn
from ntdist.errors import UserError
from ntdist.fusion import concat, fuse
from ntdist.cli import main
from ntdist.models import ModelSpec, build_model
from ntdist.records.checkpoint import load_model, save_checkpoint

MLP = {"input_dim": 8, "depth": 2}


def mlps(widths, seed=0):
    torch.manual_seed(seed)
    return [build_model("mlp", dict(MLP, width=w)).eval() for w in widths]


def widths_of(model):
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][:-1]


def average_output(models, x):
    return sum(m(x) for m in models) / len(models)


@pytest.mark.parametrize("name, kwargs, widths, shape", [
    ("mlp", MLP, [4, 8, 16], (6, 8)),
    ("resnet18", {"in_channels": 3}, [4, 8], (3, 3, 8, 8)),
    ("vgg11", {"in_channels": 3, "image_size": 8, "batch_norm": True}, [0.125, 0.25], (3, 3, 8, 8)),
])
def test_the_concatenation_of_members_of_different_widths_is_exact(name, kwargs, widths, shape):
    torch.manual_seed(0)
    models = [randomise_bn(build_model(name, dict(kwargs, width=w))).eval() for w in widths]
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(concat(models, example_inputs=x)(x), average_output(models, x), atol=1e-5)
        fused = fuse(models, method="nt", example_inputs=x)
        first = models[0].state_dict()
        assert {n: t.shape for n, t in fused.state_dict().items()} == {n: t.shape for n, t in first.items()}


@pytest.mark.parametrize("schedule", ["flat", "iterative", "recursive"])
@pytest.mark.parametrize("target, expected", [({}, [4, 4]), ({"width": 8}, [8, 8]), ({"keep_ratio": 2.0}, [8, 8])])
def test_nt_returns_the_first_members_structure_at_the_target_width(schedule, target, expected):
    models, x = mlps([4, 8, 16]), torch.randn(64, 8)
    fused = fuse(models, method="nt", schedule=schedule, example_inputs=x[:2], **target)
    assert widths_of(fused) == expected and torch.isfinite(fused(x)).all()


def test_repair_brings_nt_closer_to_the_concatenation_on_held_out_inputs():
    models = mlps([16, 32, 64])
    calibration, held_out = torch.randn(512, 8), torch.randn(256, 8)
    with torch.no_grad():
        target = average_output(models, held_out)
        plain = fuse(models, method="nt", example_inputs=calibration[:2], repair="none")
        repaired = fuse(models, method="nt", example_inputs=calibration[:2], calibration=calibration)
        error = {n: (m(held_out) - target).pow(2).mean().item() for n, m in (("plain", plain), ("repaired", repaired))}
    assert error["repaired"] < 0.5 * error["plain"], error


def doubled(model):
    """`model` (an MLP) with every hidden unit twice and its outgoing weights halved: the same function."""
    twin = build_model("mlp", dict(MLP, width=2 * widths_of(model)[0])).eval()
    s = model.state_dict()
    names = [n for n in s if n.endswith("weight")]
    new = {}
    for i, name in enumerate(names):
        w, b = s[name], s[name.replace("weight", "bias")]
        if i > 0:
            w = w.repeat_interleave(2, 1) / 2
        if i < len(names) - 1:
            w, b = w.repeat_interleave(2, 0), b.repeat_interleave(2)
        new[name], new[name.replace("weight", "bias")] = w, b
    twin.load_state_dict(new)
    return twin


@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_ot_between_different_widths_recovers_a_widened_copy(mode):
    model = mlps([4])[0]
    wide, x = doubled(model), torch.randn(32, 8)
    with torch.no_grad():
        assert torch.allclose(wide(x), model(x), atol=1e-5)
        fused = fuse([model, wide], method="ot", example_inputs=x, ot_mode=mode)
        assert widths_of(fused) == [4, 4] and torch.allclose(fused(x), model(x), atol=1e-5)


class Normed(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, width), nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


def test_what_cannot_be_fused_across_widths_is_one_line():
    x = torch.randn(2, 8)
    torch.manual_seed(0)
    other_input = build_model("mlp", dict(MLP, width=4, input_dim=6))
    with pytest.raises(UserError, match=r"dimension 1 is no hidden width"):
        fuse([mlps([4])[0], other_input], method="nt", example_inputs=x)
    with pytest.raises(UserError, match="averaging needs members of identical shapes"):
        fuse(mlps([4, 8]), method="avg", example_inputs=x)
    with pytest.raises(UserError, match="Normed has LayerNorms: fuse members of one width"):
        fuse([Normed(4), Normed(8)], method="nt", example_inputs=x)
    same = [Normed(4), Normed(4)]   # of one width it still fuses
    assert torch.allclose(concat(same, example_inputs=x)(x), average_output(same, x), atol=1e-5)


def test_ntdist_fuse_takes_checkpoints_of_different_widths(tmp_path, capsys):
    paths = []
    for width, model in zip([4, 8, 16], mlps([4, 8, 16])):
        paths.append(str(tmp_path / f"m{width}.safetensors"))
        save_checkpoint(paths[-1], model, ModelSpec("mlp", dict(MLP, width=width, num_classes=10)))
    calibration = str(tmp_path / "x.pt")
    torch.save(torch.randn(256, 8), calibration)
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "--width", "8", "--calibration", calibration, "-o", out, *paths]) == 0
    fused, meta = load_model(out)
    assert widths_of(fused) == [8, 8] and meta["model"]["kwargs"]["width"] == 8
    assert main(["fuse", "--method", "avg", "-o", str(tmp_path / "avg.safetensors"), *paths]) == 2
    assert "averaging needs members of identical shapes" in capsys.readouterr().err
