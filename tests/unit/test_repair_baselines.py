"""The repair after averaging and OT: `fuse(models, method="avg"|"ot", repair="lstsq", calibration=x)`.

Run: .venv/bin/python -m pytest tests/unit/test_repair_baselines.py
"""

import pytest
import torch

from helpers import randomise_bn
from test_fusion_ot import permuted_copy
from ntdist.cli import main
from ntdist.config import load_config
from ntdist.data import DataConfig, load_splits
from ntdist.distributed.costs import fusion_kind
from ntdist.errors import UserError
from ntdist.fusion import Ensemble, analyze, average, fuse
from ntdist.fusion.repair import repair
from ntdist.models import build_model
from ntdist.records.checkpoint import load_model
from ntdist.records.rundir import RunDir

NETS = {"mlp": ({"input_dim": 12, "num_classes": 5, "width": 16, "depth": 2}, (12,)),
        "cnn1d": ({"in_channels": 1, "length": 16, "num_classes": 5, "channels": 6}, (1, 16)),
        "vgg11": ({"in_channels": 1, "image_size": 8, "num_classes": 5, "width": 0.125, "batch_norm": True},
                  (1, 8, 8))}


def _members(name, k=2, seed=40):
    kwargs, _ = NETS[name]
    out = []
    for i in range(k):
        torch.manual_seed(seed + i)
        out.append(randomise_bn(build_model(name, kwargs)).eval())
    return out


def _inputs(name, n, seed):
    return torch.randn(n, *NETS[name][1], generator=torch.Generator().manual_seed(seed))


def _error(model, reference, x):
    with torch.no_grad():
        return (model.eval()(x) - reference(x)).pow(2).mean().item()


@pytest.mark.parametrize("name", ["mlp", "vgg11"])
def test_averaging_two_identical_models_then_repairing_gives_the_member(name):
    member = _members(name, 1)[0]
    x, held_out = _inputs(name, 300, 1), _inputs(name, 50, 2)
    plan = analyze(member, x[:2])
    averaged = average([member, member])
    fused = repair([member, member], plan, [0.5, 0.5], None, averaged, x)     # keep None: averaged targets
    assert fused is averaged
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(held_out), member(held_out), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "vgg11"])
@pytest.mark.parametrize("method", ["avg", "ot"])
def test_repaired_average_is_closer_to_the_ensemble_on_held_out_inputs(name, method):
    models = _members(name, 2)
    x, held_out = _inputs(name, 600, 1), _inputs(name, 300, 2)
    ensemble = Ensemble(models)
    plain = fuse(models, method=method, example_inputs=x[:2])
    repaired = fuse(models, method=method, repair="lstsq", calibration=x, example_inputs=x[:2])
    assert type(repaired) is type(models[0])
    assert {k: v.shape for k, v in repaired.state_dict().items()} == \
        {k: v.shape for k, v in models[0].state_dict().items()}
    assert _error(repaired, ensemble, held_out) < 0.5 * _error(plain, ensemble, held_out)


@pytest.mark.parametrize("name", ["mlp", "vgg11"])
@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_ot_of_a_permuted_copy_stays_exact_after_repair(name, mode):
    from ntdist.fusion.ot import aligned_members

    torch.manual_seed(3)
    model = _members(name, 1)[0]
    x = _inputs(name, 300, 1)
    twin = permuted_copy(model, x[:2]).eval()
    plan = analyze(model, x[:2])
    aligned = aligned_members([model, twin], plan, mode, example_inputs=x[:64])
    fused = repair(aligned, plan, [0.5, 0.5], None, average(aligned), x)
    held_out = _inputs(name, 50, 2)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(held_out), model(held_out), rtol=0, atol=1e-5)


def test_pairwise_schedules_repair_every_step():
    models = _members("mlp", 3)
    x, held_out = _inputs("mlp", 600, 1), _inputs("mlp", 300, 2)
    for schedule in ("iterative", "recursive"):
        plain = fuse(models, method="avg", schedule=schedule)
        repaired = fuse(models, method="avg", schedule=schedule, repair="lstsq", calibration=x)
        assert _error(repaired, Ensemble(models), held_out) < 0.7 * _error(plain, Ensemble(models), held_out)


def test_repair_options_for_avg_and_ot():
    models = _members("mlp", 2)
    x = _inputs("mlp", 100, 1)
    for method in ("avg", "ot"):
        with pytest.raises(UserError, match="repair lstsq needs calibration inputs"):
            fuse(models, method=method, repair="lstsq")
        # auto leaves averaging and OT as they are, calibration inputs or not
        plain, auto = fuse(models, method=method), fuse(models, method=method, calibration=x)
        for key, value in plain.state_dict().items():
            assert torch.equal(auto.state_dict()[key], value), key
        ridged = fuse(models, method=method, repair="lstsq", repair_ridge=0.5, calibration=x)
        default = fuse(models, method=method, repair="lstsq", calibration=x)
        assert not torch.equal(ridged.state_dict()["net.3.weight"], default.state_dict()["net.3.weight"])
    # the config takes repair lstsq for avg and ot; their ridge only with it (auto repairs NT only)
    fusion = load_config(None, ["fusion.methods=[avg,ot]", "fusion.repair=lstsq", "fusion.repair_ridge=0.01"]).fusion
    assert fusion.gathers("avg") and fusion.gathers("ot") and not fusion.gathers("nt")
    assert fusion_kind("avg", "flat", fusion.gathers("avg")) == "gather" and fusion_kind("avg", "flat") == "average"
    assert not load_config(None, ["fusion.methods=[avg]"]).fusion.gathers("avg")
    with pytest.raises(UserError, match="repair_ridge applies to avg only with fusion.repair lstsq") as err:
        load_config(None, ["fusion.methods=[avg]", "fusion.repair_ridge=0.01"])
    assert len(str(err.value).splitlines()) == 1


def test_ntdist_run_and_fuse_repair_avg_and_ot_with_repair_lstsq(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "configs/quickstart.yaml", f"output.dir={run}", "train.epochs=1", "finetune.epochs=0",
                 "finetune.control=false", "data.train_fraction=0.3", "fusion.calibration_samples=300",
                 "fusion.methods=[avg,ot]", "fusion.repair=lstsq"]) == 0
    rundir = RunDir(str(run), writer=False)
    members = [load_model(rundir.member_checkpoint(i))[0].eval() for i in range(2)]
    x = torch.stack([torch.as_tensor(x) for x, _ in load_splits(DataConfig()).test])
    ensemble = Ensemble(members)
    for method in ("avg", "ot"):
        repaired = load_model(rundir.finetuned_checkpoint(method))[0]      # fine-tuned for 0 epochs: as fused
        assert _error(repaired, ensemble, x) < 0.5 * _error(fuse(members, method=method), ensemble, x)
    torch.save(x, tmp_path / "x.pt")
    out = str(tmp_path / "fused.safetensors")
    paths = [rundir.member_checkpoint(i) for i in range(2)]
    assert main(["fuse", "--method", "avg", "--calibration", str(tmp_path / "x.pt"), "fusion.repair=lstsq",
                 "-o", out, *paths]) == 0
    assert f"repaired on {len(x)} inputs" in capsys.readouterr().out
    expected = fuse(members, method="avg", repair="lstsq", calibration=x)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)[0](x), expected(x), rtol=0, atol=1e-5)
