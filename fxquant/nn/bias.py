"""What bias correction needs to read and write on a weighted module, whatever its kind.

``fxquant.bias_correction`` works on float, fused, reference and quantized (packed) conv /
linear modules alike; the kind-specific parts (the quantized tensors, the packed weights)
live here so that the correction itself never touches a quantized tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.nn import quantized, reference
from fxquant.nn.fused import FusedModule

# float cores whose output channel is dim 1 (conv) or the last dim (linear); transposed convs
# are left out (their weight's channel axis differs and they are rare after BatchNorm)
_FLOAT_CORES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_QUANTIZED = (quantized.Conv1d, quantized.Conv2d, quantized.Conv3d, quantized.Linear)


def float_core(module: nn.Module) -> Optional[nn.Module]:
    """The conv / linear computing ``W x + b`` in a float or fused float module (its first
    child for a fused container), or in a reference module; None for anything else, and for
    a fused module that still holds an unfolded BatchNorm (QAT ConvBn)."""
    if isinstance(module, FusedModule):
        if hasattr(module, "fold_eval"):
            return None
        module = module[0]
    if isinstance(module, _FLOAT_CORES) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return module
    return None


def quantized_core(module: nn.Module) -> Optional[nn.Module]:
    """The module of a converted graph whose weight and bias the kernel computes with: a packed
    quantized conv / linear (fused ReLU kinds included) or a reference one (possibly inside a
    fused container). None for anything else."""
    if isinstance(module, _QUANTIZED):
        return module
    if isinstance(module, FusedModule) and len(module):
        module = module[0]
    if isinstance(module, reference.ReferenceWeighted) and float_core(module) is not None:
        return module
    return None


def weight_and_bias(core: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight the module computes with, as float (quantized then dequantized for
    quantized / reference modules), and its float bias (None: none)."""
    if isinstance(core, _QUANTIZED):
        return core.fake_quantized_weight(), core.bias()
    if isinstance(core, reference.ReferenceWeighted):
        return core.fake_quantized_weight().detach(), _detached(core.bias)
    return core.weight.detach(), _detached(core.bias)


def _detached(b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if b is None else b.detach()


def as_float(x: torch.Tensor) -> torch.Tensor:
    """A module input as a float tensor (quantized inputs dequantized)."""
    return x.dequantize() if x.is_quantized else x


def pre_activation(geometry: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``W x + b`` of a conv / linear with ``geometry``'s stride, padding, groups... (a float
    core, see :func:`float_core`) on input ``x`` (quantized or float)."""
    x = as_float(x)
    if isinstance(geometry, nn.Linear):
        return F.linear(x, weight, bias)
    return geometry._conv_forward(x, weight, bias)


def set_bias(core: nn.Module, bias: torch.Tensor) -> None:
    """Give the module's kernel a new float bias (created where it had none); the weight and
    its qparams are kept exactly (a packed module is re-packed with the same quantized
    weight)."""
    bias = bias.detach().float().clone()
    if isinstance(core, _QUANTIZED):
        core.set_weight_bias(core._quantized_weight(), bias)
        return
    core.bias = nn.Parameter(bias.to(core.weight.dtype), requires_grad=False)
