"""Windowed attention: tiny Swin v1/v2 members concatenate exactly and NT-fuse back to the original class.

Swin writes its attention as free functions kept whole by torch.fx
(`shifted_window_attention`, `_get_relative_position_bias`,
`_patch_merging_pad`); the analysis reads the parameters passed to them, with
heads as units: the relative position table (v1), the continuous position bias
MLP (v2) and v2's logit scale follow the heads. Inputs of 16x16 with 4x4 patches
give 4x4 tokens in windows of 2, so the second block of the first stage shifts
its windows. LayerNorm affine parameters, position tables and logit scales are
random (their defaults are ones, zeros and constants).

Run: .venv/bin/python -m pytest tests/unit/test_fusion_swin.py
"""

import pytest
import torch
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from ntdist.errors import UserError
from ntdist.fusion import Ensemble, analyze, concat, fuse


def _swin(v2=False):
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[2, 4], window_size=[2, 2],
                           num_classes=5, **extra)


FAMILIES = {"swin": (_swin, 16), "swin_v2": (lambda: _swin(v2=True), 16)}


def randomise(model):
    """Random LayerNorm affine parameters, position tables and logit scales."""
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
        if hasattr(mod, "num_heads"):
            assert fused.get_submodule(name).num_heads == mod.num_heads, name
    for name, t in reference.state_dict().items():
        assert fused.state_dict()[name].shape == t.shape, name
    with torch.no_grad():
        assert torch.isfinite(fresh.eval()(x)).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_heads_are_units_shared_by_qkv_proj_and_the_position_bias(family):
    models, x = members(family, 1)
    plan = analyze(models[0], x)
    attn = "features.1.0.attn"
    qkv, proj = plan.layers[f"{attn}.qkv"], plan.layers[f"{attn}.proj"]
    heads = proj.inp[0]
    assert (heads.factor, plan.sizes[heads.space]) == (4, 2)      # 2 heads of 4 features
    assert qkv.out == (heads,) * 3
    per_head = f"{attn}.cpb_mlp.2" if family == "swin_v2" else f"{attn}.relative_position_bias_table"
    assert [d.space for d in plan.layers[per_head].out] == [heads.space]


def test_fused_with_its_own_copy_keeps_member_0():
    # an importance that ranks member 0's units first: NT keeps exactly member 0's heads and channels
    models, x = members("swin_v2", 1)
    calls = [0]

    def member_0_first(view):
        calls[0] += 1
        return torch.full((view.size,), 2.0 if calls[0] % 2 else 1.0)

    copy = randomise(_swin(v2=True))
    copy.load_state_dict(models[0].state_dict())
    fused = fuse([models[0], copy], importance=member_0_first, example_inputs=x)
    with torch.no_grad():
        expected = 0.5 * models[0](x) + 0.5 * models[0].head.bias
        assert torch.allclose(fused(x), expected, atol=1e-5, rtol=1e-5)


def test_other_widths_are_refused_with_the_reason():
    models, x = members("swin", 2)
    with pytest.raises(UserError, match="as a constant"):
        fuse(models, example_inputs=x, keep_ratio=0.5)
