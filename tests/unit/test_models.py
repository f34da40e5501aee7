"""Forward shapes of every model and the registry's errors. Run: .venv/bin/python -m pytest tests/unit/test_models.py"""

import pytest
import torch

from ntdist.errors import UserError
from ntdist.models import build_model, complete_kwargs


@pytest.mark.parametrize("name, kwargs, shape", [
    ("mlp", {"input_dim": 64, "width": 16, "depth": 3}, (4, 1, 8, 8)),
    ("mlp", {"input_dim": 64, "bias": False}, (4, 64)),
    ("cnn1d", {"in_channels": 1, "length": 40}, (4, 1, 40)),
    ("cnn1d", {"in_channels": 3, "length": 17, "channels": 4, "bias": False}, (4, 3, 17)),
    ("lenet", {"in_channels": 1, "image_size": 28}, (4, 1, 28, 28)),
    ("lenet", {"in_channels": 3, "image_size": 32, "bias": False}, (4, 3, 32, 32)),
    ("vgg11", {"in_channels": 3, "image_size": 32, "width": 0.125}, (4, 3, 32, 32)),
    ("vgg11", {"in_channels": 1, "image_size": 8, "width": 0.125, "batch_norm": False, "bias": False}, (4, 1, 8, 8)),
    ("resnet18", {"in_channels": 3, "width": 8}, (4, 3, 32, 32)),
    ("torchvision:resnet18", {}, (2, 3, 32, 32)),
])
def test_forward_shape(name, kwargs, shape):
    model = build_model(name, {"num_classes": 7, **kwargs})
    assert model(torch.randn(*shape)).shape == (shape[0], 7)


def test_bias_flag_removes_every_bias():
    for name, kw in (("mlp", {}), ("cnn1d", {}), ("lenet", {}), ("vgg11", {"batch_norm": False, "width": 0.125})):
        model = build_model(name, {"bias": False, **kw})
        assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


def test_complete_kwargs_from_data():
    assert complete_kwargs("mlp", {}, (1, 8, 8), 10) == {"num_classes": 10, "input_dim": 64}
    assert complete_kwargs("lenet", {"num_classes": 3}, (3, 32, 32), 10) == \
        {"num_classes": 3, "in_channels": 3, "image_size": 32}
    assert complete_kwargs("cnn1d", {}, (1, 40), 10) == {"num_classes": 10, "in_channels": 1, "length": 40}


def test_cnn1d_has_the_mnist1d_papers_shape():
    model = build_model("cnn1d", {})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0], c.out_channels) for c in convs] == \
        [(5, 2, 1, 25), (3, 2, 1, 25), (3, 2, 1, 25)]
    assert model.classifier[1].in_features == 125             # 25 channels x length 5 (40 -> 19 -> 10 -> 5)
    assert sum(p.numel() for p in model.parameters()) == 5210
    with pytest.raises(UserError, match="length >= 3"):
        build_model("cnn1d", {"length": 2})


def test_unknown_names_suggest():
    with pytest.raises(UserError, match="did you mean 'lenet'"):
        build_model("lenett")
    with pytest.raises(UserError, match="resnet18"):
        build_model("torchvision:resnet19")
    with pytest.raises(UserError, match="model.kwargs"):
        build_model("mlp", {"widht": 3})
