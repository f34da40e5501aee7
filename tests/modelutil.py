"""Shared test helper: give BatchNorm layers random statistics so that exactness tests mean something."""

import torch
import torch.nn as nn


def randomise_bn(model):
    """Random running statistics and affine parameters in every BatchNorm layer (in place)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model
