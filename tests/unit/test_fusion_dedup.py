"""NT with duplicate merging (`fuse(..., dedup=True)`, `fusion.dedup`).

Self-fusion (a member fused with exact copies of itself) returns the member's
function at every k from 2 to 8 on an MLP, a BatchNorm CNN and a residual net;
members with nothing above the threshold fuse exactly as plain NT; residual
merges that the complete signatures do not back are undone; bad settings are
one-line user errors. The same self-fusion checks hold for the overflows "merge"
and "match" and for the activation criterion; "match" of drifted aligned
replicas is their weight average, "merge" drops nothing.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_dedup.py
"""

import copy

import pytest
import torch
import torch.nn as nn

from helpers import QUICK, ntdist, randomise_bn
from ntdist.errors import UserError
from ntdist.fusion import FusionConfig, average, fuse, fuse_pair
from ntdist.models import build_model
from ntdist.records.results import read_results

CASES = {
    "mlp": ({"input_dim": 16, "width": 12, "depth": 3}, (16,)),
    "vgg11": ({"in_channels": 1, "image_size": 8, "width": 0.05, "num_classes": 4}, (1, 8, 8)),
    "resnet18": ({"in_channels": 1, "image_size": 8, "width": 2, "num_classes": 4}, (1, 8, 8)),
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny matrices: on a loaded machine two threads stall each other
    yield
    torch.set_num_threads(before)


def member(name, seed=0):
    torch.manual_seed(seed)
    kwargs, shape = CASES[name]
    return randomise_bn(build_model(name, kwargs)).eval(), torch.randn(6, *shape)


def near_copy(model):
    """A copy of `model` with every parameter moved by noise of scale 1e-3 (from torch's global RNG)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    return twin


def max_error(fused, model, x):
    with torch.no_grad():
        return (fused.eval()(x) - model(x)).abs().max().item()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("k", range(2, 9))
def test_self_fusion_with_dedup_returns_the_member(name, k):
    model, x = member(name)
    schedule = "recursive" if k in (4, 7) else "flat"
    merged = {}
    fused = fuse([copy.deepcopy(model) for _ in range(k)], schedule=schedule, example_inputs=x, dedup=True,
                 merged=merged)
    assert max_error(fused, model, x) <= 1e-5
    plain = fuse([copy.deepcopy(model) for _ in range(k)], schedule=schedule, example_inputs=x)
    assert max_error(plain, model, x) > 1e-3          # what dedup fixes: plain NT keeps copies
    assert {n: type(v) for n, v in fused.state_dict().items()} == {n: type(v) for n, v in model.state_dict().items()}
    build_model(name, CASES[name][0]).load_state_dict(fused.state_dict(), strict=True)
    assert sum(merged.values()) > 0


def test_merged_units_are_counted_per_layer():
    model, x = member("mlp")
    merged = {}
    fuse([copy.deepcopy(model) for _ in range(3)], schedule="flat", dedup=True, merged=merged)
    assert merged == {"net.1": 24, "net.3": 24, "net.5": 24}      # two copies of 12 units per hidden layer
    merged = {}
    fuse([copy.deepcopy(model) for _ in range(4)], schedule="recursive", dedup=True, merged=merged)
    assert merged == {"net.1": 36, "net.3": 36, "net.5": 36}      # 12 + 12 in round one, 12 in round two


@pytest.mark.parametrize("name", sorted(CASES))
def test_diverse_members_fuse_as_plain_nt(name):
    models = [member(name, seed)[0] for seed in range(3)]
    x = member(name)[1]
    merged = {}
    on = fuse(models, "nt", "flat", example_inputs=x, dedup=True, dedup_threshold=0.99, merged=merged)
    off = fuse(models, "nt", "flat", example_inputs=x)
    assert set(merged.values()) == {0}
    for (key, a), b in zip(on.state_dict().items(), off.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), key


def test_near_duplicates_are_merged_and_stay_close():
    model, x = member("mlp")
    twin = near_copy(model)
    merged = {}
    fused = fuse([model, twin], dedup=True, dedup_threshold=0.99, merged=merged)
    assert merged == {"net.1": 12, "net.3": 12, "net.5": 12}
    assert max_error(fused, model, x) < 0.02
    assert max_error(fuse([model, twin]), model, x) > 0.05


def test_a_kept_unit_takes_the_mean_incoming_weights_of_its_class():
    model, _ = member("mlp")
    twin = near_copy(model)
    fused = fuse([model, twin], weights=[3, 1], dedup=True)
    first = torch.cat([fused.net[1].weight, fused.net[1].bias[:, None]], 1)
    mean = [torch.cat([m.net[1].weight, m.net[1].bias[:, None]], 1) for m in (model, twin)]
    mean = 0.75 * mean[0] + 0.25 * mean[1]            # weighted by the members' output weights
    assert torch.cdist(first, mean).min(1).values.max() < 1e-6
    own = torch.cat([model.net[1].weight, model.net[1].bias[:, None]], 1)
    assert torch.cdist(first, own).min(1).values.min() > 1e-5      # not member 0's rows kept as they were


@pytest.mark.parametrize("k", [2, 3, 4])
def test_aligned_near_copies_fuse_to_their_average_in_member_0s_unit_order(k):
    """Replicas of periodic sync: every unit has its twins at the same index, so NT with dedup is weight
    averaging, unit for unit (what keeps the optimizer's momentum attached to the right units)."""
    model, _ = member("mlp")
    copies = [model]
    for i in range(1, k):
        torch.manual_seed(100 + i)
        copies.append(near_copy(model))
    fused, mean = fuse(copies, dedup=True).state_dict(), average(copies).state_dict()
    assert fused.keys() == mean.keys()
    for key in mean:
        torch.testing.assert_close(fused[key], mean[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_overflow_merge_keeps_self_fusion_exact_and_drops_nothing(name):
    model, x = member(name)
    fused = fuse([copy.deepcopy(model) for _ in range(3)], example_inputs=x, dedup=True, dedup_overflow="merge")
    assert max_error(fused, model, x) <= 1e-5
    models = [member(name, seed)[0] for seed in range(2)]
    dropped, merged = {}, {}
    fuse(models, example_inputs=x, dedup=True, dedup_threshold=0.99, merged=dropped)
    fused = fuse(models, example_inputs=x, dedup=True, dedup_threshold=0.99, dedup_overflow="merge", merged=merged)
    assert set(dropped.values()) == {0}
    if name == "mlp":       # nothing is a duplicate: every unit beyond the 12 slots is merged, none dropped
        assert merged == {"net.1": 12, "net.3": 12, "net.5": 12}
    else:                   # forced merges are not undone by the residual signature check
        assert min(merged.values()) > 0
    assert fused.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_overflow_match_keeps_self_fusion_exact(name, k):
    model, x = member(name)
    fused = fuse([copy.deepcopy(model) for _ in range(k)], schedule="recursive" if k == 4 else "flat",
                 example_inputs=x, dedup=True, dedup_overflow="match")
    assert max_error(fused, model, x) <= 1e-5


@pytest.mark.parametrize("k", [2, 4])
def test_overflow_match_of_aligned_replicas_is_their_average(k):
    """Replicas that drifted apart (below the threshold) are still joined unit for unit: weight averaging."""
    model, _ = member("mlp")
    copies = [model]
    for i in range(1, k):
        torch.manual_seed(100 + i)
        copies.append(copy.deepcopy(model))
        with torch.no_grad():
            for p in copies[-1].parameters():
                p.add_(torch.randn_like(p) * 0.05)
    fused = fuse(copies, schedule="flat", dedup=True, dedup_threshold=0.999, dedup_overflow="match").state_dict()
    mean = average(copies).state_dict()
    for key in mean:
        torch.testing.assert_close(fused[key], mean[key], rtol=0, atol=1e-6)
    drop = fuse(copies, schedule="flat", dedup=True, dedup_threshold=0.999).state_dict()
    assert max((drop[key] - mean[key]).abs().max().item() for key in mean) > 0.01


def test_overflow_merge_adds_outgoing_weights_and_averages_incoming():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)), nn.Sequential(nn.Linear(3, 2), nn.ReLU(),
                                                                                      nn.Linear(2, 2))
    fused = fuse([a, b], dedup=True, dedup_threshold=0.999, dedup_overflow="merge")
    rows = lambda m: torch.cat([m[0].weight, m[0].bias[:, None]], 1)
    units = torch.cat([rows(a), rows(b)])
    # the 2 fused units are the means of 2 classes that share all 4 units out between them
    subsets = [[i for i in range(4) if mask >> i & 1] for mask in range(1, 16)]
    found = [next(s for s in subsets if torch.allclose(units[s].mean(0), row, atol=1e-6)) for row in rows(fused)]
    assert sorted(found[0] + found[1]) == [0, 1, 2, 3]
    total = (a[2].weight.sum() + b[2].weight.sum()) / 2      # outgoing weights added, none lost
    torch.testing.assert_close(fused[2].weight.sum(), total)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_activation_criterion_keeps_self_fusion_exact(name, k):
    model, x = member(name)
    batch = torch.randn(32, *x.shape[1:])
    merged = {}
    fused = fuse([copy.deepcopy(model) for _ in range(k)], schedule="recursive" if k == 4 else "flat",
                 example_inputs=batch, dedup=True, dedup_criterion="activations", merged=merged)
    assert max_error(fused, model, x) <= 1e-5
    assert sum(merged.values()) > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_activation_criterion_merges_nothing_between_diverse_members(name):
    models = [member(name, seed)[0] for seed in range(2)]
    batch = torch.randn(32, *member(name)[1].shape[1:])
    merged = {}
    on = fuse(models, example_inputs=batch, dedup=True, dedup_threshold=0.999, dedup_criterion="activations",
              merged=merged)
    off = fuse(models, example_inputs=batch)
    assert set(merged.values()) == {0}
    for (key, a), b in zip(on.state_dict().items(), off.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), key


def test_activation_criterion_merges_a_unit_that_computes_the_same_with_other_weights():
    """Units fed by a dead input (always zero after ReLU) compute the same whatever weight they give it:
    the activations see twins that the weights miss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0          # unit 0 of the first layer never fires
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[2].weight[:, 0] = torch.randn(3) * 5    # its outgoing weights read a zero: no effect
    x = torch.randn(64, 4)
    by_weights, by_outputs = {}, {}
    fuse([model, twin], example_inputs=x, dedup=True, dedup_threshold=0.99, merged=by_weights)
    fused = fuse([model, twin], example_inputs=x, dedup=True, dedup_threshold=0.99,
                 dedup_criterion="activations", merged=by_outputs)
    assert by_weights["2"] < 3 and by_outputs == {"0": 3, "2": 3}
    assert max_error(fused, model, x) <= 1e-5


def test_residual_merge_without_matching_block_rows_is_undone():
    model, x = member("resnet18")
    twin = copy.deepcopy(model)
    with torch.no_grad():       # the stem and BN agree, but the first block writes differently into the stream
        twin.layer1[0].conv2.weight.copy_(torch.randn_like(twin.layer1[0].conv2.weight))
    merged = {}
    fused = fuse_pair(model, twin, dedup=True, merged=merged)
    assert merged["conv1"] == 0 and merged["layer1.0.conv1"] == 0
    assert merged["layer4.0.conv1"] == 0
    assert max_error(fused, model, x) > 1e-3


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2, self.fc3 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.norm(self.fc1(x)))))


def test_spaces_with_a_layer_norm_use_plain_nt():
    torch.manual_seed(0)
    model, x = WithNorm(), torch.randn(4, 6)
    merged = {}
    fused = fuse([copy.deepcopy(model), copy.deepcopy(model)], dedup=True, merged=merged)
    assert merged == {"fc2": 0}    # fc1's space is normalised across units: plain NT, so fc2's copies read
    #                                different units of it and are not provably duplicates
    assert fused.fc1.out_features == 8 and fused.norm.normalized_shape == (8,)
    with torch.no_grad():
        assert fused(x).shape == (4, 3) and torch.isfinite(fused(x)).all()


def test_bad_settings_are_user_errors():
    models = [member("mlp", s)[0] for s in range(2)]
    for threshold in (0, 1, 1.5, -0.2, True, "high"):
        with pytest.raises(UserError, match="dedup_threshold must be a cosine similarity in"):
            fuse(models, dedup=True, dedup_threshold=threshold)
    with pytest.raises(UserError, match="needs order merge_prune"):
        fuse(models, dedup=True, order="prune_merge")
    with pytest.raises(UserError, match="dedup must be true or false"):
        fuse(models, dedup="yes")
    with pytest.raises(UserError, match="unknown dedup_overflow 'keep'"):
        fuse(models, dedup=True, dedup_overflow="keep")
    with pytest.raises(UserError, match="unknown fusion.dedup_overflow"):
        FusionConfig(dedup=True, dedup_overflow="all")
    with pytest.raises(UserError, match="unknown dedup_criterion 'outputs'"):
        fuse(models, dedup=True, dedup_criterion="outputs")
    with pytest.raises(UserError, match="compares units' outputs on example inputs"):
        fuse(models, dedup=True, dedup_criterion="activations")
    with pytest.raises(UserError, match="unknown fusion.dedup_criterion"):
        FusionConfig(dedup=True, dedup_criterion="output")
    with pytest.raises(UserError, match="fusion.dedup_samples must be at least 2"):
        FusionConfig(dedup=True, dedup_samples=1)
    assert FusionConfig(dedup=True, dedup_criterion="activations").example_count() == 256
    assert FusionConfig(dedup=True).example_count() == FusionConfig().example_count() == 2
    with pytest.raises(UserError, match="fusion.dedup_criterion only applies with fusion.dedup on"):
        FusionConfig(dedup_criterion="activations")
    with pytest.raises(UserError, match="dedup_threshold only applies with dedup on"):
        fuse(models, dedup_threshold=0.95)
    with pytest.raises(UserError, match="fusion.dedup_threshold must be a cosine similarity in"):
        FusionConfig(dedup=True, dedup_threshold=1.0)
    with pytest.raises(UserError, match="needs fusion.order merge_prune"):
        FusionConfig(dedup=True, order="prune_merge")
    assert FusionConfig(dedup=True).dedup_threshold == 0.9


def test_a_run_with_dedup_records_merges_per_layer(tmp_path):
    out = tmp_path / "run"
    proc = ntdist("run", *QUICK, "train.epochs=1", "finetune.epochs=1", "fusion.methods=[nt,avg]", "fusion.k=3",
                  "fusion.dedup=on", "fusion.dedup_threshold=0.5", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = read_results(str(out))
    merged = results.fusion["nt"].merged
    assert list(merged) == ["net.1", "net.3"] and all(0 <= n <= 64 for n in merged.values())
    assert sum(merged.values()) > 0 and results.fusion["avg"].merged is None
    assert "NT dedup merged units per layer" in (out / "report.md").read_text()
    bad = ntdist("run", *QUICK, "fusion.dedup=on", "fusion.order=prune_merge", f"output.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "fusion.dedup needs fusion.order merge_prune" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
