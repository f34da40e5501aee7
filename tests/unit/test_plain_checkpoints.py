"""Plain in, plain out: a checkpoint written by ntdist holds the model's own keys, so a strict load_state_dict
into the user's own class works, with ntdist's metadata in the safetensors header; files of the older layout
(keys prefixed `model.`) are still read.

Run: .venv/bin/python -m pytest tests/unit/test_plain_checkpoints.py
"""

import json

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ntdist.cli import main
from ntdist.fusion import fuse
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import load_model, read_checkpoint, save_checkpoint


@pytest.mark.parametrize("name, kwargs, method", [
    ("resnet18", {"num_classes": 10}, "nt"),
    ("vit_b_16", {"num_classes": 10, "image_size": 32}, "avg"),
    ("convnext_tiny", {"num_classes": 10}, "avg"),
])
def test_a_fused_file_loads_strictly_into_a_fresh_torchvision_model(tmp_path, name, kwargs, method):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        member = torchvision.models.get_model(name, **kwargs)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_file({k: v.contiguous() for k, v in member.state_dict().items()}, paths[-1])
    out = str(tmp_path / "fused.safetensors")
    assert main(["fuse", "--method", method, "--model", f"torchvision:{name}", "--model-kwargs", json.dumps(kwargs),
                 "-o", out, *paths]) == 0
    state = load_file(out)
    assert set(state) == set(member.state_dict())            # the members' keys, nothing added
    fresh = torchvision.models.get_model(name, **kwargs)
    fresh.load_state_dict(state)                              # strict
    with safe_open(out, framework="pt") as f:                 # ntdist's metadata stays in the header
        assert json.loads(f.metadata()["ntdist"])["model"] == {"name": f"torchvision:{name}", "kwargs": kwargs}
    rebuilt, _ = load_model(out)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("build, shape", [
    (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    # vit_b_16's own class with small dimensions (the b/16 sizes take seconds to fuse)
    (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=10), (2, 3, 32, 32)),
    (lambda: torchvision.models.convnext_tiny(num_classes=10), (2, 3, 32, 32)),
], ids=["resnet18", "vit_b_16_class", "convnext_tiny"])
def test_an_nt_fused_plain_state_dict_loads_strictly_into_a_fresh_model(tmp_path, build, shape):
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(build().eval())
    fused = fuse(members, method="nt", example_inputs=torch.randn(*shape))
    path = str(tmp_path / "fused.pt")
    torch.save(fused.state_dict(), path)
    fresh = build()
    fresh.load_state_dict(torch.load(path), strict=True)
    assert type(fresh) is type(members[0])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(torch.ones(*shape)), fused.eval()(torch.ones(*shape)))


def test_files_of_the_older_layout_are_still_read_and_extras_stay_apart(tmp_path):
    spec = ModelSpec("mlp", {"input_dim": 4, "width": 8, "depth": 1, "num_classes": 3})
    model = spec.build()
    old = str(tmp_path / "old.safetensors")                  # format 1: model.<key>, extra.<name>
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["extra.rng"] = torch.get_rng_state()
    save_file(tensors, old, metadata={"ntdist": json.dumps({"format": 1, "model": spec.to_dict(), "info": {}})})
    loaded, _ = load_model(old)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    meta, state, extra = read_checkpoint(old)
    assert set(state) == set(model.state_dict()) and set(extra) == {"rng"}

    class WithExtra(torch.nn.Module):   # a submodule called `extra`: its keys must not be taken for extras
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    new = str(tmp_path / "new.safetensors")
    save_checkpoint(new, WithExtra(), spec, extra={"rng": torch.get_rng_state()})
    meta, state, extra = read_checkpoint(new)
    assert meta["format"] == 2 and set(state) == {"extra.weight", "extra.bias"} and set(extra) == {"rng"}
