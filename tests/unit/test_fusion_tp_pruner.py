"""`pruner="torch_pruning"`: the authors' pipeline (concat, then Torch-Pruning) against ntdist's own pruner.

Torch-Pruning's `GroupMagnitudeImportance(p=2)` with local ranking is ntdist's `group_l2`
(both score all layers on the unpruned wide model), so the two pruners keep the same
units and their fused models agree bit for bit, except that Torch-Pruning leaves depthwise
filters out of its score (tested too); the tests also check strict loading into the original
class, forward, training mode, exact widths, the CLI and the refusals.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_tp_pruner.py
"""

import builtins

import pytest
import torch
import torch.nn as nn

from ntdist.errors import UserError
from ntdist.fusion import FusionConfig, analyze, fuse, fuse_pair
from ntdist.models import build_model

MEMBERS = {
    "mlp": ({"input_dim": 16, "width": 10, "depth": 2}, None),
    "lenet": ({"in_channels": 1, "image_size": 8, "channels": (5, 7), "hidden": (9, 6)}, (1, 8, 8)),
    "vgg11": ({"in_channels": 3, "image_size": 16, "width": 0.125, "batch_norm": True}, (3, 16, 16)),
    "resnet18": ({"in_channels": 3, "width": 4}, (3, 8, 8)),
}


def members(name, k, seed=0):
    """k members with random BatchNorm scales and statistics, so BN importance and copying are exercised."""
    torch.manual_seed(seed)
    kwargs, shape = MEMBERS[name]
    models = [build_model(name, kwargs).eval() for _ in range(k)]
    for model in models:
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.data.normal_()
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, *shape) if shape else torch.randn(2, kwargs["input_dim"])
    return models, kwargs, x if shape else None, x


@pytest.mark.parametrize("name", sorted(MEMBERS))
@pytest.mark.parametrize("schedule,k", [("flat", 3), ("recursive", 3), ("iterative", 2)])
def test_torch_pruning_keeps_the_units_ntdist_keeps(name, schedule, k):
    models, kwargs, example, x = members(name, k)
    ours = fuse(models, schedule=schedule, example_inputs=example)
    theirs = fuse(models, schedule=schedule, example_inputs=example, pruner="torch_pruning")
    assert type(theirs) is type(models[0]) and not theirs.training
    build_model(name, kwargs).load_state_dict(theirs.state_dict(), strict=True)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        assert torch.equal(fuse(models, schedule=schedule, example_inputs=example, pruner="torch_pruning")(x),
                           theirs(x))       # Torch-Pruning traces with autograd: it must work under no_grad too
    assert models[0].state_dict().keys() == b.keys() and all(      # members untouched
        t.data_ptr() != b[n].data_ptr() for n, t in models[0].state_dict().items())


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_other_widths_are_exact_and_match(name):
    models, _, example, x = members(name, 3, seed=1)
    for keep_ratio in (0.5, 1.7):
        ours = fuse(models, keep_ratio=keep_ratio, example_inputs=example)
        theirs = fuse(models, keep_ratio=keep_ratio, example_inputs=example, pruner="torch_pruning")
        assert {n: t.shape for n, t in ours.state_dict().items()} == \
               {n: t.shape for n, t in theirs.state_dict().items()}
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x))


def test_k3_at_width_512_keeps_512_not_511():
    torch.manual_seed(0)
    models = [build_model("mlp", {"input_dim": 8, "width": 512, "depth": 2}) for _ in range(3)]
    fused = fuse(models, pruner="torch_pruning")        # int(1536 * (1 - 2/3)) would be 511
    assert fused.net[1].out_features == 512 and fused.net[3].weight.shape == (512, 512)


def test_fuse_pair_as_the_distributed_tree_calls_it():
    models, kwargs, example, x = members("resnet18", 2, seed=2)
    with torch.device("meta"):
        reference = build_model("resnet18", kwargs)      # the tree's template: shapes only
    plan = analyze(models[0], example)
    theirs = fuse_pair(*models, reference=reference, plan=plan, example_inputs=example, pruner="torch_pruning")
    ours = fuse_pair(*models, reference=reference, plan=plan, example_inputs=example)
    assert all(t.device.type == "cpu" and torch.equal(t, ours.state_dict()[n]) for n, t in theirs.state_dict().items())


def test_fuse_pair_and_training_mode():
    models, kwargs, example, _ = members("lenet", 2)
    models[0].train()
    fused = fuse_pair(*models, example_inputs=example, pruner="torch_pruning")
    assert fused.training
    assert all(torch.equal(t, fuse_pair(*models, example_inputs=example).state_dict()[n])
               for n, t in fused.state_dict().items())


def test_refusals_are_one_line():
    models, _, example, _ = members("mlp", 2)
    cases = [dict(method="avg"), dict(method="ot"), dict(order="prune_merge"), dict(dedup=True),
             dict(importance="l2"), dict(pruner="torchpruning")]
    for case in cases:
        with pytest.raises(UserError) as err:
            fuse(models, **{"pruner": "torch_pruning", **case})
        assert "\n" not in str(err.value) and "pruner" in str(err.value), case
    with pytest.raises(UserError, match="did you mean 'torch_pruning'"):
        fuse(models, pruner="torchpruning")
    lenets, _, _, _ = members("lenet", 2)
    with pytest.raises(UserError, match="example_inputs"):
        fuse(lenets, pruner="torch_pruning")


def test_config_validates_the_pruner():
    assert FusionConfig().pruner == "ntdist"
    assert FusionConfig(pruner="torch_pruning").pruner == "torch_pruning"
    for bad in (dict(pruner="torchpruning"), dict(pruner="torch_pruning", methods=["avg"]),
                dict(pruner="torch_pruning", dedup=True), dict(pruner="torch_pruning", importance="l1"),
                dict(pruner="torch_pruning", order="prune_merge")):
        with pytest.raises(UserError) as err:
            FusionConfig(**bad)
        assert "\n" not in str(err.value) and "pruner" in str(err.value), bad


def test_missing_package_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_torch_pruning(name, *args, **kwargs):
        if name == "torch_pruning":
            raise ImportError("No module named 'torch_pruning'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_torch_pruning)
    models, _, _, _ = members("mlp", 2)
    with pytest.raises(UserError, match="pip install torch-pruning"):
        fuse(models, pruner="torch_pruning")
    fuse(models)        # the default pruner never imports it


def test_refuses_models_it_would_prune_differently():
    torch.manual_seed(0)

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.b(self.a(x)).mean((2, 3)))
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(UserError, match="grouped convolutions.*pruner 'ntdist'"):
        fuse([Grouped(), Grouped()], example_inputs=x, pruner="torch_pruning")


def test_fuse_command_takes_the_pruner(tmp_path, capsys):
    from ntdist.cli import main
    from ntdist.records.checkpoint import load_model
    kwargs = {"input_dim": 16, "num_classes": 4, "width": 8}
    torch.manual_seed(0)
    inputs = []
    for name in ("a", "b", "c"):
        torch.save(build_model("mlp", kwargs).state_dict(), tmp_path / f"{name}.pt")
        inputs.append(str(tmp_path / f"{name}.pt"))
    common = ["fuse", "--model", "mlp", "--model-kwargs", '{"input_dim": 16, "num_classes": 4, "width": 8}']
    outs = {p: str(tmp_path / f"{p}.safetensors") for p in ("ntdist", "torch_pruning")}
    for pruner, out in outs.items():
        assert main(common + ["--pruner", pruner, "-o", out, *inputs]) == 0
    ours, theirs = (load_model(out)[0].state_dict() for out in outs.values())
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    capsys.readouterr()
    assert main(common + ["--pruner", "torch_pruning", "--method", "avg", "-o", str(tmp_path / "x.pt"),
                          *inputs]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pruner only applies to method nt, not to avg" in err


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.features(x))


def without_depthwise_filters(view):
    """group_l2 leaving out producers with one input channel: in `Depthwise` exactly its depthwise filters."""
    parts = [t.flatten(1).square().sum(1).double() for t in view.producers if t.shape[1] != 1]
    parts += [t.flatten(1).square().sum(1).double() for t in view.consumers]
    parts += [t.square().double() for t in view.scales]
    return torch.stack(parts).mean(0)


def test_depthwise_convs_rank_as_group_l2_without_their_filters():
    """Torch-Pruning's group magnitude leaves depthwise filters out (their pruning handler is not the conv one
    it reads); ntdist's group_l2 counts them as producers, so the two can keep different units."""
    x = torch.randn(2, 3, 8, 8)
    same = []
    for seed in range(4):
        torch.manual_seed(seed)
        models = [Depthwise().eval() for _ in range(3)]
        for model in models:
            for bn in (model.features[1], model.features[4]):
                bn.weight.data.normal_()
        theirs = fuse(models, example_inputs=x, pruner="torch_pruning")
        assert type(theirs) is Depthwise and torch.isfinite(theirs(x)).all()
        Depthwise().load_state_dict(theirs.state_dict(), strict=True)
        matched = fuse(models, example_inputs=x, importance=without_depthwise_filters).state_dict()
        assert all(torch.equal(t, matched[n]) for n, t in theirs.state_dict().items())
        ours = fuse(models, example_inputs=x).state_dict()
        same.append(all(torch.equal(t, ours[n]) for n, t in theirs.state_dict().items()))
    assert not all(same)        # with group_l2 itself the kept units differ on some seeds
