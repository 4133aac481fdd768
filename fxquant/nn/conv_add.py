"""Quantized Conv2d + add (+ ReLU) rounded once: oneDNN's int8 conv with a sum post-op.

``y = quantize(relu?(conv(x) + accum))``: the conv's int32 accumulator, scaled to float, gets
the bias and the dequantized ``accum`` added before the one rounding to the output qparams.
This is what a model converted with ``convert_fx(..., fuse_sums=True)`` runs for a residual
add (fxquant.passes.fuse_sums), and what OpenVINO runs for the same graph.

The kernel is ``onednn::qconv2d_pointwise.binary`` on the uint8 integers (torch's oneDNN
kernels for Inductor; they run under any quantized engine on x86). Its weights are packed for
it on the first call (and again when the input's qparams change); the module otherwise is a
quantized Conv2d (weights, bias, output qparams, state_dict and pickling as that class). The
kernel writes its result into the accumulator tensor, so ``accum`` is copied first (its
integers, which the call needs anyway): the caller's tensor is never changed.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from fxquant.nn.quantized import Conv2d

__all__ = ["ACTIVATION_DTYPES", "ACTIVATION_FUNCTIONS", "ConvAct2d", "ConvAdd2d", "POST_OPS"]

ACTIVATION_DTYPES = (torch.quint8,)  # the kernel's input, accumulator and output dtypes
# ConvAct2d's activations: fxquant's name -> oneDNN's unary post-op (both checked exact against
# a float64 conv + activation, rounded once: tests/test_fuse_activations.py)
POST_OPS = {"silu": "swish", "hardswish": "hardswish"}
# the functions a converted graph calls for them (normalize writes every spelling so)
ACTIVATION_FUNCTIONS = {F.silu: "silu", F.hardswish: "hardswish"}


def _integers(q: torch.Tensor) -> torch.Tensor:
    """The uint8 integers of a quint8 tensor, sharing its memory (``int_repr()`` copies, and
    on channels-last tensors takes about as long as the conv: 89 us of a 160 us 64-channel
    56x56 conv, measured)."""
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(),
                                                  q.size(), q.stride())


class _OneDNNConv2d(Conv2d):
    """A quantized Conv2d run by ``onednn::qconv2d_pointwise`` (packed for it on the first call
    and again when the input's qparams change); weights, bias, output qparams, state_dict and
    pickling as :class:`fxquant.nn.quantized.Conv2d`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._onednn: Optional[tuple] = None  # ((x qparams), packed, scales, zps, bias)
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"{self._NAME}: padding_mode must be 'zeros', got "
                             f"{self.padding_mode!r}")

    def set_weight_bias(self, w: torch.Tensor, b: Optional[torch.Tensor]) -> None:
        super().set_weight_bias(w, b)
        self._onednn = None  # repacked for the kernel on the next call

    def forget_first_call(self) -> bool:
        self._onednn = None
        return True

    def _packed_for(self, x_scale: float, x_zero_point: int) -> tuple:
        """(packed weight, per-channel weight scales, weight zero points, float bias) for the
        kernel, kept until the input's qparams or the weights change."""
        cached = self._onednn
        if cached is not None and cached[0] == (x_scale, x_zero_point):
            return cached[1:]
        w, bias = self._weight_bias()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales = w.q_per_channel_scales().float()
        else:
            scales = torch.full((self.out_channels,), float(w.q_scale()))
        zps = torch.zeros(self.out_channels, dtype=torch.long)
        packed = torch.ops.onednn.qconv_prepack(
            w.int_repr(), scales, x_scale, x_zero_point, list(self.stride), list(self.padding),
            list(self.dilation), self.groups, None)
        bias = bias.float().contiguous() if bias is not None else None
        self._onednn = ((x_scale, x_zero_point), packed, scales, zps, bias)
        return packed, scales, zps, bias

    def _check_inputs(self, *tensors: torch.Tensor) -> None:
        if any(t.dim() != 4 for t in tensors):
            raise ValueError(f"{self._NAME} expects 4-D (N, C, H, W) quantized inputs, got "
                             f"{' and '.join(f'{t.dim()}-D' for t in tensors)}")
        if any(t.dtype not in ACTIVATION_DTYPES for t in tensors):
            raise ValueError(f"{self._NAME} takes {ACTIVATION_DTYPES[0]} inputs (the kernel "
                             f"reads their bytes as uint8), got "
                             f"{' and '.join(str(t.dtype) for t in tensors)}")

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return torch._make_per_tensor_quantized_tensor(y, float(self.scale),
                                                       int(self.zero_point))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_onednn"] = None
        return state


class ConvAdd2d(_OneDNNConv2d):
    """Quantized Conv2d whose output is added to a quint8 tensor (then ReLU when ``relu``),
    rounded once. ``forward(x, accum)``; ``accum`` has the conv output's shape."""

    _NAME = "QuantizedConvAdd2d"

    def __init__(self, *args: Any, relu: bool = False, **kwargs: Any) -> None:
        self.relu = bool(relu)
        super().__init__(*args, **kwargs)

    @classmethod
    def from_reference_add(cls, ref_mod: Any, output_scale: float, output_zero_point: int,
                           relu: bool) -> "ConvAdd2d":
        """From a fxquant.nn.reference Conv2d and the sum's output qparams."""
        qmod = cls.from_reference(ref_mod, output_scale, output_zero_point)
        qmod.relu = bool(relu)
        return qmod

    def forward(  # type: ignore[override]
            self, x: torch.Tensor, accum: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, accum)
        x_scale, x_zp = float(x.q_scale()), int(x.q_zero_point())
        packed, scales, zps, bias = self._packed_for(x_scale, x_zp)
        # the kernel writes into the accumulator: a fresh channels-last copy of its integers
        out = _integers(accum).clone(memory_format=torch.channels_last)
        y = torch.ops.onednn.qconv2d_pointwise.binary(
            _integers(x), x_scale, x_zp, packed, scales, zps, out, bias,
            list(self.stride), list(self.padding), list(self.dilation), self.groups,
            float(self.scale), int(self.zero_point), None, float(accum.q_scale()),
            int(accum.q_zero_point()), "sum", 1.0, "relu" if self.relu else "none", [], "")
        return self._output(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class ConvAct2d(_OneDNNConv2d):
    """Quantized Conv2d followed by an activation (``activation``: a key of :data:`POST_OPS`),
    rounded once: ``quantize(act(conv(x)))`` at the activation's output qparams."""

    _NAME = "QuantizedConvAct2d"

    def __init__(self, *args: Any, activation: str = "silu", **kwargs: Any) -> None:
        self.activation = self._checked(activation)
        super().__init__(*args, **kwargs)

    @classmethod
    def _checked(cls, activation: str) -> str:
        if activation not in POST_OPS:
            raise ValueError(f"{cls._NAME}: activation must be one of {sorted(POST_OPS)}, got "
                             f"{activation!r}")
        return activation

    @classmethod
    def from_reference_act(cls, ref_mod: Any, output_scale: float, output_zero_point: int,
                           activation: str) -> "ConvAct2d":
        """From a fxquant.nn.reference Conv2d and the activation's output qparams."""
        activation = cls._checked(activation)
        qmod = cls.from_reference(ref_mod, output_scale, output_zero_point)
        qmod.activation = activation
        return qmod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x)
        x_scale, x_zp = float(x.q_scale()), int(x.q_zero_point())
        packed, scales, zps, bias = self._packed_for(x_scale, x_zp)
        y = torch.ops.onednn.qconv2d_pointwise(
            _integers(x), x_scale, x_zp, packed, scales, zps, bias, list(self.stride),
            list(self.padding), list(self.dilation), self.groups, float(self.scale),
            int(self.zero_point), None, POST_OPS[self.activation], [], "")
        return self._output(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"
