"""Fold an eval-mode BatchNorm into the preceding conv / conv-transpose / linear.

Own implementation (library code does not call torch.nn.utils.fusion). For the cases that
torch's ``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` handle, the
results are bit-identical to them: the same float32 operations run in the same order
(rsqrt(var + eps), weight * (gamma * rsqrt) per output channel, (b - mean) * rsqrt * gamma
+ beta). Beyond torch, transposed convs with ``groups > 1`` fold correctly (the
output-channel axis of a grouped transposed weight is split across groups) and the conv kind
is read from the module, so callers need no ``transpose=`` flag.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

__all__ = ["fold_conv_bn_eval", "fold_conv_bn_weights", "fold_linear_bn_eval",
           "fold_linear_bn_weights"]

ConvT = TypeVar("ConvT", bound=nn.modules.conv._ConvNd)
LinearT = TypeVar("LinearT", bound=nn.Linear)


def _fold_terms(
    w: torch.Tensor, b: torch.Tensor | None, bn_rm: torch.Tensor, bn_rv: torch.Tensor,
    bn_eps: float, bn_w: torch.Tensor | None, bn_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What conv and linear folding share: (the layer's bias, zeros where it has none; the
    dtype the folded bias keeps; gamma, beta, 1/sqrt(var + eps)), with gamma=1 / beta=0 for
    a non-affine BN. Each caller then combines them in torch's order for its kind."""
    b_dtype = w.dtype if b is None else b.dtype
    bias = torch.zeros_like(bn_rm) if b is None else b
    gamma = torch.ones_like(bn_rm) if bn_w is None else bn_w
    beta = torch.zeros_like(bn_rm) if bn_b is None else bn_b
    return bias, b_dtype, gamma, beta, torch.rsqrt(bn_rv + bn_eps)


def _scale_out_channels(
    w: torch.Tensor, factor: torch.Tensor, transpose: bool, groups: int
) -> torch.Tensor:
    """Multiply each output channel of a (transposed) conv weight by ``factor``."""
    spatial = [1] * (w.dim() - 2)
    if not transpose:
        return w * factor.reshape([-1, 1] + spatial)
    if groups == 1:
        return w * factor.reshape([1, -1] + spatial)
    # grouped transposed weight: (C_in, C_out // g, *k); out channel = group * (C_out//g) + j
    c_in, c_out_g = w.shape[0], w.shape[1]
    grouped = w.reshape([groups, c_in // groups, c_out_g] + list(w.shape[2:]))
    scaled = grouped * factor.reshape([groups, 1, c_out_g] + spatial)
    return scaled.reshape(w.shape)


def fold_conv_bn_weights(
    conv_w: torch.Tensor, conv_b: torch.Tensor | None, bn_rm: torch.Tensor, bn_rv: torch.Tensor,
    bn_eps: float, bn_w: torch.Tensor | None, bn_b: torch.Tensor | None,
    transpose: bool = False, groups: int = 1,
) -> tuple[nn.Parameter, nn.Parameter]:
    """Weight and bias of conv followed by eval BN, as one conv.

    ``transpose=True`` for ConvTranspose weights (out-channel axis 1); pass the conv's
    ``groups`` for grouped transposed convs. The results keep the conv's dtypes.
    """
    bias, b_dtype, gamma, beta, rsqrt = _fold_terms(conv_w, conv_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b)
    _check_channels(conv_w, bn_rm, transpose, groups)
    fused_w = _scale_out_channels(conv_w, gamma * rsqrt, transpose, groups).to(conv_w.dtype)
    fused_b = ((bias - bn_rm) * rsqrt * gamma + beta).to(b_dtype)
    return nn.Parameter(fused_w, conv_w.requires_grad), nn.Parameter(fused_b, bias.requires_grad)


def _check_channels(
    conv_w: torch.Tensor, bn_rm: torch.Tensor, transpose: bool, groups: int
) -> None:
    out_channels = conv_w.shape[1] * groups if transpose else conv_w.shape[0]
    if bn_rm.numel() != out_channels:
        raise ValueError(
            f"cannot fold a BatchNorm with {bn_rm.numel()} features into a "
            f"{'transposed ' if transpose else ''}conv with {out_channels} output channels"
        )


def _check_eval(mod: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    if mod.training or bn.training:
        raise ValueError(
            f"BatchNorm folding needs eval mode: call .eval() on the model first "
            f"({type(mod).__name__}.training={mod.training}, "
            f"{type(bn).__name__}.training={bn.training})"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__} without running statistics "
            "(it was built with track_running_stats=False); keep it as a separate op"
        )


def fold_conv_bn_eval(conv: ConvT, bn: nn.modules.batchnorm._BatchNorm) -> ConvT:
    """A NEW conv (Conv1d/2d/3d or ConvTranspose1d/2d/3d) computing ``bn(conv(x))`` in eval.

    The inputs are left untouched. Always has a bias afterwards.
    """
    if not isinstance(conv, nn.modules.conv._ConvNd):
        raise TypeError(f"fold_conv_bn_eval expects a conv module, got {type(conv).__name__}")
    _check_eval(conv, bn)
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fold_conv_bn_weights(
        fused.weight, fused.bias, bn.running_mean, bn.running_var, bn.eps,
        bn.weight, bn.bias, transpose=conv.transposed, groups=conv.groups,
    )
    return fused


def fold_linear_bn_weights(
    linear_w: torch.Tensor, linear_b: torch.Tensor | None, bn_rm: torch.Tensor,
    bn_rv: torch.Tensor, bn_eps: float, bn_w: torch.Tensor | None, bn_b: torch.Tensor | None,
) -> tuple[nn.Parameter, nn.Parameter]:
    """Weight and bias of linear followed by eval BatchNorm1d, as one linear.

    The BN's features must equal ``out_features`` or be 1 (broadcast).
    """
    out_features = linear_w.shape[0]
    if bn_rm.numel() not in (out_features, 1):
        raise ValueError(
            f"cannot fold a BatchNorm with {bn_rm.numel()} features into a linear with "
            f"{out_features} out_features (they must match, or the BN must have 1 feature)"
        )
    bias, b_dtype, gamma, beta, rsqrt = _fold_terms(linear_w, linear_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b)
    factor = gamma * rsqrt
    fused_w = linear_w * factor.unsqueeze(-1).to(dtype=linear_w.dtype)
    fused_b = ((bias - bn_rm) * factor + beta).to(b_dtype)
    if fused_b.numel() != out_features:
        fused_b = fused_b.expand(out_features).clone()
    return nn.Parameter(fused_w, linear_w.requires_grad), nn.Parameter(fused_b, bias.requires_grad)


def fold_linear_bn_eval(linear: LinearT, bn: nn.modules.batchnorm._BatchNorm) -> LinearT:
    """A NEW linear computing ``bn(linear(x))`` in eval mode. Always has a bias afterwards."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"fold_linear_bn_eval expects nn.Linear, got {type(linear).__name__}")
    _check_eval(linear, bn)
    fused = copy.deepcopy(linear)
    fused.weight, fused.bias = fold_linear_bn_weights(
        fused.weight, fused.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    return fused
