"""One small member of every torchvision family the channel analysis covers: concat exact, NT to the original shapes.

Channel concatenation (DenseNet, GoogLeNet, Inception v3), channel shuffles
followed channel by channel (ShuffleNet v2), grouped convolutions
pruned by whole groups (ResNeXt, RegNet), attention heads as units with a class
token, position embedding and LayerNorms (ViT), stochastic depth and squeeze-excitation
(EfficientNet v1 and v2 blocks), channels-last blocks with LayerNorm and layer
scale (ConvNeXt, whose concatenation normalises each member's block on its own), and SqueezeNet, whose ReLU after the output
layer makes concatenation impossible but not NT; depthwise convolutions with
hardswish and squeeze-excitation (MobileNet v2 and v3, MNASNet). Members are narrow where the
builder allows it, inputs small, BatchNorm statistics random. VGG11 and torchvision's
ResNet-18 are in `test_fusion_concat.py`, Swin and MaxViT in `test_fusion_swin.py`; AlexNet and
Wide ResNet have no narrow builder and are measured at full size by `benchmarks/zoo.py`.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_zoo.py
"""

import copy
import itertools
from functools import partial

import pytest
import torch
from torchvision.models import (MNASNet, ConvNeXt, DenseNet, EfficientNet, GoogLeNet, Inception3, MobileNetV2,  # noqa: I001
                                RegNet, ResNet, ShuffleNetV2, SqueezeNet, VisionTransformer, mobilenet_v3_small)
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import FusedMBConvConfig, MBConvConfig
from torchvision.models.regnet import BlockParams
from torchvision.models.resnet import Bottleneck

from helpers import randomise_bn
from ntdist.errors import UserError
from ntdist.fusion import Ensemble, concat, fuse


def _efficientnet():
    blocks = [FusedMBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 12, 2),
              MBConvConfig(6, 5, 2, 12, 16, 1)]
    return EfficientNet(blocks, dropout=0.2, stochastic_depth_prob=0.2, num_classes=5, last_channel=24)


def _regnet():
    params = BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=4, se_ratio=0.25)
    return RegNet(params, num_classes=5, stem_width=8)


def _convnext():
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.1, num_classes=5)


def _perturb(model):
    """Random LayerNorm affine parameters and layer scales (their defaults are ones, zeros and 1e-6)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_()
                mod.bias.normal_()
        for name, p in model.named_parameters():
            if name.endswith(("layer_scale", "class_token")):
                p.normal_()
    return model


FAMILIES = {
    "convnext": (_convnext, 32),
    "densenet": (partial(DenseNet, growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8,
                         bn_size=2, num_classes=5), 32),
    "googlenet": (partial(GoogLeNet, num_classes=5, aux_logits=False, init_weights=False), 32),
    "inception_v3": (partial(Inception3, num_classes=5, aux_logits=False, init_weights=False), 75),
    "resnext": (partial(ResNet, Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4,
                        num_classes=5), 32),
    "regnet": (_regnet, 32),
    "mobilenet_v2": (partial(MobileNetV2, num_classes=5, width_mult=0.25), 32),
    "mobilenet_v3": (partial(mobilenet_v3_small, num_classes=5, width_mult=0.25), 32),   # hardswish, squeeze-excitation
    "mnasnet": (partial(MNASNet, 0.25, num_classes=5), 32),
    "efficientnet": (_efficientnet, 32),
    # odd branch widths (6, 10, 14): the chunks after each shuffle split the routed channels unevenly
    "shufflenet": (partial(ShuffleNetV2, [2, 3, 2], [8, 12, 20, 28, 16], num_classes=5), 32),
    "vit": (partial(VisionTransformer, image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                    mlp_dim=32, num_classes=5), 16),
}


def members(family, k, seed=0):
    build, size = FAMILIES[family]
    torch.manual_seed(seed)
    return [_perturb(randomise_bn(build())).eval() for _ in range(k)], torch.randn(2, 3, size, size)


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
    for name, mod in fresh.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            assert fused.get_submodule(name).groups == mod.groups, name
    with torch.no_grad():
        assert torch.isfinite(fresh.eval()(x)).all()


def test_dense_block_keeps_every_part_of_its_concatenation_in_place():
    models, x = members("densenet", 2)
    fused = fuse(models, example_inputs=x)
    layer = fused.features.denseblock1.denselayer2
    # conv1 reads cat([stem (8), denselayer1 (4)]): each part pruned on its own, so both keep their widths
    assert tuple(layer.norm1.weight.shape) == (12,) and tuple(layer.conv1.weight.shape) == (8, 12, 1, 1)


def test_squeezenet_refuses_concat_with_the_reason_and_still_fuses():
    torch.manual_seed(0)
    models = [randomise_bn(SqueezeNet("1_1", num_classes=5)).eval() for _ in range(2)]
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(UserError, match=r"'classifier\.2'.*non-linear"):
        concat(models, example_inputs=x)
    fused = fuse(models, example_inputs=x)
    SqueezeNet("1_1", num_classes=5).load_state_dict(fused.state_dict(), strict=True)
    assert fused(x).shape == (2, 5)


@pytest.mark.parametrize("family", ["shufflenet", "vit"])
def test_fused_with_its_own_copy_keeps_member_0_and_its_routing(family):
    # an importance that ranks member 0's units first: NT keeps exactly member 0's units (channels, heads, tokens'
    # channels), so the fused model must compute member 0's features; only the output layer halves (weight 1/2)
    models, x = members(family, 1)
    calls = itertools.count()

    def member_0_first(view):
        return torch.full((view.size,), 2.0 if next(calls) % 2 == 0 else 1.0)

    fused = fuse([models[0], copy.deepcopy(models[0])], importance=member_0_first, example_inputs=x)
    output = [m for m in models[0].modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        expected = 0.5 * models[0](x) + 0.5 * output.bias
        assert torch.allclose(fused(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{"keep_ratio": 0.5}, {"order": "prune_merge"}])
def test_shufflenet_refuses_other_widths_with_the_reason(options):
    models, x = members("shufflenet", 2)
    with pytest.raises(UserError, match="routes channels by position"):
        fuse(models, example_inputs=x, **options)


def test_ot_fuses_shufflenet_to_the_original_architecture():
    # one-channel spaces have nothing to align (identity transport); the branches' own spaces are aligned
    models, x = members("shufflenet", 2)
    fused = fuse(models, method="ot", example_inputs=x)
    ShuffleNetV2([2, 3, 2], [8, 12, 20, 28, 16], num_classes=5).load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.isfinite(fused(x)).all()


def test_vit_keeps_whole_heads_of_the_members():
    models, x = members("vit", 3, seed=4)
    fused = fuse(models, example_inputs=x)
    attention = fused.encoder.layers.encoder_layer_0.self_attention
    assert attention.num_heads == 2 and attention.head_dim == 8
    queries = attention.in_proj_weight[:16]
    # every kept head's query rows are one member's head, restricted to the kept stream channels
    for head in queries.split(8):
        assert any(all(torch.equal(row[row != 0], ref_row[torch.isin(ref_row, row[row != 0])])
                       for row, ref_row in zip(head, ref)) for m in models
                   for ref in m.encoder.layers.encoder_layer_0.self_attention.in_proj_weight[:16].split(8))


def test_vit_refuses_other_widths_with_the_reason():
    models, x = members("vit", 2)
    with pytest.raises(UserError, match="count as a constant"):
        fuse(models, example_inputs=x, keep_ratio=0.5)
