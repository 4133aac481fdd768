"""Reference weighted modules: float compute on a quantized-then-dequantized weight.

These sit in the *reference* quantized graph (``dequantize -> ref module -> quantize``). They
keep the float weight plus its ``WeightQParams`` and, in ``forward``, run the float op on
``quantize_weight(weight).dequantize()`` - the exact int8 weights a backend kernel will use.
Lowering turns them into fxquant.nn.quantized modules with ``from_reference``.

Each class subclasses its float counterpart (so it has ``in_features``, ``kernel_size``, ...).
State dict: ``weight``, ``bias``, the buffers ``weight_scale`` / ``weight_zero_point`` and the
entries ``weight_dtype``, ``weight_qscheme``, ``weight_axis``, ``weight_quant_min``,
``weight_quant_max``; loading one into a freshly built module of the same shape restores the
qparams too (per-channel scale lengths included). Modules script with torch.jit.script.
A fused float module's ReLU is not part of these modules; the caller keeps it as a float op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.nn.common import WeightQParams, quantize_weight
from fxquant.nn.fused import FusedModule

__all__ = [
    "Conv1d", "Conv2d", "Conv3d",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Linear", "ReferenceWeighted",
]

_META_KEYS = ("weight_dtype", "weight_qscheme", "weight_axis", "weight_quant_min",
              "weight_quant_max")


def set_float_module(cls: type) -> None:
    """``cls._FLOAT_MODULE``: the torch.nn class ``cls`` names among its bases (kept from its
    parent when it names none), so that a class line such as
    ``class Conv2d(_RefConv, nn.Conv2d)`` says it once."""
    floats = [b for b in cls.__bases__ if b.__module__.startswith("torch.nn.")]
    if floats:
        cls._FLOAT_MODULE = floats[0]


def _conv_transpose_forward(conv_transpose: Any) -> Callable[..., torch.Tensor]:
    """The forward of a reference ConvTranspose*d over ``conv_transpose`` (F.conv_transpose*d):
    a closure, so that TorchScript sees a static call (it takes no closed-over int: the
    spatial dims are read from kernel_size)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, len(self.kernel_size),
            self.dilation
        )
        return conv_transpose(x, self.fake_quantized_weight(), self.bias, self.stride,
                              self.padding, output_padding, self.groups, self.dilation)

    return forward


class ReferenceWeighted:
    """Mixin holding a weight's qparams; put it before the float module class in the bases
    (which sets ``_FLOAT_MODULE``, see :func:`set_float_module`)."""

    # no class-level annotations here: torch.jit.script would read them as attribute types
    _FLOAT_MODULE = nn.Module

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        set_float_module(cls)

    def _init_weight_qparams(self, wq: WeightQParams | None) -> None:
        wq = WeightQParams(1.0, 0) if wq is None else wq
        if not isinstance(wq, WeightQParams):
            raise TypeError(
                f"{type(self).__name__} needs a fxquant WeightQParams, got {type(wq).__name__}; "
                "build one with WeightQParams.from_observer(observer)"
            )
        wq.check_weight(self.weight)
        self.register_buffer("weight_scale", wq.scale.clone())
        self.register_buffer("weight_zero_point", wq.zero_point.clone())
        self.weight_dtype: torch.dtype = wq.dtype
        self.weight_qscheme: torch.qscheme = wq.qscheme
        self.weight_axis: int = wq.ch_axis % self.weight.dim() if wq.is_per_channel else 0
        self._quant_axis: int = self.weight_axis if wq.is_per_channel else -1
        self.weight_quant_min: int = wq.qrange[0]
        self.weight_quant_max: int = wq.qrange[1]

    def weight_qparams(self) -> WeightQParams:
        """The weight's qparams as a WeightQParams value."""
        return WeightQParams(
            self.weight_scale, self.weight_zero_point, self.weight_dtype, self.weight_qscheme,
            self.weight_axis, self.weight_quant_min, self.weight_quant_max,
        )

    def quantized_weight(self) -> torch.Tensor:
        """The weight as a quantized tensor (what a backend module packs)."""
        return quantize_weight(
            self.weight.detach(), self.weight_scale, self.weight_zero_point, self.weight_dtype,
            self._quant_axis, (self.weight_quant_min, self.weight_quant_max),
        )

    def fake_quantized_weight(self) -> torch.Tensor:
        """The float weight quantized and dequantized; what ``forward`` computes with."""
        q = quantize_weight(
            self.weight, self.weight_scale, self.weight_zero_point, self.weight_dtype,
            self._quant_axis, (self.weight_quant_min, self.weight_quant_max),
        )
        return q.dequantize()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        destination[prefix + "weight_dtype"] = self.weight_dtype
        destination[prefix + "weight_qscheme"] = self.weight_qscheme
        for name in ("weight_axis", "weight_quant_min", "weight_quant_max"):
            destination[prefix + name] = torch.tensor(getattr(self, name), dtype=torch.int64)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        meta = {k: state_dict.pop(prefix + k) for k in _META_KEYS if prefix + k in state_dict}
        scale = state_dict.get(prefix + "weight_scale")
        zero_point = state_dict.get(prefix + "weight_zero_point")
        if len(meta) == len(_META_KEYS) and scale is not None and zero_point is not None:
            self._init_weight_qparams(WeightQParams(
                scale, zero_point, meta["weight_dtype"], meta["weight_qscheme"],
                int(meta["weight_axis"]), int(meta["weight_quant_min"]),
                int(meta["weight_quant_max"]),
            ))
        else:
            missing_keys.extend(prefix + k for k in _META_KEYS if k not in meta)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _extra_qparams_repr(self) -> str:
        per_channel = self._quant_axis >= 0
        axis = f", axis={self.weight_axis}" if per_channel else ""
        return (f"weight_dtype={self.weight_dtype}, weight_qscheme={self.weight_qscheme}"
                f"{axis}")

    @classmethod
    def _check_float(cls, mod: nn.Module) -> None:
        if isinstance(mod, FusedModule):
            raise TypeError(
                f"reference {cls.__name__}.from_float takes a plain {cls._FLOAT_MODULE.__name__}; "
                f"for the fused {type(mod).__name__} pass its [0] and keep the rest as float ops "
                "(fold any BatchNorm first with fold_eval())"
            )
        if not isinstance(mod, cls._FLOAT_MODULE) or isinstance(mod, ReferenceWeighted):
            raise TypeError(f"reference {cls.__name__}.from_float takes a float "
                            f"{cls._FLOAT_MODULE.__name__}, got {type(mod).__name__}")

    def _adopt(self, mod: nn.Module) -> None:
        """Share ``mod``'s float weight and bias (as parameters)."""
        self.weight = nn.Parameter(mod.weight.detach(), mod.weight.requires_grad)
        if mod.bias is not None:
            self.bias = nn.Parameter(mod.bias.detach(), mod.bias.requires_grad)


class Linear(ReferenceWeighted, nn.Linear):
    """Reference linear: ``F.linear(x, fake_quant(weight), bias)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 wq: WeightQParams | None = None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_weight_qparams(wq)

    def _get_name(self) -> str:
        return "ReferenceQuantizedLinear"

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._extra_qparams_repr()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, mod: nn.Linear, wq: WeightQParams) -> Linear:
        """Reference module from float ``mod`` (weight shared, not copied) and its qparams."""
        cls._check_float(mod)
        ref = cls(mod.in_features, mod.out_features, mod.bias is not None)
        ref._adopt(mod)
        ref._init_weight_qparams(wq)
        return ref.to(mod.weight.device)


class _RefConvMixin(ReferenceWeighted):
    """Shared constructor, ``from_float`` and repr of the reference convs."""

    def __init__(self, *args: Any, wq: WeightQParams | None = None, **kwargs: Any) -> None:
        self._FLOAT_MODULE.__init__(self, *args, **kwargs)
        self._init_weight_qparams(wq)

    def _get_name(self) -> str:
        return f"ReferenceQuantized{self._FLOAT_MODULE.__name__}"

    def extra_repr(self) -> str:
        return f"{self._FLOAT_MODULE.extra_repr(self)}, {self._extra_qparams_repr()}"

    @classmethod
    def from_float(cls, mod: nn.modules.conv._ConvNd, wq: WeightQParams) -> Any:
        """Reference conv from float ``mod`` (weight shared, not copied) and its qparams."""
        cls._check_float(mod)
        ref = cls(**_conv_kwargs(mod))
        ref._adopt(mod)
        ref._init_weight_qparams(wq)
        return ref.to(mod.weight.device)


def _conv_kwargs(mod: nn.modules.conv._ConvNd) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        in_channels=mod.in_channels, out_channels=mod.out_channels,
        kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
        dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None,
        padding_mode=mod.padding_mode,
    )
    if mod.transposed:
        kwargs["output_padding"] = mod.output_padding
    return kwargs


class _RefConv(_RefConvMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.fake_quantized_weight(), self.bias)


class Conv1d(_RefConv, nn.Conv1d):
    """Reference Conv1d (all padding modes, like nn.Conv1d)."""


class Conv2d(_RefConv, nn.Conv2d):
    """Reference Conv2d (all padding modes, like nn.Conv2d)."""


class Conv3d(_RefConv, nn.Conv3d):
    """Reference Conv3d (all padding modes, like nn.Conv3d)."""


class _RefConvTranspose(_RefConvMixin):
    """Reference transposed convs: forward takes ``output_size`` as nn.ConvTranspose*d's."""


class ConvTranspose1d(_RefConvTranspose, nn.ConvTranspose1d):
    """Reference ConvTranspose1d; ``output_size`` works as in nn.ConvTranspose1d."""

    forward = _conv_transpose_forward(F.conv_transpose1d)


class ConvTranspose2d(_RefConvTranspose, nn.ConvTranspose2d):
    """Reference ConvTranspose2d; ``output_size`` works as in nn.ConvTranspose2d."""

    forward = _conv_transpose_forward(F.conv_transpose2d)


class ConvTranspose3d(_RefConvTranspose, nn.ConvTranspose3d):
    """Reference ConvTranspose3d; ``output_size`` works as in nn.ConvTranspose3d."""

    forward = _conv_transpose_forward(F.conv_transpose3d)
