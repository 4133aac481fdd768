"""Quantized conv / linear with a ReLU6 / Hardtanh / clamp bound the kernel cannot saturate to.

conv(+bn)+ReLU6 is observed after the clamp, so its output qparams cover [0, 6]. Where the
output uses the full 8-bit range (qnnpack; onednn and x86 on VNNI CPUs) the kernel's
saturation at 0 / 255 *is* the clamp and the plain ``ConvReLU2d`` runs alone. With 7-bit
activations (``reduce_range``: x86 / fbgemm on AVX2-only CPUs, where full-range inputs would
saturate the next kernel's int16 pair sums) the bound maps to 127 while the kernel saturates at
255, so values past the bound must still be clipped. These classes do that inside the module,
in place on the int8 output (``hardtanh_``): no separate graph node, no extra tensor, and the
output qparams are still the clipped range (zero point 0, scale 6/127).

Why not a float clamp or a separate op: the separate quantized clamp call was 11% of
MobileNetV2's int8 time (issue 10), mostly its Python dispatch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fxquant.backends.engine import clamp_needs_contiguous
from fxquant.nn import quantized as q

__all__ = ["ConvClamp1d", "ConvClamp2d", "ConvClamp3d", "LinearClamp", "CLAMPED_OF"]

_OPS = torch.ops.quantized


def _clamped_forward(op: Any, relu_op: Any) -> Callable[..., torch.Tensor]:
    """The forward of a clamped class over kernel ``op`` (``relu_op`` when the lower bound is
    0): a closure, so that TorchScript sees static ops and each class names them once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare_input(x)
        if self.fuse_relu:
            out = relu_op(x, self._packed_params, self.scale, self.zero_point)
        else:
            out = op(x, self._packed_params, self.scale, self.zero_point)
        if self.contiguous_clamp:
            out = out.contiguous()
        return F.hardtanh_(out, self.clamp_min, self.clamp_max)

    return forward


class _ClampMixin:
    """``clamp_min`` / ``clamp_max``: the bound, in float (the output qparams map it exactly
    or within half a step); ``fuse_relu``: the kernel also applies ReLU (lower bound 0).

    ``class ConvClamp2d(_ClampMixin, q.Conv2d, clamps="conv2d")`` names the kernel: the forward
    calls ``conv2d`` / ``conv2d_relu``."""

    def __init_subclass__(cls, clamps: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if clamps:
            cls._NAME = "Quantized" + cls.__name__
            cls.forward = _clamped_forward(getattr(_OPS, clamps), getattr(_OPS, clamps + "_relu"))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_clamp()

    def _init_clamp(self) -> None:
        self.clamp_min: float = 0.0
        self.clamp_max: float = 6.0
        self.fuse_relu: bool = True
        # qnnpack's hardtanh is wrong on channels-last input (docs/DEVELOPING.md): clip a
        # contiguous copy there
        self.contiguous_clamp: bool = False

    def set_clamp(self, lo: float, hi: float) -> None:
        if not lo <= 0.0 <= hi:
            raise ValueError(f"{type(self).__name__}: clamp bounds ({lo}, {hi}) must contain 0")
        self.clamp_min, self.clamp_max = float(lo), float(hi)
        self.fuse_relu = lo == 0.0

    @classmethod
    def from_reference_clamped(cls, ref_mod: Any, output_scale: float, output_zero_point: int,
                               bounds: tuple[float, float], pack_engine: str | None = None
                               ) -> Any:
        qmod = cls.from_reference(ref_mod, output_scale, output_zero_point, pack_engine)
        qmod.set_clamp(*bounds)
        qmod.contiguous_clamp = clamp_needs_contiguous()
        return qmod

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", clamp=({self.clamp_min}, {self.clamp_max}) in place "
                                       "on the int8 output")


class ConvClamp1d(_ClampMixin, q.Conv1d, clamps="conv1d"):
    """Quantized conv1d (+ReLU) whose int8 output is clipped in place to the clamp bound."""


class ConvClamp2d(_ClampMixin, q.Conv2d, clamps="conv2d"):
    __doc__ = ConvClamp1d.__doc__


class ConvClamp3d(_ClampMixin, q.Conv3d, clamps="conv3d"):
    __doc__ = ConvClamp1d.__doc__


class LinearClamp(_ClampMixin, q.Linear, clamps="linear"):
    """Quantized linear (+ReLU) whose int8 output is clipped in place to the clamp bound."""


# the plain quantized class of a conv / linear -> its clamped form
CLAMPED_OF: dict[type, type] = {q.Conv1d: ConvClamp1d, q.Conv2d: ConvClamp2d,
                                q.Conv3d: ConvClamp3d, q.Linear: LinearClamp}
