"""Fusion creates every tensor on the device of the weights it works on: no CPU index or score tensor
beside GPU weights.

There is no GPU here, and `meta` weights cannot run fusion (it reads values: ranks, top-k, `nonzero`),
so the check is by patching: a torch function mode records every tensor that fusion code creates
without naming a device (a factory call such as `torch.arange(n)` or `torch.zeros(n)` without
`device=`, or `torch.from_numpy`, always on the CPU). Creations that inherit a device (`zeros_like`,
`new_zeros`, results of operations) are fine on any device.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_device.py
"""

import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ntdist.fusion
from ntdist.fusion import concat, fuse
from ntdist.models import build_model

FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor,
             torch.eye, torch.linspace, torch.randperm, torch.rand, torch.randn, torch.randint}
FUSION_DIR = os.path.dirname(ntdist.fusion.__file__)


class DevicelessCreations(TorchFunctionMode):
    """Records (file:line) of every factory call in ntdist/fusion without a device, and every from_numpy."""

    def __init__(self):
        super().__init__()
        self.sites = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.from_numpy or (func in FACTORIES and kwargs.get("device") is None):
            for frame in reversed(traceback.extract_stack()[:-1]):
                if frame.filename.startswith(FUSION_DIR):
                    self.sites.add(f"{os.path.basename(frame.filename)}:{frame.lineno}")
                    break
        return func(*args, **kwargs)


def _members(name, kwargs, k=3):
    members = []
    for i in range(k):
        torch.manual_seed(i)
        members.append(build_model(name, kwargs).eval())
    return members


@pytest.mark.parametrize("options", [dict(method="nt"), dict(method="nt", schedule="recursive"),
                                     dict(method="concat"), dict(method="ot"), dict(method="avg"),
                                     dict(method="nt", dedup=True),
                                     dict(method="nt", importance="l1"), dict(method="nt", importance="l2")])
@pytest.mark.parametrize("model", [("mlp", dict(input_dim=12, num_classes=4, width=16, depth=3)),
                                   ("lenet", dict(in_channels=1, num_classes=4, image_size=28))])
def test_fusion_creates_no_tensor_without_a_device(model, options):
    name, kwargs = model
    members = _members(name, kwargs)
    x = torch.randn(2, 12) if name == "mlp" else torch.randn(2, 1, 28, 28)
    with DevicelessCreations() as mode:
        if options.get("method") == "concat":
            concat(members, example_inputs=x)
        else:
            fuse(members, example_inputs=x, **options)
    assert not mode.sites, sorted(mode.sites)


@pytest.mark.parametrize("family", ["resnext", "shufflenet", "vit", "convnext"])
def test_fusion_of_grouped_shuffled_and_attention_models_creates_no_tensor_without_a_device(family):
    from test_fusion_zoo import members
    models, x = members(family, 2)
    with DevicelessCreations() as mode:
        concat(models, example_inputs=x)
        fuse(models, method="nt", example_inputs=x)
    assert not mode.sites, sorted(mode.sites)
