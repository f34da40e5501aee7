"""The CUDA switches of member training (TF32, channels_last): set on CUDA only, put back, refused where useless.

No GPU is needed: the switches are process flags and the memory format is a tensor layout, both
readable on a CPU; the device passed in is what decides whether they act.
Run: .venv/bin/python -m pytest tests/unit/test_hardware.py
"""

import pytest
import torch
import torch.nn as nn

from helpers import make_run
from ntdist.config import load_config
from ntdist.errors import UserError
from ntdist.training.hardware import tf32, use_channels_last
from ntdist.stages.vectorized import why_not

@pytest.mark.parametrize("enabled, inside", [(True, "tf32"), (False, "ieee")])
def test_tf32_switches_on_cuda_are_set_inside_and_restored_after(enabled, inside):
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]
    with tf32(enabled, torch.device("cuda")):
        assert [f.allow_tf32 for f in flags] == [enabled, enabled]
        assert torch.backends.cuda.matmul.fp32_precision == inside   # the newer switch agrees
    assert [f.allow_tf32 for f in flags] == before
    with tf32(not before[0], "cpu"):
        assert [f.allow_tf32 for f in flags] == before               # a CPU run changes nothing


def test_channels_last_for_conv_nets_on_cuda_only():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    assert use_channels_last(conv, True, "cpu") == ("train.channels_last has no effect on a CPU (it is a CUDA "
                                                    "memory format for conv nets)")
    assert not conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert use_channels_last(conv, False, torch.device("cuda")) is None
    assert not conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert use_channels_last(conv, True, torch.device("cuda")) is None   # the layout change needs no GPU
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert "no 2-d convolution" in use_channels_last(nn.Linear(3, 2), True, torch.device("cuda"))


def test_channels_last_trains_members_one_after_another(tmp_path):
    with pytest.raises(UserError, match="train.vectorize=auto or off"):
        load_config(None, ["train.channels_last=true", "train.vectorize=on"])
    run = make_run(tmp_path, "fusion.k=4", "train.channels_last=true")
    from ntdist.models.weights import build_member
    from ntdist.stages.vectorized import member_batches
    models = [build_member(run.spec, s) for s in range(4)]
    assert "channels_last" in why_not(run, models, member_batches(run, list(range(4))))
