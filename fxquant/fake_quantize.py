"""Fake quantization for quantization-aware training (QAT).

A fake-quant module observes the tensor that passes through it (with one of
:mod:`fxquant.observers`) and returns it quantized and dequantized on the observer's grid::

    out = (clamp(round(x / scale + zero_point), quant_min, quant_max) - zero_point) * scale

Its backward pass is the straight-through estimator: the gradient passes unchanged where the
input landed inside [quant_min, quant_max] after rounding and is zero where it was clamped.
Both directions run on torch core's float kernels (``torch.fake_quantize_per_tensor_affine``,
``torch.fake_quantize_per_channel_affine``, ``torch.fused_moving_avg_obs_fake_quant``), so the
values and gradients are the ones torch.ao's fake-quant modules give on the same inputs.

A fake-quant module looks like an observer to the passes: it has ``dtype``, ``qscheme``,
``quant_min``, ``quant_max``, ``is_dynamic``, ``calculate_qparams()`` and, for min/max
observers, ``min_val`` / ``max_val`` (read from ``activation_post_process``). So a QAT
qconfig mapping simply holds fake-quant factories where a PTQ mapping holds observer factories;
``insert_observers`` inserts them and ``convert`` turns them into quantize/dequantize.

Modules
    FakeQuantize(observer, quant_min, quant_max, is_dynamic, **observer_kwargs)
    FusedMovingAvgObsFakeQuantize(observer, quant_min, quant_max, **observer_kwargs)
    FixedQParamsFakeQuantize(observer)
Switches (module methods, and functions that apply to every fake-quant module of a model)
    enable_observer / disable_observer / enable_fake_quant / disable_fake_quant
Defaults (definitions as in PyTorch's fake_quantize module)
    default_fake_quant, default_weight_fake_quant, default_per_channel_weight_fake_quant, ...
    get_default_qat_qconfig(backend), get_default_qat_qconfig_mapping(backend)
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fxquant import qmath
from fxquant.backends.names import AUTO, DEFAULT_BACKEND
from fxquant.observers import (
    ObserverSite,
    check_finite,
    FixedQParamsObserver,
    HistogramObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverFactory,
    default_fixed_qparams_range_0to1_observer,
    default_fixed_qparams_range_neg1to1_observer,
    default_placeholder_observer,
    factory_parts,
    SavedShapeBuffers,
    WithArgs,
)
from fxquant.qconfig import (
    CONV_TRANSPOSE_TYPES,
    FIXED_QPARAMS_OP_TO_OBSERVER,
    QConfig,
    QConfigMapping,
    activation_range,
    backend_policy,
    default_quint8_weight_qconfig,
    default_reuse_input_qconfig,
)

__all__ = [
    "FakeQuantize",
    "FakeQuantizeBase",
    "FixedQParamsFakeQuantize",
    "FusedMovingAvgObsFakeQuantize",
    "default_affine_fixed_qparams_fake_quant",
    "default_dynamic_fake_quant",
    "default_embedding_fake_quant",
    "default_embedding_fake_quant_4bit",
    "default_fake_quant",
    "default_fixed_qparams_range_0to1_fake_quant",
    "default_fixed_qparams_range_neg1to1_fake_quant",
    "default_fused_act_fake_quant",
    "default_fused_per_channel_wt_fake_quant",
    "default_fused_wt_fake_quant",
    "default_histogram_fake_quant",
    "default_per_channel_weight_fake_quant",
    "default_qat_qconfig",
    "default_symmetric_fixed_qparams_fake_quant",
    "default_weight_fake_quant",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "fake_quant_modules",
    "fused_per_channel_wt_fake_quant_range_neg_127_to_127",
    "fused_wt_fake_quant_range_neg_127_to_127",
    "get_default_qat_qconfig",
    "get_default_qat_qconfig_mapping",
    "is_fake_quant",
    "qat_observer_wrapper",
]


# ----------------------------------------------------------------------------------------
# Base
# ----------------------------------------------------------------------------------------


class FakeQuantizeBase(WithArgs, nn.Module, metaclass=ABCMeta):
    """Base of the fake-quant modules: the switches ``fake_quant_enabled`` and
    ``observer_enabled`` (uint8 buffers of shape [1], 1 = on) and their methods."""

    fake_quant_enabled: torch.Tensor
    observer_enabled: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))
        self.fxquant_site = ObserverSite()  # where it sits; set after prepare, names bad data

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Quantize-dequantize the data (True) or pass it through unchanged (False)."""
        self.fake_quant_enabled[0] = 1 if enabled else 0

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> None:
        """Update the statistics and qparams on each forward (True) or freeze them (False)."""
        self.observer_enabled[0] = 1 if enabled else 0

    def disable_observer(self) -> None:
        self.enable_observer(False)


def _check_fake_quant_qscheme(qscheme: Any) -> None:
    if not (qmath.is_per_tensor(qscheme) or qmath.is_per_channel(qscheme)):
        raise ValueError(
            f"fake quantization supports per-tensor and per-channel qschemes, got {qscheme}"
        )


class FakeQuantize(SavedShapeBuffers, FakeQuantizeBase):
    """Observe with ``observer`` (any fxquant observer class or factory, default
    :class:`~fxquant.observers.MovingAverageMinMaxObserver`), then fake-quantize with the
    observer's current qparams.

    ``quant_min`` / ``quant_max`` (both or neither) and ``observer_kwargs`` go to the observer;
    ``is_dynamic`` too. Attributes as torch.ao's FakeQuantize: ``activation_post_process``
    (the observer), ``scale`` / ``zero_point`` buffers (the qparams of the last observed
    forward; per-channel ones are resized to [C] on the first batch), ``dtype``, ``qscheme``,
    ``quant_min``, ``quant_max`` (the observer's effective range, e.g. 0..127 for quint8
    0..255 with reduce_range), ``ch_axis`` (-1 per-tensor), ``is_per_channel``, ``is_dynamic``.

    forward: if the observer is enabled, observe ``x`` and refresh scale / zero_point; if fake
    quant is enabled, return ``x`` fake-quantized, else ``x`` itself.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    _SAVED_SHAPE_BUFFERS = ("scale", "zero_point")  # per-channel: the saved [C], not [1]

    def __init__(
        self,
        observer: Callable[..., nn.Module] = MovingAverageMinMaxObserver,
        quant_min: int | None = None,
        quant_max: int | None = None,
        is_dynamic: bool = False,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        if (quant_min is None) != (quant_max is None):
            raise ValueError(
                f"{type(self).__name__}: give both quant_min and quant_max or neither "
                f"(got {quant_min}, {quant_max})"
            )
        if quant_min is not None and quant_max is not None:
            if quant_min > quant_max:
                raise ValueError(
                    f"{type(self).__name__}: quant_min ({quant_min}) must not exceed quant_max ({quant_max})"
                )
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        observer_kwargs["is_dynamic"] = is_dynamic
        self.activation_post_process = observer(**observer_kwargs)
        app = self.activation_post_process
        self.quant_min: int = app.quant_min
        self.quant_max: int = app.quant_max
        self.is_dynamic: bool = bool(app.is_dynamic)
        self.dtype: torch.dtype = app.dtype
        self.qscheme: torch.qscheme = app.qscheme
        _check_fake_quant_qscheme(self.qscheme)
        zp_dtype = torch.float if self.qscheme == torch.per_channel_affine_float_qparams else torch.int
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float))
        self.register_buffer("zero_point", torch.tensor([0], dtype=zp_dtype))
        self.ch_axis: int = int(getattr(app, "ch_axis", -1))
        self.is_per_channel: bool = qmath.is_per_channel(self.qscheme)

    # -- what the passes read (observer-like) -------------------------------------------

    @property
    def reduce_range(self) -> bool:
        return bool(getattr(self.activation_post_process, "reduce_range", False))

    @property
    def min_val(self) -> torch.Tensor | None:
        """The observer's running minimum (None if its observer keeps none)."""
        return getattr(self.activation_post_process, "min_val", None)

    @property
    def max_val(self) -> torch.Tensor | None:
        return getattr(self.activation_post_process, "max_val", None)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's qparams (what convert reads); as torch.ao's FakeQuantize."""
        return self.activation_post_process.calculate_qparams()

    # -- forward ----------------------------------------------------------------------------

    def _refresh_qparams(self) -> None:
        scale, zero_point = self.calculate_qparams()
        scale, zero_point = scale.to(self.scale.device), zero_point.to(self.zero_point.device)
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0] == 1:
            self.activation_post_process(x.detach())
            self._refresh_qparams()
        if self.fake_quant_enabled[0] == 1:
            x = self._fake_quantize(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={int(self.fake_quant_enabled[0])}, "
            f"observer_enabled={int(self.observer_enabled[0])}, quant_min={self.quant_min}, "
            f"quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
            f"ch_axis={self.ch_axis}, scale={self.scale}, zero_point={self.zero_point}"
        )



class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    """Moving-average min/max observation, qparams and fake quantization in one torch kernel
    (``torch.fused_moving_avg_obs_fake_quant``), per-tensor or per-channel.

    The observer must be a :class:`~fxquant.observers.MovingAverageMinMaxObserver` or
    :class:`~fxquant.observers.MovingAveragePerChannelMinMaxObserver`; the kernel updates its
    ``min_val`` / ``max_val`` in place. The switches are int64 buffers here (the kernel's type).

    The kernel chooses scale / zero_point itself, in C++, and not with the observer's formula:
    per-tensor results can differ from the observer's ``calculate_qparams`` by an ulp; the
    symmetric per-channel scale is ``max(-min/128, max/127)`` instead of
    ``max(-min, max)/127.5`` (up to 0.4% apart); and symmetry is applied only where the range
    straddles 0 — a channel of one sign gets affine qparams (e.g. zero_point -128). The
    forward reproduces this exactly (values and gradients equal torch.ao's). Unlike torch.ao,
    :meth:`calculate_qparams` returns the qparams the module applies (its ``scale`` /
    ``zero_point``) once it has observed data, so that convert builds the model that was
    trained: torch.ao recomputes them from the observer, and its converted model can then
    differ from the QAT model by several output steps.
    """

    def __init__(
        self,
        observer: Callable[..., nn.Module] = MovingAverageMinMaxObserver,
        quant_min: int = 0,
        quant_max: int = 255,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        if not isinstance(
            self.activation_post_process, (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver)
        ):
            raise TypeError(
                "FusedMovingAvgObsFakeQuantize needs a MovingAverageMinMaxObserver or "
                "MovingAveragePerChannelMinMaxObserver, got "
                f"{type(self.activation_post_process).__name__}; use FakeQuantize for other observers"
            )
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.long))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.long))
        self.is_symmetric_quant: bool = qmath.is_symmetric(self.qscheme)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero_point) the kernel chose and the forward applies; the observer's own
        qparams (``activation_post_process.calculate_qparams()``) before it has seen data."""
        min_val = self.activation_post_process.min_val
        if min_val.numel() == 0 or bool(torch.isinf(min_val).all()):
            return self.activation_post_process.calculate_qparams()
        return self.scale.detach().clone(), self.zero_point.detach().clone()

    def _refresh_qparams(self) -> None:
        # from the observer's statistics (after sync_observers, say); the kernel recomputes
        # them its own way at the next observing forward
        scale, zero_point = self.activation_post_process.calculate_qparams()
        self.scale.resize_(scale.shape).copy_(scale)
        self.zero_point.resize_(zero_point.shape).copy_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        app = self.activation_post_process
        out = torch.fused_moving_avg_obs_fake_quant(
            x,
            self.observer_enabled,
            self.fake_quant_enabled,
            app.min_val,
            app.max_val,
            self.scale,
            self.zero_point,
            app.averaging_constant,
            self.quant_min,
            self.quant_max,
            self.ch_axis,
            self.is_per_channel,
            self.is_symmetric_quant,
        )
        if self.observer_enabled[0] == 1 and app.min_val.numel():
            check_finite(self, app.min_val, app.max_val)  # the kernel observed NaN / inf
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduce_range={self.reduce_range}"


class FixedQParamsFakeQuantize(FakeQuantize):
    """Fake quantization with constant qparams, from a
    :class:`~fxquant.observers.FixedQParamsObserver` factory (sigmoid: 1/256, 0; tanh:
    2/256, 128). ``scale`` / ``zero_point`` are the observer's buffers."""

    def __init__(self, observer: Callable[..., nn.Module]) -> None:
        super().__init__(observer=observer)
        if type(self.activation_post_process) is not FixedQParamsObserver:
            raise TypeError(
                "FixedQParamsFakeQuantize needs a FixedQParamsObserver factory, got "
                f"{type(self.activation_post_process).__name__}"
            )
        if not qmath.is_per_tensor(self.qscheme):
            raise ValueError(f"FixedQParamsFakeQuantize supports per-tensor qschemes only, got {self.qscheme}")
        self.scale = self.activation_post_process.scale
        self.zero_point = self.activation_post_process.zero_point

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point

    def _refresh_qparams(self) -> None:
        pass  # the qparams are the observer's constants


# ----------------------------------------------------------------------------------------
# Model-level switches
# ----------------------------------------------------------------------------------------


def is_fake_quant(module: Any) -> bool:
    return isinstance(module, FakeQuantizeBase)


def fake_quant_modules(model: nn.Module) -> Iterator[tuple[str, FakeQuantizeBase]]:
    """(path, module) of every fake-quant module in ``model`` (the model itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizeBase):
            yield name, module


def enable_observer(model: nn.Module) -> nn.Module:
    """Turn statistics collection on in every fake-quant module of ``model``; returns it.

    Also works as ``model.apply(enable_observer)`` (each call covers a subtree; idempotent).
    """
    for _, fq in fake_quant_modules(model):
        fq.enable_observer()
    return model


def disable_observer(model: nn.Module) -> nn.Module:
    """Freeze the qparams of every fake-quant module of ``model`` (typically for the last
    epochs, and before comparing the QAT model with its converted version)."""
    for _, fq in fake_quant_modules(model):
        fq.disable_observer()
    return model


def enable_fake_quant(model: nn.Module) -> nn.Module:
    """Turn quantize-dequantize on in every fake-quant module of ``model``."""
    for _, fq in fake_quant_modules(model):
        fq.enable_fake_quant()
    return model


def disable_fake_quant(model: nn.Module) -> nn.Module:
    """Let data pass unchanged through every fake-quant module of ``model`` (statistics are
    still collected while the observers are enabled)."""
    for _, fq in fake_quant_modules(model):
        fq.disable_fake_quant()
    return model


def qat_observer_wrapper(factory: Any) -> Any:
    """insert_observers' ``observer_factory_wrapper`` for QAT: a fixed-qparams observer that
    annotate chose for sigmoid / tanh / softmax outputs becomes a FixedQParamsFakeQuantize,
    so training sees the output grid too; every other factory is used as it is."""
    cls, _ = factory_parts(factory)
    if cls is FixedQParamsObserver:
        return FixedQParamsFakeQuantize.with_args(observer=factory)
    return factory


# ----------------------------------------------------------------------------------------
# Defaults (definitions as in PyTorch's fake_quantize module)
# ----------------------------------------------------------------------------------------

default_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
    qscheme=torch.per_tensor_affine, reduce_range=True,
)
"""Activations: quint8 with reduce_range (effective 0..127), moving-average min/max."""

default_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
    qscheme=torch.per_tensor_symmetric, reduce_range=False,
)
"""Weights: qint8 per-tensor symmetric."""

default_dynamic_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, is_dynamic=True,
    dtype=torch.quint8, averaging_constant=1,
)

default_fixed_qparams_range_neg1to1_fake_quant = FixedQParamsFakeQuantize.with_args(
    observer=default_fixed_qparams_range_neg1to1_observer
)
default_fixed_qparams_range_0to1_fake_quant = FixedQParamsFakeQuantize.with_args(
    observer=default_fixed_qparams_range_0to1_observer
)
default_symmetric_fixed_qparams_fake_quant = default_fixed_qparams_range_neg1to1_fake_quant
default_affine_fixed_qparams_fake_quant = default_fixed_qparams_range_0to1_fake_quant

default_per_channel_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, reduce_range=False, ch_axis=0,
)
"""Weights: qint8 per-channel (axis 0) symmetric."""

default_embedding_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, qscheme=torch.per_channel_affine_float_qparams,
    dtype=torch.quint8, quant_min=0, quant_max=255, ch_axis=0, averaging_constant=1,
)
default_embedding_fake_quant_4bit = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, qscheme=torch.per_channel_affine_float_qparams,
    ch_axis=0, dtype=torch.quint4x2, averaging_constant=1,
)

default_histogram_fake_quant = FakeQuantize.with_args(
    observer=HistogramObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
    qscheme=torch.per_tensor_affine, reduce_range=True,
)

default_fused_act_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
)
"""Fused version of activations' fake quant (quint8 0..255, no reduce_range)."""

default_fused_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
    qscheme=torch.per_tensor_symmetric,
)
default_fused_per_channel_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
    dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
)
fused_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8,
    qscheme=torch.per_tensor_symmetric, eps=2**-12,
)
fused_per_channel_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127,
    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, eps=2**-12,
)

default_qat_qconfig = QConfig(activation=default_fake_quant, weight=default_weight_fake_quant)


# ----------------------------------------------------------------------------------------
# Default QAT qconfigs and mappings
# ----------------------------------------------------------------------------------------


def _act_fake_quant(fused: bool, reduce_range: bool | None) -> ObserverFactory:
    cls = FusedMovingAvgObsFakeQuantize if fused else FakeQuantize
    kwargs: dict[str, Any] = {"observer": MovingAverageMinMaxObserver, "quant_min": 0, "quant_max": 255}
    if reduce_range is not None:
        kwargs["reduce_range"] = reduce_range
    return cls.with_args(**kwargs)


def get_default_qat_qconfig(backend: str = DEFAULT_BACKEND, version: int = 1, *,
                            reduce_range: bool | None = None) -> QConfig:
    """The default QAT qconfig of a backend, as torch.ao's ``get_default_qat_qconfig`` except
    for the activation range, which follows the CPU as the PTQ default does
    (:func:`fxquant.qconfig.activation_range`):

    version 1 (default) uses the fused moving-average fake quant; version 0 the unfused one:

    * activations quint8 0..255, with ``reduce_range`` (effective 0..127) where the backend's
      kernels would saturate full-range input on this CPU (fbgemm / x86 / onednn without VNNI),
      without it elsewhere (qnnpack; VNNI / AMX CPUs). ``reduce_range=`` pins the choice;
    * weights qint8 per-channel symmetric (fbgemm, x86, onednn), per-tensor symmetric
      -128..127 on qnnpack (``Backend.per_channel_weights``).

    All observe with moving-average min/max (averaging constant 0.01).
    """
    policy = backend_policy(backend)
    if version not in (0, 1):
        raise ValueError(f"get_default_qat_qconfig: version must be 0 or 1, got {version!r}")
    fused = version == 1
    reduce_range = activation_range(policy.name, reduce_range).reduce_range
    if policy.per_channel_weights:
        weight = default_fused_per_channel_wt_fake_quant if fused else default_per_channel_weight_fake_quant
    else:
        weight = default_fused_wt_fake_quant if fused else default_weight_fake_quant
    return QConfig(activation=_act_fake_quant(fused, reduce_range), weight=weight)


def get_default_qat_qconfig_mapping(backend: str = AUTO, version: int = 1, *,
                                    reduce_range: bool | None = None) -> QConfigMapping:
    """The default QAT QConfigMapping of a backend, as torch.ao builds it: global
    ``get_default_qat_qconfig(backend, version, reduce_range=reduce_range)`` (activation range
    as this CPU allows; ``mapping.activation_range`` says which and why), plus ``"reshape"`` reusing its input's
    qparams, transposed convs with per-tensor weight fake quant on fbgemm/x86, layer_norm with
    a float weight, PReLU with :data:`~fxquant.qconfig.default_quint8_weight_qconfig` (as torch),
    and FixedQParamsFakeQuantize for sigmoid / hardsigmoid / softmax / tanh.
    ``mapping.backend`` records the resolved backend."""
    policy = backend_policy(backend)
    backend = policy.name
    qconfig = get_default_qat_qconfig(backend, version, reduce_range=reduce_range)
    transpose = QConfig(qconfig.activation, default_weight_fake_quant) if policy.per_tensor_conv_transpose else qconfig
    layernorm = QConfig(qconfig.activation, default_placeholder_observer)
    mapping = QConfigMapping().set_global(qconfig).set_object_type("reshape", default_reuse_input_qconfig)
    for op in CONV_TRANSPOSE_TYPES:
        mapping.set_object_type(op, transpose)
    mapping.set_object_type(torch.nn.functional.layer_norm, layernorm).set_object_type(nn.LayerNorm, layernorm)
    mapping.set_object_type(nn.PReLU, default_quint8_weight_qconfig)
    fixed: dict[ObserverFactory, QConfig] = {}
    for op, observer in FIXED_QPARAMS_OP_TO_OBSERVER.items():
        if observer not in fixed:
            fixed[observer] = QConfig(FixedQParamsFakeQuantize.with_args(observer=observer), default_weight_fake_quant)
        mapping.set_object_type(op, fixed[observer])
    mapping.backend = backend
    mapping.activation_range = activation_range(backend, reduce_range)
    return mapping
