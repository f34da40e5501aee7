"""Windowed attention: tiny Swin v1/v2 and MaxViT members concatenate exactly and NT-fuse to the original class.

Swin writes its attention as free functions kept whole by torch.fx
(`shifted_window_attention`, `_get_relative_position_bias`,
`_patch_merging_pad`); the analysis reads the parameters passed to them, with
heads as units: the relative position table (v1), the continuous position bias
MLP (v2) and v2's logit scale follow the heads. Inputs of 16x16 with 4x4 patches
give 4x4 tokens in windows of 2, so the second block of the first stage shifts
its windows. MaxViT's attention module is traced whole (heads as units, the
head count set on the module); its window and grid partitions are reshapes and
permutes of channels-last tokens, its MBConv blocks convolutions with BatchNorm
and squeeze-excitation. LayerNorm and BatchNorm affine parameters, BatchNorm
statistics, position tables and logit scales are random (their defaults are
ones, zeros and constants).

Run: .venv/bin/python -m pytest tests/unit/test_fusion_swin.py
"""

import copy

import pytest
import torch
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from helpers import randomise_bn
from ntdist.errors import UserError
from ntdist.fusion import Ensemble, analyze, concat, fuse


def _swin(v2=False):
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[2, 4], window_size=[2, 2],
                           num_classes=5, **extra)


def _maxvit():
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1],
                  head_dim=4, stochastic_depth_prob=0.1, num_classes=5)


FAMILIES = {"swin": (_swin, 16), "swin_v2": (lambda: _swin(v2=True), 16), "maxvit": (_maxvit, 32)}


def randomise(model):
    """Random LayerNorm and BatchNorm parameters, BatchNorm statistics, position tables and logit scales."""
    randomise_bn(model)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_()
                mod.bias.normal_()
        for name, p in model.named_parameters():
            if name.endswith(("relative_position_bias_table", "logit_scale")):
                p.normal_(0.0, 0.5)
    return model.eval()


def members(family, k, seed=0):
    build, size = FAMILIES[family]
    torch.manual_seed(seed)
    return [randomise(build()) for _ in range(k)], torch.randn(2, 3, size, size)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_concat_is_exact(family, k):
    models, x = members(family, k, seed=k)
    wide = concat(models, example_inputs=x)
    with torch.no_grad():
        ref, out = Ensemble(models)(x), wide(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nt_returns_the_original_architecture(family):
    models, x = members(family, 2, seed=7)
    fused = fuse(models, example_inputs=x)
    fresh = FAMILIES[family][0]()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    reference = models[0]
    for name, mod in reference.named_modules():
        for heads in ("num_heads", "n_heads"):
            if hasattr(mod, heads):
                assert getattr(fused.get_submodule(name), heads) == getattr(mod, heads), name
    for name, t in reference.state_dict().items():
        assert fused.state_dict()[name].shape == t.shape, name
    with torch.no_grad():
        assert torch.isfinite(fresh.eval()(x)).all()


ATTENTION = {   # family: the first attention's query-key-value layer, output layer, per-head tensor, heads
    "swin": ("features.1.0.attn.qkv", "features.1.0.attn.proj", "features.1.0.attn.relative_position_bias_table", 2),
    "swin_v2": ("features.1.0.attn.qkv", "features.1.0.attn.proj", "features.1.0.attn.cpb_mlp.2", 2),
    "maxvit": ("blocks.0.layers.0.layers.window_attention.attn_layer.1.to_qkv",
               "blocks.0.layers.0.layers.window_attention.attn_layer.1.merge",
               "blocks.0.layers.0.layers.window_attention.attn_layer.1.relative_position_bias_table", 2),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_heads_are_units_shared_by_qkv_output_and_the_position_bias(family):
    models, x = members(family, 1)
    plan = analyze(models[0], x)
    qkv, out, per_head, count = ATTENTION[family]
    heads = plan.layers[out].inp[0]
    assert (heads.factor, plan.sizes[heads.space]) == (4, count)      # heads of 4 features
    assert plan.layers[qkv].out == (heads,) * 3
    assert [d.space for d in plan.layers[per_head].out] == [heads.space]


def test_maxvit_concatenation_has_k_times_the_heads():
    models, x = members("maxvit", 3)
    wide = concat(models, example_inputs=x)
    attention = [m for m in wide.modules() if type(m).__name__ == "RelativePositionalMultiHeadAttention"]
    assert [m.n_heads for m in attention] == [6, 6, 12, 12]       # 8 and 16 channels, heads of 4 features
    assert tuple(attention[0].relative_position_bias_table.shape) == (9, 6)


@pytest.mark.parametrize("family", ["swin_v2", "maxvit"])
def test_fused_with_its_own_copy_keeps_member_0(family):
    # an importance that ranks member 0's units first: NT keeps exactly member 0's heads and channels
    models, x = members(family, 1)
    calls = [0]

    def member_0_first(view):
        calls[0] += 1
        return torch.full((view.size,), 2.0 if calls[0] % 2 else 1.0)

    fused = fuse([models[0], copy.deepcopy(models[0])], importance=member_0_first, example_inputs=x)
    output = [m for m in models[0].modules() if isinstance(m, torch.nn.Linear)][-1]
    bias = 0.0 if output.bias is None else output.bias
    with torch.no_grad():
        expected = 0.5 * models[0](x) + 0.5 * bias
        assert torch.allclose(fused(x), expected, atol=1e-5, rtol=1e-5)


def test_other_widths_are_refused_with_the_reason():
    models, x = members("swin", 2)
    with pytest.raises(UserError, match="as a constant"):
        fuse(models, example_inputs=x, keep_ratio=0.5)


def test_maxvit_prunes_whole_heads_at_other_widths_and_refuses_widths_that_split_them():
    models, x = members("maxvit", 2)
    half = fuse(models, example_inputs=x, keep_ratio=0.5)
    attention = [m for m in half.modules() if type(m).__name__ == "RelativePositionalMultiHeadAttention"]
    assert [m.n_heads for m in attention] == [1, 1, 2, 2]
    assert tuple(attention[2].to_qkv.weight.shape) == (24, 8)
    with torch.no_grad():
        assert torch.isfinite(half(x)).all()
    with pytest.raises(UserError, match="heads of 4 features"):
        fuse(models, example_inputs=x, keep_ratio=0.75)     # 6 stream channels, but 2 heads of 4 features
