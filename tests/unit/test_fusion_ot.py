"""OT fusion, weight averaging, the output ensemble, distillation loss and BN re-estimation.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_ot.py
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ntdist.fusion import Ensemble, average, distillation_loss, fuse, ot_fuse, reestimate_bn
from helpers import randomise_bn
from ntdist.cli import main
from ntdist.config import load_config
from ntdist.errors import UserError
from ntdist.models import ModelSpec, build_model
from ntdist.records.checkpoint import load_model, save_checkpoint
from ntdist.records.results import read_results


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


def check_recovers(name, kwargs, x, **ot):
    torch.manual_seed(0)
    model = randomise_bn(build_model(name, kwargs)).eval()
    twin = permuted_copy(model, x).eval()
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)          # same function
        assert not torch.equal(twin.state_dict()[next(iter(model.state_dict()))], model.state_dict()[
            next(iter(model.state_dict()))])
        fused = fuse([model, twin], method="ot", example_inputs=x, **ot)
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


@pytest.mark.parametrize("name, kwargs, shape", [
    ("mlp", {"input_dim": 16, "width": 12, "depth": 3, "bias": True}, (32, 16)),
    ("vgg11", {"in_channels": 3, "image_size": 8, "width": 0.125, "batch_norm": True}, (8, 3, 8, 8)),
    ("resnet18", {"in_channels": 3, "width": 4}, (8, 3, 8, 8)),
])
def test_the_activations_mode_recovers_a_permuted_model(name, kwargs, shape):
    check_recovers(name, kwargs, torch.randn(*shape), ot_mode="activations")


def test_sinkhorn_transport_tends_to_the_exact_one_and_to_averaging_all_units():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    model = build_model("mlp", {"input_dim": 16, "width": 12, "depth": 2, "bias": True}).eval()
    twin = permuted_copy(model, x).eval()
    sharp = fuse([model, twin], method="ot", example_inputs=x, ot_reg=1e-3)
    assert torch.allclose(sharp(x), model(x), atol=1e-3)
    blurred = fuse([model, twin], method="ot", example_inputs=x, ot_reg=100.0)
    first = twin.state_dict()["net.1.weight"]   # the first layer's rows: each fused row is about their mean
    fused_rows = blurred.state_dict()["net.1.weight"]
    expected = (model.state_dict()["net.1.weight"] + first.mean(0, keepdim=True)) / 2
    assert torch.allclose(fused_rows, expected, atol=1e-2)


def test_ot_options_are_checked_and_belong_to_ot():
    models = [build_model("mlp", {"input_dim": 4, "width": 3, "depth": 1}) for _ in range(2)]
    x = torch.randn(2, 4)
    with pytest.raises(UserError, match="unknown ot_mode 'activation'"):
        fuse(models, method="ot", example_inputs=x, ot_mode="activation")
    with pytest.raises(UserError, match="ot_reg must be 0"):
        fuse(models, method="ot", example_inputs=x, ot_reg=-1.0)
    with pytest.raises(UserError, match="method 'nt' does not read them"):
        fuse(models, method="nt", example_inputs=x, ot_mode="activations")
    with pytest.raises(UserError, match="ot_mode 'activations' compares units' outputs"):
        fuse(models, method="ot", example_inputs=None, ot_mode="activations")
    with pytest.raises(UserError, match="fusion.methods has no ot"):
        load_config(None, ["fusion.ot_reg=0.1"])


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


def test_ntdist_fuse_takes_the_ot_modes_and_ntdist_run_uses_them(tmp_path, capsys):
    spec = ModelSpec("mlp", {"input_dim": 16, "width": 12, "depth": 2})
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_checkpoint(paths[-1], build_model("mlp", spec.kwargs), spec)
    calibration = str(tmp_path / "x.pt")
    torch.save(torch.randn(64, 16), calibration)
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "--method", "ot", "--ot-mode", "activations", "-o", out, *paths]) == 2
    assert "--calibration FILE" in capsys.readouterr().err
    assert main(["fuse", "--method", "ot", "--ot-mode", "activations", "--ot-reg", "0.01", "--calibration",
                 calibration, "-o", out, *paths]) == 0
    fused, _ = load_model(out)
    members = [load_model(p)[0] for p in paths]
    x = torch.load(calibration)
    expected = fuse(members, method="ot", example_inputs=x, ot_mode="activations", ot_reg=0.01)
    assert torch.allclose(fused(x), expected(x), atol=1e-5)
    run = tmp_path / "run"
    assert main(["run", "configs/quickstart.yaml", f"output.dir={run}", "train.epochs=2", "finetune.epochs=1",
                 "fusion.methods=[ot]", "fusion.ot_mode=activations", "fusion.schedule=flat"]) == 0
    assert read_results(str(run)).fusion["ot"].post_fusion > 0.3
