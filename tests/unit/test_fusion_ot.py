"""OT fusion, weight averaging, the output ensemble, distillation loss and BN re-estimation.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_ot.py
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ntdist.fusion import Ensemble, average, distillation_loss, fuse, ot_fuse, reestimate_bn
from helpers import randomise_bn
from ntdist.models import build_model


def permuted_copy(model, example_inputs=None):
    """`model` with every hidden space randomly permuted (same function, different unit order)."""
    from ntdist.fusion.analysis.graph import analyze
    from ntdist.fusion.analysis.plan import parts_of

    plan = analyze(model, example_inputs)
    perms = {s: torch.randperm(n) for s, n in plan.sizes.items()}
    state = {}
    for name, t in model.state_dict().items():
        spec = plan.tensors[name]
        for d, layout in enumerate(spec.dims):
            if layout is not None:
                pieces = []
                for dim, piece in parts_of(t, d, layout, plan.sizes):
                    p = perms[dim.space]
                    pieces.append(piece.index_select(d, (p[:, None] * dim.factor + torch.arange(dim.factor)).reshape(-1)))
                t = torch.cat(pieces, d)
        state[name] = t.clone()
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin


def check_recovers(name, kwargs, x):
    torch.manual_seed(0)
    model = randomise_bn(build_model(name, kwargs)).eval()
    twin = permuted_copy(model, x).eval()
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)          # same function
        assert not torch.equal(twin.state_dict()[next(iter(model.state_dict()))], model.state_dict()[
            next(iter(model.state_dict()))])
        fused = fuse([model, twin], method="ot", example_inputs=x)
        for (n, a), b in zip(model.state_dict().items(), fused.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-5), n
        assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_ot_recovers_a_permuted_mlp_with_bias():
    check_recovers("mlp", {"input_dim": 16, "width": 12, "depth": 3, "bias": True}, torch.randn(4, 16))


def test_ot_recovers_a_permuted_vgg_with_batchnorm():
    check_recovers("vgg11", {"in_channels": 3, "image_size": 8, "width": 0.125, "batch_norm": True},
                   torch.randn(4, 3, 8, 8))


def test_ot_recovers_a_permuted_resnet_with_residual_spaces():
    check_recovers("resnet18", {"in_channels": 3, "width": 4}, torch.randn(2, 3, 8, 8))


def test_ot_with_three_models_and_schedules_keeps_the_architecture():
    torch.manual_seed(0)
    models = [build_model("lenet", {"in_channels": 1, "image_size": 8}).eval() for _ in range(3)]
    x = torch.randn(2, 1, 8, 8)
    for schedule in ("flat", "iterative", "recursive"):
        fused = fuse(models, method="ot", schedule=schedule, example_inputs=x)
        build_model("lenet", {"in_channels": 1, "image_size": 8}).load_state_dict(fused.state_dict(), strict=True)
    assert ot_fuse(models, example_inputs=x).features[0].weight.shape == (6, 1, 5, 5)


def test_average_of_identical_models_is_identity_including_bn_buffers():
    torch.manual_seed(0)
    model = randomise_bn(build_model("vgg11", {"in_channels": 3, "image_size": 8, "width": 0.125}))
    copies = [model] + [build_model("vgg11", {"in_channels": 3, "image_size": 8, "width": 0.125}) for _ in range(2)]
    for c in copies[1:]:
        c.load_state_dict(model.state_dict())
    avg = average(copies)
    for (n, a), b in zip(model.state_dict().items(), avg.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n
    two = [build_model("mlp", {"input_dim": 4, "width": 3}) for _ in range(2)]
    mixed = fuse(two, method="avg", schedule="recursive")
    assert torch.allclose(mixed.net[1].weight, (two[0].net[1].weight + two[1].net[1].weight) / 2)


def test_ensemble_and_distillation_loss():
    torch.manual_seed(0)
    models = [nn.Linear(3, 4) for _ in range(2)]
    x = torch.randn(5, 3)
    assert torch.allclose(Ensemble(models)(x), (models[0](x) + models[1](x)) / 2)
    assert torch.allclose(Ensemble(models, [3, 1])(x), 0.75 * models[0](x) + 0.25 * models[1](x))
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    assert torch.allclose(distillation_loss(s, s, y), F.cross_entropy(s, y), atol=1e-6)
    kl = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean")
    assert torch.allclose(distillation_loss(s, t, y, temperature=3, soft_weight=0.5),
                          kl * 9 * 0.5 + F.cross_entropy(s, y), atol=1e-6)


def test_reestimate_bn_recomputes_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    data = [torch.randn(16, 3) * 2 + 1 for _ in range(4)]
    reestimate_bn(model, [(d, None) for d in data], batches=3)
    feats = model[0](torch.cat(data[:3])).detach()
    assert torch.allclose(model[1].running_mean, feats.mean(0), atol=1e-5)
    assert not model.training and model[1].momentum == 0.1
