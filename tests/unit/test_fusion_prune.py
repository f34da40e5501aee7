"""NT pruning, orders and schedules: exact widths, strict loading, equal leaf weights, bad input.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_prune.py
"""

import pytest
import torch

from ntdist.errors import UserError
from ntdist.fusion import (Ensemble, IMPORTANCES, concat, fuse, fuse_pair, prune, recursive_pairs,
                           recursive_plan)
from ntdist.models import build_model

MLP_KW = {"input_dim": 16, "width": 10, "depth": 2}
CONV_KW = {"in_channels": 1, "image_size": 8, "channels": (5, 7), "hidden": (9, 6)}


def mlps(k, seed=0, **kw):
    torch.manual_seed(seed)
    return [build_model("mlp", {**MLP_KW, **kw}).eval() for _ in range(k)]


def lenets(k, seed=0):
    torch.manual_seed(seed)
    return [build_model("lenet", CONV_KW).eval() for _ in range(k)]


def shapes(model):
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


@pytest.mark.parametrize("order", ["merge_prune", "prune_merge"])
@pytest.mark.parametrize("schedule", ["flat", "iterative", "recursive"])
def test_every_k_gives_the_original_architecture(schedule, order):
    x = torch.randn(2, 1, 8, 8)
    for k in range(2, 9):
        for name, models, kwargs, ex in (("mlp", mlps(k, k), MLP_KW, None), ("lenet", lenets(k, k), CONV_KW, x)):
            fused = fuse(models, schedule=schedule, order=order, example_inputs=ex)
            assert shapes(fused) == shapes(models[0]), (name, k)
            build_model(name, kwargs).load_state_dict(fused.state_dict(), strict=True)
            assert torch.isfinite(fused(x if ex is not None else torch.randn(2, 16))).all()


def test_fused_model_is_a_separate_copy():
    models = mlps(2)
    fused = fuse(models)
    fused.net[1].weight.data.zero_()
    assert models[0].net[1].weight.abs().sum() > 0
    assert fused.net[1].weight.requires_grad


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_keep_ratio_and_width_give_exact_unit_counts(k):
    models = mlps(k, width=512, input_dim=8)
    assert fuse(models, keep_ratio=1.0).net[1].out_features == 512          # never 511
    fused = fuse(models, keep_ratio=0.5, order="prune_merge")
    assert fused.net[1].out_features == 256 and fused.net[3].weight.shape == (256, 256)
    fused = fuse(models, width=300, schedule="recursive")
    assert fused.net[1].weight.shape == (300, 8) and fused.net[5].weight.shape == (10, 300)
    fused = fuse(models, width=701, order="prune_merge", schedule="iterative")
    assert fused.net[1].out_features == 701 and fused.net[3].in_features == 701


def test_width_scales_every_space_proportionally():
    models = lenets(3)
    fused = fuse(models, width=10, example_inputs=torch.randn(2, 1, 8, 8))      # conv1: 5 -> 10 (ratio 2)
    assert fused.features[0].out_channels == 10 and fused.features[3].out_channels == 14
    assert fused.classifier[1].out_features == 18 and fused.classifier[1].in_features == 14 * 4


def test_keep_ratio_k_without_pruning_is_the_exact_ensemble():
    x = torch.randn(6, 16)
    for k in (3, 5):
        models = mlps(k, seed=k)
        ref = Ensemble(models)(x)
        for schedule in ("flat", "iterative", "recursive"):
            fused = fuse(models, schedule=schedule, keep_ratio=k)
            assert fused.net[1].out_features == 10 * k
            assert torch.allclose(fused(x), ref, rtol=1e-5, atol=1e-6), schedule


def test_recursive_plan_passes_the_odd_model_up():
    assert recursive_pairs(2) == [[(0, 1)]]
    assert recursive_pairs(3) == [[(0, 1)], [(0, 2)]]
    assert recursive_pairs(7) == [[(0, 1), (2, 3), (4, 5)], [(0, 2), (4, 6)], [(0, 4)]]
    assert recursive_plan(3) == [[(0, 1, 1, 1)], [(0, 2, 2, 1)]]
    assert recursive_plan(6)[-1] == [(0, 4, 4, 2)]
    for k in range(2, 12):
        assert sum(len(r) for r in recursive_pairs(k)) == k - 1


@pytest.mark.parametrize("k", [3, 6])
def test_recursive_equals_fuse_pair_following_the_plan(k):
    models = mlps(k, seed=3)
    expected = fuse(models, schedule="recursive", importance="group_l2")
    held = dict(enumerate(models))
    for steps in recursive_plan(k):
        for left, right, n_left, n_right in steps:
            held[left] = fuse_pair(held[left], held.pop(right), n_left, n_right, importance="group_l2")
    for (name, a), b in zip(expected.state_dict().items(), held[0].state_dict().values()):
        assert torch.equal(a, b), name


def test_self_fusion_keeps_both_copies_of_the_top_half():
    torch.manual_seed(0)
    model = build_model("mlp", {"input_dim": 16, "width": 10, "depth": 1}).eval()
    twin = build_model("mlp", {"input_dim": 16, "width": 10, "depth": 1})
    twin.load_state_dict(model.state_dict())
    fused = fuse([model, twin])
    first = model.net[1]
    norms = torch.cat([first.weight, first.bias[:, None]], 1).norm(dim=1)
    top = torch.sort(norms, descending=True).indices[:5].sort().values
    rows = fused.net[1].weight
    assert torch.equal(rows[:5], first.weight[top]) and torch.equal(rows[5:], first.weight[top])
    assert torch.equal(fused.net[3].weight, torch.cat([model.net[3].weight[:, top]] * 2, 1) * 0.5)


def test_prune_a_single_model_and_custom_importance():
    model = mlps(1)[0]
    small = prune(model, keep_ratio=0.5)
    assert small.net[1].out_features == 5
    last = prune(model, keep_ratio=0.3, importance=lambda view: -torch.arange(view.size, dtype=torch.float))
    assert torch.equal(last.net[1].weight, model.net[1].weight[:3])
    assert set(IMPORTANCES) >= {"l2", "group_l2", "l1"}
    for name in IMPORTANCES:
        assert fuse(mlps(3), importance=name).net[3].weight.shape == (10, 10)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="at least 2"):
        fuse(mlps(1))
    a, b = mlps(1)[0], build_model("mlp", {**MLP_KW, "input_dim": 12})   # widths may differ, inputs may not
    with pytest.raises(UserError, match=r"'net\.1\.weight'.*\[10, 16\].*\[10, 12\].*dimension 1 is no hidden"):
        fuse([a, b])
    with pytest.raises(UserError, match="width"):
        fuse(mlps(2), width=21)
    with pytest.raises(UserError, match="width"):
        fuse(mlps(2), width=0)
    with pytest.raises(UserError, match="keep_ratio"):
        fuse(mlps(3), keep_ratio=3.5)
    bad = mlps(2)
    bad[1].net[3].weight.data[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"model 1.*NaN.*net\.3\.weight"):
        fuse(bad)
    with pytest.raises(UserError, match="did you mean 'recursive'"):
        fuse(mlps(2), schedule="recursve")
    with pytest.raises(UserError, match="importance"):
        fuse(mlps(2), importance="l3")
    with pytest.raises(UserError, match="weights"):
        concat(mlps(2), weights=[1.0, float("inf")])


def test_batchnorm_and_residual_spaces_prune_together():
    torch.manual_seed(1)
    models = [build_model("resnet18", {"in_channels": 3, "width": 4}).eval() for _ in range(3)]
    fused = fuse(models, keep_ratio=0.5, schedule="recursive")
    assert fused.layer1[0].conv2.out_channels == 2 and fused.layer1[0].bn2.running_mean.shape == (2,)
    assert fused.layer2[0].shortcut[0].weight.shape == (4, 2, 1, 1)
    back = build_model("resnet18", {"in_channels": 3, "width": 4})
    full = fuse(models, schedule="iterative")
    back.load_state_dict(full.state_dict(), strict=True)
    assert torch.isfinite(back.eval()(torch.randn(2, 3, 8, 8))).all()


@pytest.mark.parametrize("importance", ["l1", "l2", "group_l2"])
@pytest.mark.parametrize("index", [1, 3, 5])   # a first layer, a hidden layer, the output layer
@pytest.mark.parametrize("part", ["weight", "bias"])
def test_a_non_finite_value_anywhere_is_named_whatever_the_importance(importance, index, part):
    # the finiteness check skips what the importance already read: nothing may slip through
    bad = mlps(2)
    getattr(bad[1].net[index], part).data.view(-1)[0] = float("inf")
    with pytest.raises(UserError, match=rf"model 1.*inf.*net\.{index}\.{part}"):
        fuse(bad, importance=importance)
