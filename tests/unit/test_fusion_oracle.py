"""Torch-Pruning as an independent oracle: its dependency groups coincide with ntdist's channel spaces.

For each small zoo member both accept, the layers whose output channels
Torch-Pruning's `DependencyGraph` prunes together (one group per coupled set;
depthwise convs, which only follow their input, left out) are exactly the
layers whose outputs share one channel space in ntdist's analysis (the output
layer forms its own set). Residual coupling, channel concatenation, grouped and
depthwise convs, squeeze-excitation, channels-last blocks and attention (Torch-Pruning
prunes a MultiheadAttention's embedding as one module; its output is `out_proj`'s) are all exercised.
ShuffleNet v2 is left out: Torch-Pruning's dependency graph raises on its
channel shuffle (ZeroDivisionError in its index mapping, torch-pruning 1.6.1),
and ntdist routes those channels one by one, so there is no group to compare.
Swin v1/v2 and MaxViT (`test_fusion_swin.py`) are left out too: on members with
8 and 16 channels, `get_all_groups` had not finished after 150-200 s (torch-pruning
1.6.1; it was inside its index mappings, which expand every channel index through
the window-partition reshapes), far beyond a unit test's budget.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_oracle.py
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from test_fusion_zoo import FAMILIES

from ntdist.fusion import analyze
from ntdist.models import build_model


def pruning_groups(model, x):
    """Sets of layer names whose output channels Torch-Pruning prunes together."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        groups = list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
    names = {m: n for n, m in model.named_modules()}
    out = set()
    for group in groups:
        layers = set()
        for dep, _ in group:
            mod = dep.target.module
            if dep.handler == tp.prune_multihead_attention_out_channels:     # prunes in_proj rows and out_proj
                layers.add(names[mod] + ".out_proj")
                continue
            if dep.handler not in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                continue
            if isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels:
                continue
            layers.add(names[mod])
        if layers:
            out.add(frozenset(layers))
    return out


def channel_spaces(model, x):
    """Sets of Linear/Conv layer names whose outputs share one channel space (the output layer on its own)."""
    plan = analyze(model, x)
    spaces = {}
    for name, layer in plan.layers.items():
        if layer.kind in ("linear", "conv", "gconv"):
            spaces.setdefault(layer.out[0].space if layer.out is not None else "output", set()).add(name)
    return {frozenset(v) for v in spaces.values()}


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"shufflenet"}) + ["resnet18"])
def test_dependency_groups_coincide_with_channel_spaces(family):
    torch.manual_seed(0)
    if family == "resnet18":
        model, x = build_model("resnet18", {"in_channels": 3, "width": 4}).eval(), torch.randn(1, 3, 8, 8)
    else:
        build, size = FAMILIES[family]
        model, x = build().eval(), torch.randn(1, 3, size, size)
    ours = channel_spaces(model, x)
    assert len(ours) > 3
    assert pruning_groups(model, x) == ours
