"""QAT modules: float conv / linear modules (fused or not) whose weight passes through a
weight fake-quant module in every forward, so training sees the quantized weights.

================================  ===================================  =====================
QAT module                        built from (``from_float``)          forward
================================  ===================================  =====================
Conv1d / Conv2d / Conv3d          nn.Conv1d / 2d / 3d                  conv(x, fq(W)) + b
Linear                            nn.Linear                            linear(x, fq(W)) + b
ConvReLU1d / 2d / 3d              fused.ConvReLU1d / 2d / 3d           relu(conv)
LinearReLU                        fused.LinearReLU                     relu(linear)
ConvBn1d / 2d / 3d                fused.ConvBn1d / 2d / 3d             simulated folded BN
ConvBnReLU1d / 2d / 3d            fused.ConvBnReLU1d / 2d / 3d         relu(simulated folded BN)
LinearBn1d                        fused.LinearBn1d                     simulated folded BN
================================  ===================================  =====================

Simulated BatchNorm folding (the one-pass approximation of Krishnamoorthi 2018, as torch.ao's
QAT ConvBn modules do it): with ``f = gamma / sqrt(running_var + eps)`` per output channel::

    y = bn( conv(x, fq(W * f)) / f + b )

The weight is fake-quantized *as it will be folded* (scaled by the running statistics), the
division undoes the scaling so the BatchNorm still normalizes with the batch statistics in
training and keeps updating its running statistics. In eval mode (or with
:func:`freeze_bn_stats`) the BatchNorm uses the running statistics and ``y`` equals the folded
conv ``conv(x, fq(W * f)) + (b - mean) * f + beta`` up to float rounding — which is what the
converted model computes. ``f`` is computed with the same float32 operations as
:func:`fxquant.nn.fold.fold_conv_bn_weights`, so the weight the fake quant sees in training
and the folded weight convert quantizes are bit-identical. (As in torch.ao, a BatchNorm with
``gamma == 0`` in some channel makes ``f`` zero there and the division undefined.)

Each module provides ``to_reference_parts() -> (float_module, WeightQParams)`` for convert:
the float module with BatchNorm folded in (a plain nn.Conv*/nn.Linear, or a
fused.ConvReLU*/LinearReLU container for the ReLU kinds), and the weight qparams of
``weight_fake_quant`` after running it once on that (folded) weight, as torch.ao's convert
does. The qparams are the ones the fake quant applies (its ``scale`` / ``zero_point``), not a
recomputation: torch's fused fake-quant kernel computes symmetric per-channel scales with a
different formula than the observer (see
:class:`fxquant.fake_quantize.FusedMovingAvgObsFakeQuantize`), and the converted model
should compute what the trained one did. With the observers disabled
(``fxquant.fake_quantize.disable_observer(model)``) the extra run changes nothing, so the
converted model uses exactly the qparams of the last training step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.nn import fused
from fxquant.nn.common import WeightQParams
from fxquant.nn.reference import set_float_module
from fxquant.nn.fold import fold_conv_bn_weights, fold_linear_bn_weights

__all__ = [
    "QAT_MODULE_MAPPINGS",
    "Conv1d", "Conv2d", "Conv3d",
    "ConvBn1d", "ConvBn2d", "ConvBn3d",
    "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d",
    "ConvReLU1d", "ConvReLU2d", "ConvReLU3d",
    "Linear", "LinearBn1d", "LinearReLU",
    "freeze_bn_stats", "is_qat_module", "qat_modules", "to_qat", "update_bn_stats",
]


def _check_qconfig(cls: type, qconfig: Any) -> None:
    if qconfig is None or getattr(qconfig, "weight", None) is None:
        raise ValueError(
            f"{cls.__name__} needs a qconfig with a weight fake-quant factory, got {qconfig!r}; "
            "use e.g. fxquant.fake_quantize.get_default_qat_qconfig('x86')"
        )


class _QATWeighted:
    """Mixin of all QAT modules: ``qconfig`` and the ``weight_fake_quant`` it builds.
    ``_FLOAT_MODULE`` is the torch.nn class among the bases in the class line."""

    _FLOAT_MODULE: ClassVar[type[nn.Module]]  # the plain float module (nn.Conv2d, nn.Linear)
    _FUSED_MODULE: ClassVar[type[nn.Module] | None] = None  # the fused float kind it replaces
    _FOLDED_RELU: ClassVar[type[nn.Module] | None] = None  # fused container after folding
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        set_float_module(cls)

    def _attach_qconfig(self, qconfig: Any) -> None:
        _check_qconfig(type(self), qconfig)
        self.qconfig = qconfig
        self.weight_fake_quant = qconfig.weight()

    def _weight_qparams(self, weight: torch.Tensor) -> WeightQParams:
        """Run the weight fake quant on the weight convert will quantize, then read the qparams
        it fake-quantized with (see :func:`_used_qparams`)."""
        with torch.no_grad():
            self.weight_fake_quant(weight.detach())
        return _used_qparams(self.weight_fake_quant)

    def _wrap_relu(self, core: nn.Module) -> nn.Module:
        return core if self._FOLDED_RELU is None else self._FOLDED_RELU(core, nn.ReLU())

    def _float_core(self) -> nn.Module:
        raise NotImplementedError

    def to_reference_parts(self) -> tuple[nn.Module, WeightQParams]:
        core = self._float_core()
        wq = self._weight_qparams(core.weight)
        return self._wrap_relu(core), wq

    def to_float(self) -> nn.Module:
        """The float module this QAT module computes (BatchNorm folded, ReLU kept)."""
        return self._wrap_relu(self._float_core())


def _used_qparams(fake_quant: nn.Module) -> WeightQParams:
    """The weight qparams a fake quant applies in its forward, via its ``calculate_qparams()``
    (fxquant's fused fake quant reports what torch's kernel chose, see
    :class:`~fxquant.fake_quantize.FusedMovingAvgObsFakeQuantize`). Exception: where the kernel
    gave a symmetric scheme a zero point other than the symmetric one (a channel whose weights
    all have one sign), that channel takes its observer's symmetric qparams, which the int8
    kernels require."""
    applied = WeightQParams.from_observer(fake_quant)
    observer = getattr(fake_quant, "activation_post_process", None)
    if observer is None or applied.qscheme not in (torch.per_tensor_symmetric, torch.per_channel_symmetric):
        return applied
    own = WeightQParams.from_observer(observer)
    if own.scale.numel() != applied.scale.numel():
        return applied
    keep = applied.zero_point == own.zero_point
    if bool(keep.all()):
        return applied
    return dataclasses.replace(applied, scale=torch.where(keep, applied.scale, own.scale),
                               zero_point=torch.where(keep, applied.zero_point, own.zero_point))


# ----------------------------------------------------------------------------------------
# Conv / Linear (and their ReLU kinds)
# ----------------------------------------------------------------------------------------


def _conv_kwargs(conv: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return dict(
        in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        padding_mode=conv.padding_mode,
    )


def _float_conv(qat: Any, bias: bool) -> nn.modules.conv._ConvNd:
    w = qat.weight
    return qat._FLOAT_MODULE(**_conv_kwargs(qat), bias=bias, device=w.device, dtype=w.dtype)


class _QATConv(_QATWeighted):
    def __init__(self, *args: Any, qconfig: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attach_qconfig(qconfig)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any) -> _QATConv:
        """The QAT module for ``mod`` (the float conv, or its fused ConvReLU container); shares
        its parameters."""
        conv = mod[0] if cls._FUSED_MODULE is not None else mod
        expected = cls._FUSED_MODULE or cls._FLOAT_MODULE
        if type(mod) is not expected:
            raise TypeError(f"{cls.__name__}.from_float needs {expected.__name__}, got {type(mod).__name__}")
        qat = cls(**_conv_kwargs(conv), bias=conv.bias is not None, qconfig=qconfig,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        qat.weight, qat.bias = conv.weight, conv.bias
        qat.train(mod.training)
        return qat

    def _float_core(self) -> nn.Module:
        conv = _float_conv(self, self.bias is not None)
        conv.weight = nn.Parameter(self.weight.detach().clone())
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone())
        return conv


class Conv1d(_QATConv, nn.Conv1d):
    """QAT Conv1d: the weight fake-quantized in forward."""


class Conv2d(_QATConv, nn.Conv2d):
    """QAT Conv2d: the weight fake-quantized in forward."""


class Conv3d(_QATConv, nn.Conv3d):
    """QAT Conv3d: the weight fake-quantized in forward."""


class _QATConvReLU(_QATConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self._conv(x))


class ConvReLU1d(_QATConvReLU, nn.Conv1d):
    _FUSED_MODULE = _FOLDED_RELU = fused.ConvReLU1d


class ConvReLU2d(_QATConvReLU, nn.Conv2d):
    _FUSED_MODULE = _FOLDED_RELU = fused.ConvReLU2d


class ConvReLU3d(_QATConvReLU, nn.Conv3d):
    _FUSED_MODULE = _FOLDED_RELU = fused.ConvReLU3d


class Linear(_QATWeighted, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, qconfig: Any = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._attach_qconfig(qconfig)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any) -> Linear:
        expected = cls._FUSED_MODULE or cls._FLOAT_MODULE
        if type(mod) is not expected:
            raise TypeError(f"{cls.__name__}.from_float needs {expected.__name__}, got {type(mod).__name__}")
        lin = mod[0] if cls._FUSED_MODULE is not None else mod
        qat = cls(lin.in_features, lin.out_features, lin.bias is not None, qconfig=qconfig,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        qat.weight, qat.bias = lin.weight, lin.bias
        qat.train(mod.training)
        return qat

    def _float_core(self) -> nn.Module:
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach().clone())
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone())
        return lin


class LinearReLU(Linear):
    _FUSED_MODULE = fused.LinearReLU
    _FOLDED_RELU = fused.LinearReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


# ----------------------------------------------------------------------------------------
# Conv-BN / Linear-BN with simulated folding
# ----------------------------------------------------------------------------------------


class _BnFolding(_QATWeighted):
    """Shared by ConvBn*, ConvBnReLU* and LinearBn1d: the ``bn`` child, ``freeze_bn`` and the
    simulated folding. ``self.bn`` is the user's own BatchNorm (affine or not, its momentum)."""

    bn: nn.modules.batchnorm._BatchNorm
    freeze_bn: bool

    def _init_bn(self, bn: nn.modules.batchnorm._BatchNorm, freeze_bn: bool) -> None:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{type(self).__name__} needs a BatchNorm with running statistics "
                "(track_running_stats=True) to fold; keep that BatchNorm unfused"
            )
        self.bn = bn
        self.freeze_bn = False
        if freeze_bn or not self.training:
            self.freeze_bn_stats()
        else:
            self.update_bn_stats()

    def update_bn_stats(self) -> _BnFolding:
        """Normalize with batch statistics in training and keep updating the running ones."""
        self.freeze_bn = False
        self.bn.training = self.training
        return self

    def freeze_bn_stats(self) -> _BnFolding:
        """Use (and keep) the running statistics, also in training: the folded model exactly."""
        self.freeze_bn = True
        self.bn.training = False
        return self

    def train(self, mode: bool = True) -> _BnFolding:
        """As nn.Module.train, but a frozen BatchNorm stays in eval mode."""
        self.training = mode
        for name, module in self.named_children():
            if name == "bn" and self.freeze_bn:
                continue
            module.train(mode)
        return self

    def _fold_factor(self) -> torch.Tensor:
        """gamma / sqrt(running_var + eps), with fold.py's float32 operations."""
        rsqrt = torch.rsqrt(self.bn.running_var + self.bn.eps)
        return rsqrt if self.bn.weight is None else self.bn.weight * rsqrt

    def _simulate(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        factor = self._fold_factor()
        w_shape = [-1] + [1] * (self.weight.dim() - 1)
        y_shape = [1, -1] + [1] * (self.weight.dim() - 2)
        w = self.weight_fake_quant(self.weight * factor.reshape(w_shape))
        y = op(x, w) / factor.reshape(y_shape)
        if self.bias is not None:
            y = y + self.bias.reshape(y_shape)
        return self.bn(y)

    @classmethod
    def _layer_kwargs(cls, layer: nn.Module) -> dict[str, Any]:
        """Constructor arguments describing the fused container's conv / linear."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any) -> Any:
        """The QAT module for its fused float container (ConvBn*, ConvBnReLU*, LinearBn1d);
        shares its conv / linear parameters and takes over its BatchNorm module."""
        if type(mod) is not cls._FUSED_MODULE:
            raise TypeError(f"{cls.__name__}.from_float needs fused.{cls._FUSED_MODULE.__name__}, "
                            f"got {type(mod).__name__}")
        layer, bn = mod[0], mod[1]
        qat = cls(**cls._layer_kwargs(layer), bias=layer.bias is not None, eps=bn.eps,
                  momentum=bn.momentum, qconfig=qconfig, device=layer.weight.device,
                  dtype=layer.weight.dtype)
        qat.weight, qat.bias = layer.weight, layer.bias
        qat.train(mod.training)
        qat._init_bn(bn, freeze_bn=False)
        return qat

    def _bn_args(self) -> tuple[Any, ...]:
        bn = self.bn
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return (bn.running_mean, bn.running_var, bn.eps, detach(bn.weight), detach(bn.bias))


class _QATConvBn(_BnFolding):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: Any = None,
                 padding_mode: str = "zeros", eps: float = 1e-5, momentum: float | None = 0.1,
                 freeze_bn: bool = False, qconfig: Any = None, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,  # type: ignore[call-arg]
                         groups, bool(bias), padding_mode, device=device, dtype=dtype)
        self._attach_qconfig(qconfig)
        bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[self.weight.dim() - 2]
        self._init_bn(bn_cls(out_channels, eps, momentum, device=device, dtype=dtype), freeze_bn)

    def _conv_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, None)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._simulate(x, self._conv_op)
        return F.relu(y) if self._FOLDED_RELU is not None else y

    @classmethod
    def _layer_kwargs(cls, layer: nn.Module) -> dict[str, Any]:
        return _conv_kwargs(layer)

    def _float_core(self) -> nn.Module:
        conv = _float_conv(self, True)
        b = None if self.bias is None else self.bias.detach()
        conv.weight, conv.bias = fold_conv_bn_weights(self.weight.detach(), b, *self._bn_args())
        return conv


def _conv_bn_class(name: str, conv: type, fused_cls: type, folded_relu: type | None) -> type:
    return type(name, (_QATConvBn, conv), {
        "_FUSED_MODULE": fused_cls, "_FOLDED_RELU": folded_relu,
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"QAT {fused_cls.__name__}: conv with simulated BatchNorm folding"
                   f"{' and ReLU' if folded_relu else ''}; see the module docstring.",
    })


ConvBn1d = _conv_bn_class("ConvBn1d", nn.Conv1d, fused.ConvBn1d, None)
ConvBn2d = _conv_bn_class("ConvBn2d", nn.Conv2d, fused.ConvBn2d, None)
ConvBn3d = _conv_bn_class("ConvBn3d", nn.Conv3d, fused.ConvBn3d, None)
ConvBnReLU1d = _conv_bn_class("ConvBnReLU1d", nn.Conv1d, fused.ConvBnReLU1d, fused.ConvReLU1d)
ConvBnReLU2d = _conv_bn_class("ConvBnReLU2d", nn.Conv2d, fused.ConvBnReLU2d, fused.ConvReLU2d)
ConvBnReLU3d = _conv_bn_class("ConvBnReLU3d", nn.Conv3d, fused.ConvBnReLU3d, fused.ConvReLU3d)


class LinearBn1d(_BnFolding, nn.Linear):
    """QAT fused.LinearBn1d: linear with simulated BatchNorm1d folding."""

    _FUSED_MODULE = fused.LinearBn1d

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5,
                 momentum: float | None = 0.1, freeze_bn: bool = False, qconfig: Any = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._attach_qconfig(qconfig)
        self._init_bn(nn.BatchNorm1d(out_features, eps, momentum, device=device, dtype=dtype), freeze_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._simulate(x, lambda inp, w: F.linear(inp, w))

    @classmethod
    def _layer_kwargs(cls, layer: nn.Module) -> dict[str, Any]:
        return {"in_features": layer.in_features, "out_features": layer.out_features}

    def _float_core(self) -> nn.Module:
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, True, device=w.device, dtype=w.dtype)
        b = None if self.bias is None else self.bias.detach()
        lin.weight, lin.bias = fold_linear_bn_weights(w.detach(), b, *self._bn_args())
        return lin


# ----------------------------------------------------------------------------------------
# Mapping and model-level helpers
# ----------------------------------------------------------------------------------------

QAT_MODULE_MAPPINGS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d, nn.Linear: Linear,
    fused.ConvReLU1d: ConvReLU1d, fused.ConvReLU2d: ConvReLU2d, fused.ConvReLU3d: ConvReLU3d,
    fused.LinearReLU: LinearReLU,
    fused.ConvBn1d: ConvBn1d, fused.ConvBn2d: ConvBn2d, fused.ConvBn3d: ConvBn3d,
    fused.ConvBnReLU1d: ConvBnReLU1d, fused.ConvBnReLU2d: ConvBnReLU2d,
    fused.ConvBnReLU3d: ConvBnReLU3d, fused.LinearBn1d: LinearBn1d,
}
"""Float (or fused float) module class → its QAT class (exact types, as torch.ao)."""


def to_qat(module: nn.Module, qconfig: Any) -> nn.Module | None:
    """The QAT version of ``module`` (sharing its parameters), or None when it has none."""
    cls = QAT_MODULE_MAPPINGS.get(type(module))
    return None if cls is None else cls.from_float(module, qconfig)  # type: ignore[attr-defined]


def is_qat_module(module: Any) -> bool:
    return isinstance(module, _QATWeighted)


def qat_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every QAT module in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _QATWeighted):
            yield name, module


def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """Freeze the BatchNorm statistics of every ConvBn* / ConvBnReLU* / LinearBn1d QAT module
    in ``model`` (they normalize with, and keep, their running statistics); returns ``model``.
    Usual for the last epochs of QAT. Also works as ``model.apply(freeze_bn_stats)``."""
    for _, module in qat_modules(model):
        if isinstance(module, _BnFolding):
            module.freeze_bn_stats()
    return model


def update_bn_stats(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn_stats`: batch statistics in training, running ones updated."""
    for _, module in qat_modules(model):
        if isinstance(module, _BnFolding):
            module.update_bn_stats()
    return model
