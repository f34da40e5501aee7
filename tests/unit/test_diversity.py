"""Tests for ntdist.fusion.diversity: disagreement, duplicate units and the near-identical warning.

Run: .venv/bin/python -m pytest tests/unit/test_diversity.py
"""

import copy
import json
import os

import pytest
import torch
from torch import nn
from userpkg.models import conv1d_net

from ntdist.fusion import diversity
from ntdist.fusion.diversity import diversity_summary, duplicate_units, fusable_layers, prediction_disagreement


def _mlp(seed: int, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, bias=False), nn.Flatten(),
                         nn.Linear(16, 10))  # shapes are compared, never run forward


def test_disagreement_of_identical_logits_is_zero():
    logits = torch.randn(50, 10)
    matrix, mean = prediction_disagreement([logits, logits.clone(), logits * 2])
    assert mean == 0.0
    assert matrix.shape == (3, 3) and float(matrix.abs().sum()) == 0.0


def test_disagreement_hand_computed():
    a = torch.tensor([0, 1, 2, 3])
    b = torch.tensor([0, 1, 2, 0])
    c = torch.tensor([1, 0, 2, 0])
    matrix, mean = prediction_disagreement([a, b, c])
    assert matrix[0, 1] == pytest.approx(0.25) and matrix[1, 0] == pytest.approx(0.25)
    assert matrix[0, 2] == pytest.approx(0.75) and matrix[1, 2] == pytest.approx(0.5)
    assert mean == pytest.approx(0.5)
    assert prediction_disagreement([a])[1] is None
    with pytest.raises(ValueError):
        prediction_disagreement([a, a[:2]])


def test_last_layer_is_not_compared():
    names = [name for name, _ in fusable_layers(_mlp(0))]
    assert names == ["0", "2"]


def test_identical_models_are_all_duplicates_and_warn():
    model = _mlp(0)
    twins = [model, copy.deepcopy(model)]
    assert duplicate_units(twins) == {"0": 1.0, "2": 1.0}
    x = torch.randn(100, 20)
    summary = diversity_summary(twins, [m(x) for m in twins])
    assert summary["duplicate_fraction_mean"] == 1.0
    assert summary["disagreement_mean"] == 0.0
    assert "near-identical" in summary["warning"] and "train.identical_members" in summary["warning"]
    json.dumps(summary)


def test_independent_models_have_few_duplicates_and_no_warning():
    models = [_mlp(seed) for seed in range(3)]
    fractions = duplicate_units(models)
    assert max(fractions.values()) < 0.05
    # logits with independent argmax so the members disagree
    logits = [torch.randn(200, 10, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    summary = diversity_summary(models, logits)
    assert summary["warning"] is None
    assert summary["disagreement_mean"] > 0.5
    assert len(summary["disagreement"]) == 3
    json.dumps(summary)


def test_low_disagreement_alone_warns():
    models = [_mlp(seed) for seed in range(2)]
    logits = torch.randn(300, 10)
    summary = diversity_summary(models, [logits, logits])
    assert summary["duplicate_fraction_mean"] < 0.5
    assert "disagree on only" in summary["warning"]


def test_convolutions_and_chunking(monkeypatch):
    monkeypatch.setattr(diversity, "_CHUNK_ELEMENTS", 7)  # force many small chunks
    model = _cnn(0)
    other = _cnn(1)
    with torch.no_grad():
        other[0].weight[:4] = model[0].weight[:4]
        other[0].bias[:4] = model[0].bias[:4]
    fractions = duplicate_units([model, other])
    assert set(fractions) == {"0", "2"}
    assert fractions["0"] == pytest.approx(8 / 32)
    assert fractions["2"] < 0.1


def test_mismatched_architectures_are_refused():
    with pytest.raises(ValueError):
        duplicate_units([_mlp(0), _cnn(0)])


def test_single_member_and_bad_threshold():
    model = _mlp(0)
    assert duplicate_units([model]) == {"0": 0.0, "2": 0.0}
    summary = diversity_summary([model], [torch.randn(10, 10)])
    assert summary["disagreement_mean"] is None and summary["warning"] is None
    with pytest.raises(ValueError):
        duplicate_units([model, model], threshold=1.5)


def test_sampled_duplicate_check_is_bounded_and_estimates_the_fraction(monkeypatch):
    model = _mlp(0, width=256)
    half = copy.deepcopy(model)
    with torch.no_grad():   # the second half of each hidden layer's units: fresh, no longer copies
        for index in (0, 2):
            half[index].weight[128:].normal_()
            half[index].bias[128:].normal_()
    exact = duplicate_units([model, half])
    assert exact == {"0": 0.5, "2": 0.5}
    rows_checked = []
    near_copy = diversity.has_near_copy
    monkeypatch.setattr(diversity, "has_near_copy", lambda rows, others, t: rows_checked.append(rows.shape[0])
                        or near_copy(rows, others, t))
    sampled = duplicate_units([model, half], max_units=64)
    assert max(rows_checked) == 64 and len(rows_checked) == 4   # 2 members x 2 layers, 64 units each
    assert all(abs(sampled[name] - 0.5) < 0.15 for name in exact)
    assert duplicate_units([model, copy.deepcopy(model)], max_units=64) == {"0": 1.0, "2": 1.0}


def _readme_conv1d(seed: int) -> nn.Module:
    """The README's own-model example (`conv1d_net`, width 32) as trained members come out of MNIST-1D: their
    5-weight filters take few shapes, so another member's filter is a near-copy although the heads differ."""
    torch.manual_seed(seed)
    return conv1d_net(10, 32)


def test_filters_of_few_weights_are_not_judged_and_the_readme_example_does_not_warn():
    a, b = _readme_conv1d(0), _readme_conv1d(1)
    with torch.no_grad():   # b's filters: a's, each tilted by a little noise (cosine about 0.99)
        b[0].weight.copy_(a[0].weight + 0.02 * torch.randn_like(a[0].weight))
        b[0].bias.copy_(a[0].bias)
    assert diversity.has_near_copy(diversity.unit_rows(b[0]), diversity.unit_rows(a[0]), 0.95).all()
    x = torch.randn(300, 1, 40)
    with torch.no_grad():
        summary = diversity_summary([a, b], [a(x), b(x)])
    assert summary["disagreement_mean"] > 0.1
    assert "0" not in summary["duplicate_fraction"] and summary["warning"] is None
    twins = [a, copy.deepcopy(a)]
    with torch.no_grad():
        assert "near-identical" in diversity_summary(twins, [m(x) for m in twins])["warning"]


def test_the_warning_gives_the_advice_of_the_usage_guide():
    import re

    from helpers import ROOT
    usage = open(os.path.join(ROOT, "docs", "USAGE.md")).read()
    paragraph = usage[usage.index("* **The diversity check.**"):].split("\n* ")[0]
    model = _mlp(0)
    warning = diversity_summary([model, model], [torch.zeros(5, 10)] * 2)["warning"]
    keys = set(re.findall(r"\b(?:train|model|output)\.[a-z_]+", warning))
    assert keys and all(key in paragraph for key in keys), (keys, paragraph)
