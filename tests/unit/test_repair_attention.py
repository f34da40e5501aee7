"""Repair of `nn.MultiheadAttention` (`ntdist/fusion/repair/attention.py`): the kept heads' q/k/v projections and
`out_proj` refitted to the concatenated model; exact where the dropped heads duplicate kept ones; attention it
cannot reproduce (masks, cross-attention) left as pruned with the reason.

Run: .venv/bin/python -m pytest tests/unit/test_repair_attention.py
"""

import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models import VisionTransformer
from userpkg.attention import Block

from ntdist.fusion import concat
from ntdist.fusion.analysis.graph import analyze
from ntdist.fusion.pruning.select import select, targets
from ntdist.fusion.repair import refit, repair
from ntdist.fusion.wide.assemble import assemble, tensors_of


def tiny_vit() -> nn.Module:
    """Two encoder layers of two heads on 8x8 images (patches of 4); the classifier drawn, not zero."""
    model = VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=3)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def nt(models, x):
    """(plan, weights, keep) of NT at the members' width."""
    plan = analyze(models[0], x[:2])
    w = [0.5, 0.5]
    return plan, w, select(models, plan, "group_l2", targets(plan, plan.space_sizes(tensors_of(models[0])), 1.0), w)


def error(model, wide, x):
    with torch.no_grad():
        return float((model(x) - wide(x)).pow(2).mean())


def test_refitted_attention_brings_the_output_closer_than_repair_without_it(monkeypatch):
    x = torch.randn(300, 5, 6, generator=torch.Generator().manual_seed(0))
    cal, held = x[:200], x[200:]
    totals = {"nt": 0.0, "repair": 0.0, "without": 0.0}
    for seed in range(3):
        torch.manual_seed(seed)
        models = [Block().eval() for _ in range(2)]
        plan, w, keep = nt(models, x)
        wide = concat(models, example_inputs=x[:2]).eval()
        totals["nt"] += error(assemble(models, plan, w, keep), wide, held)
        notes = []
        with torch.no_grad():
            repaired = repair(models, plan, w, keep, assemble(models, plan, w, keep), cal, notes=notes)
        assert notes == []
        totals["repair"] += error(repaired, wide, held)
        with monkeypatch.context() as patch:           # the attention left as NT pruned it, the rest refitted
            patch.setattr(refit._Fit, "refit_attention", lambda fit, name, goals=None: None)
            with torch.no_grad():
                without = repair(models, plan, w, keep, assemble(models, plan, w, keep), cal)
        totals["without"] += error(without, wide, held)
    assert totals["repair"] < 0.9 * totals["without"] and totals["without"] < totals["nt"], totals


def mixed_keep(plan):
    """Every space keeps member 0's even units and member 1's odd ones: with identical members, each unit once."""
    keep = {}
    for space in plan.order:
        n = plan.sizes[space]
        units = torch.arange(n)
        keep[space] = torch.sort(torch.cat([units[units % 2 == 0], n + units[units % 2 == 1]])).values
    return keep


@pytest.mark.parametrize("make,shape", [(tiny_vit, (3, 8, 8)), (lambda: Block(batch_first=False).eval(), (5, 6))],
                         ids=["vit", "sequence_first"])
def test_a_model_fused_with_its_own_copy_repairs_exactly(make, shape):
    torch.manual_seed(0)
    a = make()
    models = [a, copy.deepcopy(a)]
    x = torch.randn(300, *shape)
    plan = analyze(a, x[:2])
    keep = mixed_keep(plan)
    pruned = assemble(models, plan, [0.5, 0.5], keep)
    assert any(plan.layers[n].kind == "mha" for n in plan.layers)
    with torch.no_grad():
        wide = concat(models, example_inputs=x[:2]).eval()(x[200:])
        assert (pruned(x[200:]) - wide).abs().max() > 1e-2        # kept heads miss the other member's channels
        notes = []
        repaired = repair(models, plan, [0.5, 0.5], keep, pruned, x[:200], ridge=0.0, notes=notes)
        assert notes == []
        assert (repaired(x[200:]) - wide).abs().max() < 1e-5


@pytest.mark.parametrize("mode,reason", [
    ("masked", "called with attn_mask (only attention without masks is)"),
    ("cross", "its key or value is not its query (only self-attention is)")])
def test_attention_it_does_not_reproduce_is_left_as_pruned_with_the_reason(mode, reason):
    torch.manual_seed(0)
    models = [Block(mode).eval() for _ in range(2)]
    x = torch.randn(120, 5, 6)
    plan, w, keep = nt(models, x)
    pruned = assemble(models, plan, w, keep)
    before = {n: t.clone() for n, t in pruned.attn.state_dict().items()}
    notes = []
    with torch.no_grad():
        repaired = repair(models, plan, w, keep, pruned, x, notes=notes)
    assert notes == [f"repair: 'attn' left as pruned: mha layer (MultiheadAttention) is not refitted: {reason}"]
    assert all(torch.equal(t, before[n]) for n, t in repaired.attn.state_dict().items())
    assert not torch.equal(repaired.head.weight, assemble(models, plan, w, keep).head.weight)   # the rest is


def test_the_second_fit_reads_the_same_rows_from_a_wave_kept_from_the_first_or_read_again(monkeypatch):
    torch.manual_seed(0)
    models = [Block().eval() for _ in range(2)]
    x = torch.randn(300, 5, 6)
    plan, w, keep = nt(models, x)
    reads, read = [], refit.reach_call
    monkeypatch.setattr(refit, "reach_call", lambda model, name, batch: reads.append(name) or read(model, name, batch))
    with torch.no_grad():
        waved = repair(models, plan, w, keep, assemble(models, plan, w, keep), x, batch_size=128)
        assert reads.count("attn") == 3                  # the members are read in the wave: three batches x pruned
        # 8 features x 5 tokens x 4 bytes = 160 per input: its wave share (5 x 160 x 300) exceeds the budget, so it is
        # fitted alone, and its query and out_proj target (2 x 160 x 128 per batch, 3 batches) are kept
        monkeypatch.setattr(refit, "TARGET_BYTES", 150_000)
        kept = repair(models, plan, w, keep, assemble(models, plan, w, keep), x, batch_size=128)
        assert reads.count("attn") == 3 + 3 * 3          # one pass: three batches x (pruned model + 2 members)
        monkeypatch.setattr(refit, "TARGET_BYTES", 0)     # nothing kept: the second fit reads them again
        again = repair(models, plan, w, keep, assemble(models, plan, w, keep), x, batch_size=128)
    assert reads.count("attn") == 3 + 3 * 3 + 2 * 3 * 3
    assert not torch.equal(kept.attn.in_proj_weight, assemble(models, plan, w, keep).attn.in_proj_weight)
    for key, value in kept.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
        assert torch.equal(waved.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["avg", "ot"])
def test_after_averaging_and_ot_the_attention_is_refitted_towards_the_ensemble(method):
    """keep None: the attention's q/k/v target the members' averaged projections; the repaired model is closer to
    the ensemble's output than the unrepaired average or OT, and no layer is left as pruned."""
    from ntdist.fusion import fuse
    x = torch.randn(300, 5, 6, generator=torch.Generator().manual_seed(1))
    cal, held = x[:200], x[200:]
    torch.manual_seed(3)
    models = [Block().eval() for _ in range(2)]
    with torch.no_grad():
        ensemble = (models[0](held) + models[1](held)) / 2
        plain = fuse(models, method=method, example_inputs=x[:2]).eval()
        notes = []
        repaired = fuse(models, method=method, example_inputs=x[:2], repair="lstsq", calibration=cal,
                        notes=notes).eval()
        before, after = (float((m(held) - ensemble).pow(2).mean()) for m in (plain, repaired))
    assert notes == []
    assert after < 0.5 * before, (before, after)


def repaired_in_waves(monkeypatch, models, fused, keep, x, budget):
    """(repaired copy of `fused`, the waves the refit cut, the bytes per input it cut them by, the forwards of the
    members it ran) with `TARGET_BYTES` = budget."""
    plan, cutter, cut, forwards = analyze(models[0], x[:2]), refit.waves, [], []
    monkeypatch.setattr(refit, "TARGET_BYTES", budget)
    monkeypatch.setattr(refit, "waves", lambda *a: cut.append(a[1]) or cut.append(cutter(*a)) or cut[-1])
    handles = [m.register_forward_pre_hook(lambda *_: forwards.append(1)) for m in models]
    try:
        with torch.no_grad():
            repaired = repair(models, plan, [0.5, 0.5], keep, copy.deepcopy(fused), x, batch_size=100)
    finally:
        for handle in handles:
            handle.remove()
    return repaired, cut[1], cut[0], len(forwards)


@pytest.mark.parametrize("blocks,method", [(1, "nt"), (2, "nt"), (2, "avg")])
def test_attention_read_in_waves_refits_the_weights_of_the_per_module_path_in_fewer_member_forwards(
        monkeypatch, blocks, method):
    """Three encoder blocks, two batches: with a budget of `blocks` blocks' targets, each wave reads the members
    once per batch for that many attention modules and their MLPs, and every weight equals the one fitted with
    nothing stored (each attention module reading its members in passes of its own)."""
    torch.manual_seed(0)
    models = [VisionTransformer(image_size=8, patch_size=4, num_layers=3, num_heads=2, hidden_dim=8, mlp_dim=16,
                                num_classes=3).eval() for _ in range(2)]
    x = torch.randn(200, 3, 8, 8)
    if method == "nt":
        plan, _, keep = nt(models, x)
        fused = assemble(models, plan, [0.5, 0.5], keep)
    else:
        from ntdist.fusion.baselines import average
        plan, keep, fused = analyze(models[0], x[:2]), None, average(models)
    attention = [n for n in plan.layers if plan.layers[n].kind == "mha"]
    alone, one_by_one, _, per_module = repaired_in_waves(monkeypatch, models, fused, keep, x, 0)
    assert len(one_by_one) == 3 * 3 + 1 and all(len(wave) == 1 for wave in one_by_one)   # 3 x (attention, MLP)
    _, whole, sizes, once = repaired_in_waves(monkeypatch, models, fused, keep, x, 2 ** 40)
    assert len(whole) == 1 and once == 2 * 2        # unbounded: one pass of each member per batch for the model
    block = max(sum(sizes[n] for n in whole[0] if n.startswith(a.rsplit(".", 1)[0] + ".")) for a in attention)
    repaired, cut, _, forwards = repaired_in_waves(monkeypatch, models, fused, keep, x, blocks * block * len(x))
    assert [sum(n in attention for n in wave) for wave in cut] == {1: [1, 1, 1, 0], 2: [2, 1]}[blocks]
    assert forwards == 2 * 2 * len(cut) < per_module / 3      # each wave: two batches x two members
    assert not torch.equal(repaired.encoder.layers[1].self_attention.in_proj_weight,
                           fused.encoder.layers[1].self_attention.in_proj_weight)
    for key, value in alone.state_dict().items():
        assert torch.equal(repaired.state_dict()[key], value), key
