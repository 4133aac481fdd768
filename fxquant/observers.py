"""Observer modules: record statistics of tensors during calibration, then compute qparams.

Every observer has the constructor arguments, attributes, buffers and numerics of the
PyTorch observer of the same name (``calculate_qparams`` is bit-identical on
the same inputs); the arithmetic itself lives in :mod:`fxquant.qmath`. Observers never change
data: ``forward(x)`` returns ``x`` itself. One difference in calling them: the arguments all
uniform observers share (:class:`UniformObserverArgs`: dtype, qscheme, reduce_range, ...) are
keyword-only after an observer's own leading ones (``ch_axis``, ``bins``,
``averaging_constant``), where torch also takes them by position
(:class:`UniformQuantizationObserverBase` says why).

Bad data is refused where torch would silently compute garbage: a batch with NaN (every
observer) or with infinities (min/max observers; the histogram observer ignores them, as torch
does, with a :class:`~fxquant.errors.CalibrationWarning`) raises
:class:`~fxquant.errors.CalibrationDataError` before the statistics change. The error names the
observed node when the observer was labelled with its :class:`ObserverSite` (prepare does it).

Common attributes: ``dtype``, ``qscheme``, ``quant_min``, ``quant_max``, ``reduce_range``
(False where it does not apply), ``is_dynamic``; per-channel observers add ``ch_axis``.

Statistics buffers (in ``state_dict``; what a distributed ``all_reduce`` would combine):

=====================================  =========================  ===========================
observer                               buffers                    how replicas would combine
=====================================  =========================  ===========================
MinMaxObserver                         min_val, max_val (0-dim)   elementwise MIN / MAX
PerChannelMinMaxObserver               min_val, max_val [C]       elementwise MIN / MAX
MovingAverage(PerChannel)MinMaxObs.    min_val, max_val           AVG (approximate: an EMA)
HistogramObserver                      histogram [bins],          re-bin each replica onto the
                                       min_val, max_val (0-dim)   union range (combine_histograms)
                                                                  then SUM
Percentile / MSE / Entropy Observer    as HistogramObserver       as HistogramObserver
FixedQParamsObserver                   scale [1], zero_point [1]  constant
=====================================  =========================  ===========================

Calibration methods (docs/calibration.md): PercentileObserver, MSEObserver and EntropyObserver
are histogram observers with their own clipping-range search (:mod:`fxquant.qmath`); select
them per op in a QConfig or with ``get_default_qconfig_mapping(backend, calibration=...)``
(:data:`CALIBRATION_METHODS`). Min/max and histogram observers also keep, outside the
state_dict, a small sorted sample of the values seen (``range_sample``) and the histogram ones
the count of infinities they ignored (``ignored_infinities``): convert's range check
(:mod:`fxquant.range_check`) reads them.

Uniform observers also hold ``eps`` (shape [1]) as a buffer, like torch, so state dicts are
interchangeable with torch.ao's.

Factories: ``SomeObserver.with_args(**kwargs)`` returns an :class:`ObserverFactory` — a
picklable, comparable recipe; call it to build a fresh observer, chain ``.with_args`` on it.
"""

from __future__ import annotations

import functools
import warnings
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import torch
from torch import nn

from fxquant import qmath
from fxquant.errors import CalibrationDataError, CalibrationWarning

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "FixedQParamsObserver",
    "CALIBRATION_METHODS",
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "PercentileObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "NoopObserver",
    "ObserverBase",
    "ObserverFactory",
    "PerChannelMinMaxObserver",
    "PlaceholderObserver",
    "ReuseInputObserver",
    "UniformObserverArgs",
    "UniformQuantizationObserverBase",
    "default_dynamic_quant_observer",
    "default_fixed_qparams_range_0to1_observer",
    "default_fixed_qparams_range_neg1to1_observer",
    "default_float_qparams_observer",
    "default_float_qparams_observer_4bit",
    "default_histogram_observer",
    "default_observer",
    "default_per_channel_weight_observer",
    "default_placeholder_observer",
    "default_reuse_input_observer",
    "default_weight_observer",
    "ObserverSite",
    "factory_parts",
    "label_observer",
    "per_channel_weight_observer_range_neg_127_to_127",
    "weight_observer_range_neg_127_to_127",
]

_FLOAT32_EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------


class ObserverFactory:
    """A recipe for observers: a class plus constructor keyword arguments.

    ``factory()`` builds a fresh instance (keyword overrides allowed), ``factory.with_args(...)``
    returns a new factory with more/overridden arguments, ``with_callable_args(name=fn)`` defers
    an argument to ``fn()`` evaluated at each construction (e.g. a device). Factories pickle,
    compare equal when class and arguments are equal, and print as the code that made them.
    """

    def __init__(
        self,
        cls: Callable[..., nn.Module],
        kwargs: dict[str, Any] | None = None,
        callable_kwargs: dict[str, Callable[[], Any]] | None = None,
    ) -> None:
        if not callable(cls):
            raise TypeError(f"ObserverFactory needs an observer class or callable, got {cls!r}")
        self._cls = cls
        self._kwargs = dict(kwargs or {})
        self._callable_kwargs = dict(callable_kwargs or {})

    @property
    def cls(self) -> Callable[..., nn.Module]:
        return self._cls

    @property
    def kwargs(self) -> dict[str, Any]:
        """A copy of the fixed constructor arguments."""
        return dict(self._kwargs)

    @property
    def callable_kwargs(self) -> dict[str, Callable[[], Any]]:
        return dict(self._callable_kwargs)

    @property
    def p(self) -> functools.partial:
        """The fixed part as a functools.partial, for code written against torch.ao's
        ``_PartialWrapper.p``."""
        return functools.partial(self._cls, **self._kwargs)

    def __call__(self, *args: Any, **overrides: Any) -> nn.Module:
        kwargs = dict(self._kwargs)
        for name, make in self._callable_kwargs.items():
            if name not in overrides:
                kwargs[name] = make()
        kwargs.update(overrides)
        return self._cls(*args, **kwargs)

    def with_args(self, **kwargs: Any) -> ObserverFactory:
        deferred = {k: v for k, v in self._callable_kwargs.items() if k not in kwargs}
        return ObserverFactory(self._cls, {**self._kwargs, **kwargs}, deferred)

    def with_callable_args(self, **kwargs: Callable[[], Any]) -> ObserverFactory:
        fixed = {k: v for k, v in self._kwargs.items() if k not in kwargs}
        return ObserverFactory(self._cls, fixed, {**self._callable_kwargs, **kwargs})

    def __repr__(self) -> str:
        name = getattr(self._cls, "__name__", repr(self._cls))
        text = f"{name}.with_args({', '.join(f'{k}={v!r}' for k, v in self._kwargs.items())})"
        if self._callable_kwargs:
            deferred = ", ".join(f"{k}={v!r}" for k, v in self._callable_kwargs.items())
            text += f".with_callable_args({deferred})"
        return text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ObserverFactory):
            return NotImplemented
        return (
            self._cls is other._cls
            and self._kwargs == other._kwargs
            and self._callable_kwargs == other._callable_kwargs
        )

    def __hash__(self) -> int:
        return hash((self._cls, frozenset(self._kwargs), frozenset(self._callable_kwargs)))


def factory_parts(factory: Any) -> tuple[Any, dict[str, Any]]:
    """(class, kwargs) of an observer factory: ours, a bare class, functools.partial, or a
    torch.ao ``_PartialWrapper`` (duck-typed: it holds a partial in ``.p``)."""
    if isinstance(factory, ObserverFactory):
        return factory.cls, factory.kwargs
    partial = getattr(factory, "p", factory)
    if hasattr(partial, "func") and hasattr(partial, "keywords"):
        func, kwargs = factory_parts(partial.func)
        return func, {**kwargs, **partial.keywords}
    return factory, {}


# ----------------------------------------------------------------------------------------
# Where an observer sits: so that bad calibration data names the node, not just the observer
# ----------------------------------------------------------------------------------------


class ObserverSite(NamedTuple):
    """The observer's attribute path in the prepared model, and the node it observes with
    that node's module path and source line (set after prepare by
    :func:`fxquant.validate.label_observers`; empty for a free-standing observer)."""

    observer: str = ""
    node: str = ""
    module_path: str = ""
    source: str = ""

    def describe(self) -> str:
        """`` activation_post_process_2 (observing node 'conv1')`` or ``""``."""
        text = f" {self.observer}" if self.observer else ""
        return text + (f" (observing node '{self.node}')" if self.node else "")


def label_observer(module: nn.Module, site: ObserverSite) -> None:
    """Tell an observer (or fake-quant module, and the observer inside it) where it sits."""
    module.fxquant_site = site
    inner = getattr(module, "activation_post_process", None)
    if isinstance(inner, nn.Module) and inner is not module:
        inner.fxquant_site = site


def site_of(module: nn.Module) -> ObserverSite:
    site = getattr(module, "fxquant_site", None)
    return site if isinstance(site, ObserverSite) else ObserverSite()


def non_finite_error(module: nn.Module, what: str, hint: str = "") -> CalibrationDataError:
    """The error for NaN / infinite data (``what``: "NaN" or "infinity") seen by ``module``,
    naming its node and the fixes."""
    site = site_of(module)
    result = "NaN" if what == "NaN" else "infinite"
    keep_float = (f"qconfig_mapping.set_module_name({site.module_path!r}, None)"
                  if site.module_path else "a None qconfig for that op")
    hint = hint or (f"check the data and the float model for {what} (torch.isfinite) on the same "
                    f"batch; or keep the op float with {keep_float}")
    return CalibrationDataError(
        f"{type(module).__name__}{site.describe()} saw {what} in the data it observes: the "
        f"quantization range would be {result} and every scale meaningless",
        node_name=site.node, module_path=site.module_path, source=site.source, hint=hint)


def check_finite(module: nn.Module, cur_min: torch.Tensor, cur_max: torch.Tensor) -> None:
    """Raise :class:`CalibrationDataError` unless the batch's min and max are finite (a NaN
    anywhere in the batch makes them NaN). Checked before the statistics are updated."""
    if bool(torch.isfinite(cur_min).all()) and bool(torch.isfinite(cur_max).all()):
        return
    if bool(torch.isnan(cur_min).any()) or bool(torch.isnan(cur_max).any()):
        raise non_finite_error(module, "NaN")
    raise non_finite_error(
        module, "infinity",
        hint="check the data and the float model for infinities on the same batch; a "
             "HistogramObserver ignores infinite values (with a CalibrationWarning) where they "
             "are expected, e.g. -inf attention masks")


# ----------------------------------------------------------------------------------------
# Bases
# ----------------------------------------------------------------------------------------


class WithArgs:
    """``with_args`` / ``with_callable_args`` of observers and fake-quant modules."""

    @classmethod
    def with_args(cls, **kwargs: Any) -> ObserverFactory:
        """A picklable factory building ``cls(**kwargs)`` on each call."""
        return ObserverFactory(cls, kwargs)

    @classmethod
    def with_callable_args(cls, **kwargs: Callable[[], Any]) -> ObserverFactory:
        """A factory evaluating each ``fn`` at construction: ``cls(name=fn(), ...)``."""
        return ObserverFactory(cls, None, kwargs)


class SavedShapeBuffers:
    """Loads a state dict into buffers that start empty or with one element (per-channel
    statistics or qparams): ``_SAVED_SHAPE_BUFFERS`` are resized to the saved shapes first,
    so that loading can copy into them."""

    _SAVED_SHAPE_BUFFERS: tuple[str, ...] = ()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        resize_to_saved(self, state_dict, prefix, self._SAVED_SHAPE_BUFFERS)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def resize_to_saved(module: Any, state_dict: dict[str, Any], prefix: str,
                    names: tuple[str, ...]) -> None:
    """Give ``module``'s buffers ``names`` the shapes they have in ``state_dict`` (per-channel
    buffers start empty or with one element), so that loading can copy into them."""
    for name in names:
        if prefix + name in state_dict:
            getattr(module, name).resize_(state_dict[prefix + name].shape)


class ObserverBase(WithArgs, nn.Module, metaclass=ABCMeta):
    """Base of all observers: ``forward`` records statistics and returns its input unchanged,
    ``calculate_qparams`` turns the statistics into (scale, zero_point)."""

    def __init__(self, dtype: torch.dtype, is_dynamic: bool = False) -> None:
        super().__init__()
        self.dtype = dtype
        self.is_dynamic = is_dynamic
        self.qscheme: torch.qscheme | None = torch.per_tensor_affine
        self.quant_min: int | None = None
        self.quant_max: int | None = None
        self.reduce_range = False
        self.fxquant_site = ObserverSite()

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def _require_qscheme(observer: str, qscheme: Any, allowed: tuple[torch.qscheme, ...]) -> None:
    if qscheme not in allowed:
        raise ValueError(f"{observer} supports qscheme in {allowed}, got {qscheme}")


def _reject_dynamic(observer: str, is_dynamic: bool) -> None:
    if is_dynamic:
        raise ValueError(
            f"{observer} does not support dynamic quantization (is_dynamic=True); use "
            "PlaceholderObserver(dtype=..., is_dynamic=True) for dynamic activations"
        )


def _reject_symmetric_reduced_quint8(observer: str, qscheme: Any, dtype: Any, reduce_range: bool) -> None:
    if qscheme in qmath.SYMMETRIC_QSCHEMES and reduce_range and dtype == torch.quint8:
        raise ValueError(
            f"{observer}: reduce_range=True is not supported for symmetric quint8 "
            "quantization; use reduce_range=False or an explicit quant_min/quant_max"
        )


class UniformObserverArgs(TypedDict, total=False):
    """The keyword arguments every uniform observer shares (torch's names and meanings):
    declared here once, so that the subclasses take ``**kwargs: Unpack[UniformObserverArgs]``
    after their own leading parameters and stay typed. The defaults are
    :class:`UniformQuantizationObserverBase`'s (per-channel observers default ``qscheme`` to
    ``per_channel_affine``)."""

    dtype: torch.dtype
    qscheme: torch.qscheme
    reduce_range: bool
    quant_min: int | None
    quant_max: int | None
    factory_kwargs: dict[str, Any] | None
    eps: float
    is_dynamic: bool
    signed_by_range: bool


class UniformQuantizationObserverBase(ObserverBase):
    """Base of the observers with a uniform integer grid: holds qscheme, the effective
    [quant_min, quant_max] (see :func:`fxquant.qmath.quant_range`) and ``eps``, the floor of
    the scale (a buffer, as in torch). ``has_customized_qrange`` records whether the range was
    given explicitly (it moves the symmetric quint8 zero point to the range midpoint).

    ``signed_by_range`` (a symmetric qscheme on an unsigned 8-bit dtype only): the grid's
    sign follows the observed range, as OpenVINO / NNCF quantize activations: a tensor whose
    minimum is >= 0 gets zero point 0 (all levels for its non-negative values, what the
    affine qscheme gives it), any other the symmetric range's midpoint (128: the values of a
    signed int8 grid with zero point 0). Without it a symmetric quint8 ReLU output wastes
    half its levels; with it every zero point is 0 or the midpoint, which an engine reads as
    uint8 / int8 with zero point 0 (fxquant.compile(backend="openvino") does).

    Subclasses say which qschemes they take (``_QSCHEMES``) and whether they allow
    ``is_dynamic=True`` (``_DYNAMIC``), and register their statistics in ``_init_statistics``.

    The constructor parameters shared by all uniform observers (:class:`UniformObserverArgs`)
    are spelled out, with their defaults, only here. A subclass declares its own leading
    parameters (``ch_axis``, ``bins``, ``averaging_constant``, ``percentile``) and forwards
    the rest as ``**kwargs``: there the shared ones are keyword-only. torch also lets them be
    passed by position, in an order that differs between its observers (``factory_kwargs``
    before or after ``eps``); keyword-only avoids that trap, and every factory
    (``with_args``) passes keywords anyway. :class:`MinMaxObserver` uses this constructor
    as is, so its parameters keep torch's positional order. An unknown keyword raises
    ``TypeError`` naming it (this constructor takes no ``**kwargs``)."""

    eps: torch.Tensor
    _version = 3  # torch.ao's state-dict version for these buffers: state dicts interoperate
    _QSCHEMES: tuple[torch.qscheme, ...] = qmath.SUPPORTED_QSCHEMES
    _DYNAMIC = True

    def __init__(self, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None,
                 factory_kwargs: dict[str, Any] | None = None, eps: float = _FLOAT32_EPS,
                 is_dynamic: bool = False, signed_by_range: bool = False) -> None:
        name = type(self).__name__
        _require_qscheme(name, qscheme, self._QSCHEMES)
        if signed_by_range and (qscheme not in qmath.SYMMETRIC_QSCHEMES
                                or dtype not in (torch.quint8, torch.uint8)):
            raise ValueError(f"{name}: signed_by_range=True needs a symmetric qscheme and an "
                             f"unsigned 8-bit dtype (quint8), got {qscheme} and {dtype}")
        if not self._DYNAMIC:
            _reject_dynamic(name, is_dynamic)
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self.qscheme = qscheme
        self.signed_by_range = bool(signed_by_range)
        self.reduce_range = reduce_range
        self.has_customized_qrange = quant_min is not None and quant_max is not None
        self.quant_min, self.quant_max = qmath.quant_range(dtype, quant_min, quant_max, reduce_range)
        fk = torch.nn.factory_kwargs(factory_kwargs)
        self.register_buffer("eps", torch.tensor([eps], **fk))
        self._init_statistics(fk)

    def _init_statistics(self, fk: dict[str, Any]) -> None:
        """Register the statistics buffers (``fk``: their dtype / device)."""

    def _check_symmetric_range(self) -> None:
        _reject_symmetric_reduced_quint8(type(self).__name__, self.qscheme, self.dtype, self.reduce_range)

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qscheme = self.qscheme
        if getattr(self, "signed_by_range", False) and qmath.has_observed(min_val, max_val) \
                and bool((min_val >= 0).all()):
            # non-negative: the unsigned grid from zero point 0 (the affine qparams of [0, max])
            qscheme = torch.per_tensor_affine if qscheme == torch.per_tensor_symmetric \
                else torch.per_channel_affine
        return qmath.calculate_qparams(
            min_val,
            max_val,
            dtype=self.dtype,
            qscheme=qscheme,
            quant_min=self.quant_min,
            quant_max=self.quant_max,
            eps=self.eps,
            custom_range=self.has_customized_qrange,
        )

    def _config_repr(self) -> str:
        signed = ", signed_by_range=True" if getattr(self, "signed_by_range", False) else ""
        return f"dtype={self.dtype}, qscheme={self.qscheme}, quant_range=({self.quant_min}, {self.quant_max}){signed}"

    def reset_min_max_vals(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no min/max statistics to reset")


# ----------------------------------------------------------------------------------------
# Min/max observers
# ----------------------------------------------------------------------------------------


class MinMaxObserver(UniformQuantizationObserverBase):
    """Per-tensor running min / max (buffers ``min_val``, ``max_val``; start at +inf / -inf)."""

    min_val: torch.Tensor
    max_val: torch.Tensor
    _QSCHEMES = qmath.PER_TENSOR_QSCHEMES

    def _init_statistics(self, fk: dict[str, Any]) -> None:
        self.register_buffer("min_val", torch.tensor(float("inf"), **fk))
        self.register_buffer("max_val", torch.tensor(float("-inf"), **fk))
        self._check_symmetric_range()
        # A small sorted sample of the values seen (not in the state_dict): the range check
        # of convert uses it to tell a bulk from a few far values (fxquant.range_check).
        self.range_sample: torch.Tensor | None = None

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().to(self.min_val.dtype)
        cur_min, cur_max = torch.aminmax(x)
        check_finite(self, cur_min, cur_max)
        new_min, new_max = self._combine(cur_min, cur_max)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)
        self.range_sample = update_range_sample(self.range_sample, x)
        return x_orig

    def _combine(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics after a batch with ``cur_min`` / ``cur_max``: the running min / max."""
        return torch.min(cur_min, self.min_val), torch.max(cur_max, self.max_val)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._calculate_qparams(self.min_val, self.max_val)

    def extra_repr(self) -> str:
        return f"{self._config_repr()}, min_val={self.min_val}, max_val={self.max_val}"

    def reset_min_max_vals(self) -> None:
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.range_sample = None


RANGE_SAMPLE_SIZE = 4096
"""How many values a min/max observer keeps as its sample for the range check."""


def update_range_sample(sample: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``sample`` (sorted) merged with an evenly strided pick of up to RANGE_SAMPLE_SIZE / 4
    values of ``x``; when it outgrows RANGE_SAMPLE_SIZE every other order statistic is kept,
    so it stays an unbiased sketch of the distribution (its quantiles) at a fixed cost."""
    flat = x.reshape(-1)
    pick = flat[:: max(1, flat.numel() // (RANGE_SAMPLE_SIZE // 4))][: RANGE_SAMPLE_SIZE // 4]
    merged = pick.float().cpu() if sample is None else torch.cat([sample, pick.float().cpu()])
    merged = merged.sort().values
    while merged.numel() > RANGE_SAMPLE_SIZE:
        merged = merged[::2]
    return merged


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Per-tensor exponential moving average of min / max:
    ``v <- v + averaging_constant * (current - v)`` after the first batch."""

    def __init__(self, averaging_constant: float = 0.01, **kwargs: Unpack[UniformObserverArgs]) -> None:
        if kwargs.get("is_dynamic", False) and averaging_constant != 1:
            raise ValueError(
                "MovingAverageMinMaxObserver supports is_dynamic=True only with "
                f"averaging_constant=1, got {averaging_constant}"
            )
        super().__init__(**kwargs)
        self.averaging_constant = averaging_constant

    def _combine(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val == float("inf") and self.max_val == float("-inf"):
            return cur_min, cur_max
        return _moving_average(self, cur_min, cur_max)

    def extra_repr(self) -> str:
        return f"averaging_constant={self.averaging_constant}, {super().extra_repr()}"


def _moving_average(observer: Any, cur_min: torch.Tensor, cur_max: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``v + averaging_constant * (current - v)`` for the observer's min_val and max_val."""
    c = observer.averaging_constant
    min_val, max_val = observer.min_val, observer.max_val
    return min_val + c * (cur_min - min_val), max_val + c * (cur_max - max_val)


def _channel_rows(x: torch.Tensor, ch_axis: int, observer: str) -> torch.Tensor:
    """View `x` as [channels, everything else] (channel axis moved to the front)."""
    if x.dim() < 2:
        raise ValueError(
            f"{observer} needs an input with at least 2 dims (channels and values), got shape "
            f"{tuple(x.shape)}; use a per-tensor observer for 0-/1-dim tensors"
        )
    if not -x.dim() <= ch_axis < x.dim():
        raise ValueError(f"{observer}: ch_axis={ch_axis} is out of range for an input of shape {tuple(x.shape)}")
    axes = list(range(x.dim()))
    axes[ch_axis], axes[0] = 0, ch_axis
    return torch.flatten(x.permute(axes), start_dim=1)


class PerChannelMinMaxObserver(SavedShapeBuffers, UniformQuantizationObserverBase):
    """Running min / max per channel along ``ch_axis`` (buffers ``min_val``, ``max_val``: empty
    until the first batch, then shape [C])."""

    min_val: torch.Tensor
    max_val: torch.Tensor

    _QSCHEMES = qmath.PER_CHANNEL_QSCHEMES
    _DYNAMIC = False
    _SAVED_SHAPE_BUFFERS = ("min_val", "max_val")  # empty until the first batch

    def __init__(self, ch_axis: int = 0, **kwargs: Unpack[UniformObserverArgs]) -> None:
        kwargs.setdefault("qscheme", torch.per_channel_affine)  # torch's per-channel default
        super().__init__(**kwargs)
        self.ch_axis = ch_axis

    def _init_statistics(self, fk: dict[str, Any]) -> None:
        self.register_buffer("min_val", torch.tensor([], **fk))
        self.register_buffer("max_val", torch.tensor([], **fk))
        self._check_symmetric_range()

    def _rows(self, x_orig: torch.Tensor) -> torch.Tensor:
        rows = _channel_rows(x_orig.detach(), self.ch_axis, type(self).__name__).to(self.min_val.dtype)
        if self.min_val.numel() not in (0, rows.shape[0]):
            site = site_of(self)
            raise CalibrationDataError(
                f"{type(self).__name__}{site.describe()} saw {rows.shape[0]} channels along axis "
                f"{self.ch_axis} but has statistics for {self.min_val.numel()}",
                node_name=site.node, module_path=site.module_path, source=site.source,
                hint="one observer per tensor shape: calibrate with inputs of the same channel "
                     "count, or call reset_min_max_vals()")
        return rows

    def _store(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        self.min_val.resize_(min_val.shape)
        self.max_val.resize_(max_val.shape)
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        rows = self._rows(x_orig)
        cur_min, cur_max = torch.aminmax(rows, dim=1)
        check_finite(self, cur_min, cur_max)
        if self.min_val.numel() == 0 or self.max_val.numel() == 0:
            self._store(cur_min, cur_max)
        else:
            self._store(*self._combine(cur_min, cur_max))
        return x_orig

    _combine = MinMaxObserver._combine

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._calculate_qparams(self.min_val, self.max_val)

    def extra_repr(self) -> str:
        return f"ch_axis={self.ch_axis}, {self._config_repr()}, min_val={self.min_val}, max_val={self.max_val}"

    def reset_min_max_vals(self) -> None:
        fk = {"dtype": self.min_val.dtype, "device": self.min_val.device}
        self.min_val = torch.empty(0, **fk)
        self.max_val = torch.empty(0, **fk)



class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """Per-channel exponential moving average of min / max."""

    def __init__(self, averaging_constant: float = 0.01, ch_axis: int = 0,
                 **kwargs: Unpack[UniformObserverArgs]) -> None:
        super().__init__(ch_axis, **kwargs)
        self.averaging_constant = averaging_constant

    _combine = _moving_average

    def extra_repr(self) -> str:
        return f"averaging_constant={self.averaging_constant}, {super().extra_repr()}"


# ----------------------------------------------------------------------------------------
# Histogram observer
# ----------------------------------------------------------------------------------------


class HistogramObserver(UniformQuantizationObserverBase):
    """Running histogram (``bins`` equal bins over [min_val, max_val]); qparams come from the
    L2-minimizing clipping range (:func:`fxquant.qmath.histogram_search_range`).

    When a batch widens the range, the old histogram is re-binned onto the new range
    (``upsample_rate`` sub-bins per bin) and added to the new batch's histogram. Infinite
    values are ignored with a :class:`~fxquant.errors.CalibrationWarning` (as torch ignores
    them); NaN raises :class:`~fxquant.errors.CalibrationDataError`.
    """

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    _QSCHEMES = qmath.PER_TENSOR_QSCHEMES
    _DYNAMIC = False

    def __init__(self, bins: int = 2048, **kwargs: Unpack[UniformObserverArgs]) -> None:
        super().__init__(**kwargs)
        if int(bins) < 1:
            raise ValueError(f"HistogramObserver needs bins >= 1, got {bins}")
        fk = torch.nn.factory_kwargs(kwargs.get("factory_kwargs"))
        self.bins = int(bins)
        self.register_buffer("histogram", torch.zeros(self.bins, **fk))
        self.register_buffer("min_val", torch.tensor(float("inf"), **fk))
        self.register_buffer("max_val", torch.tensor(float("-inf"), **fk))
        self.dst_nbins = qmath.dst_nbins(self.dtype)
        self.upsample_rate = 16
        # how many infinite values were dropped (not in the state_dict): the range check of
        # convert keeps such a tensor (a -inf mask) float, as quantizing would clamp them
        self.ignored_infinities = 0
        self.range_sample: torch.Tensor | None = None  # as MinMaxObserver's

    def _set(self, name: str, value: torch.Tensor) -> None:
        buffer = getattr(self, name)
        buffer.detach_().resize_(value.shape)
        buffer.copy_(value)

    def _finite(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(x, min, max) with infinite values dropped (and a warning), or None if none are left."""
        x_min, x_max = torch.aminmax(x)
        if bool(torch.isnan(x_min)) or bool(torch.isnan(x_max)):
            raise non_finite_error(self, "NaN")
        if x_min == -torch.inf or x_max == torch.inf:
            site = site_of(self)
            warnings.warn(f"HistogramObserver{site.describe()}: ignoring infinite values in the input"
                          + (f" (module {site.module_path!r})" if site.module_path else ""),
                          CalibrationWarning, stacklevel=3)
            finite = x.abs() != torch.inf
            self.ignored_infinities += int(finite.numel() - int(finite.sum()))
            x = x[finite]
            if x.numel() == 0:
                return None
            x_min, x_max = torch.aminmax(x)
        return x, x_min, x_max

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        finite = self._finite(x_orig.detach())
        if finite is None:
            return x_orig
        x, x_min, x_max = finite
        self.range_sample = update_range_sample(self.range_sample, x)
        if self.min_val == float("inf") or self.max_val == float("-inf"):
            self._set("min_val", x_min)
            self._set("max_val", x_max)
            self._set("histogram", torch.histc(x, self.bins, min=x_min, max=x_max))
            return x_orig
        self._accumulate(x, x_min, x_max)
        return x_orig

    def _accumulate(self, x: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor) -> None:
        cur_min, cur_max = self.min_val, self.max_val
        new_min = torch.min(cur_min, x_min).detach()
        new_max = torch.max(cur_max, x_max).detach()
        update = torch.histc(x, self.bins, min=new_min, max=new_max).to(self.histogram.device)
        if new_min == cur_min and new_max == cur_max:
            self._set("histogram", self.histogram + update)
            return
        combined = qmath.combine_histograms(
            self.histogram, cur_min, cur_max, update, new_min, new_max, self.upsample_rate
        )
        self._set("histogram", combined)
        self._set("min_val", new_min)
        self._set("max_val", new_max)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val == float("inf") and self.max_val == float("-inf"):
            warnings.warn(
                f"{type(self).__name__} has seen no data; returning scale=1.0, zero_point=0",
                UserWarning,
                stacklevel=2,
            )
            return qmath.default_qparams(self.min_val.device)
        new_min, new_max = self.clipping_range()
        return self._calculate_qparams(new_min, new_max)

    def clipping_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range [new_min, new_max] the qparams cover (inside the observed one): the
        method's search over the histogram. Needs data."""
        if self.histogram.numel() != self.bins:
            raise ValueError(
                f"{type(self).__name__} has a histogram of {self.histogram.numel()} bins but "
                f"bins={self.bins}; load a state dict saved with the same number of bins"
            )
        return self._search_range()

    def _search_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qmath.histogram_search_range(self.histogram, self.min_val, self.max_val, self.dst_nbins)

    def _levels(self) -> int:
        """Number of integer levels of the grid (quant_max - quant_min + 1)."""
        return int(self.quant_max) - int(self.quant_min) + 1

    def reset_min_max_vals(self) -> None:
        """Forget all statistics (histogram and range)."""
        self.histogram.zero_()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.ignored_infinities = 0
        self.range_sample = None

    def extra_repr(self) -> str:
        count = float(self.histogram.sum())
        return f"bins={self.bins}, {self._config_repr()}, min_val={self.min_val}, max_val={self.max_val}, count={count:g}"


class PercentileObserver(HistogramObserver):
    """Histogram observer whose range is cut at the ``percentile``-th percentile on each side:
    [q(1 - p/100), q(p/100)] of the values seen (default 99.99: the 0.01% most extreme values
    on each side saturate). A tail of one sign only (ReLU outputs) keeps its bound at 0.

    Use it for activations with rare outliers (ONNX Runtime's and NNCF's "percentile"
    calibration). Buffers, state_dict, NaN / infinity handling: as :class:`HistogramObserver`.
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048,
                 **kwargs: Unpack[UniformObserverArgs]) -> None:
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"PercentileObserver needs 50 < percentile <= 100, got {percentile}")
        super().__init__(bins, **kwargs)
        self.percentile = float(percentile)

    def _search_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qmath.histogram_percentile_range(self.histogram, self.min_val, self.max_val, self.percentile)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, {super().extra_repr()}"


class MSEObserver(HistogramObserver):
    """Histogram observer whose range minimizes the expected quantization MSE: rounding noise
    (step**2 / 12) of the values inside the range plus the squared saturation error of those
    outside it, searched exhaustively over the histogram's bin edges for each bound
    (:func:`fxquant.qmath.histogram_mse_range`). Unlike :class:`HistogramObserver`'s greedy
    search it does not stop at the first local minimum. Use it when outliers are neither rare
    enough for a percentile nor meaningful enough to keep."""

    def _search_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qmath.histogram_mse_range(self.histogram, self.min_val, self.max_val, self._levels())


class EntropyObserver(HistogramObserver):
    """TensorRT-style entropy (KL divergence) calibration: the threshold t on |x| whose
    quantized distribution stays closest to the clipped float one
    (:func:`fxquant.qmath.histogram_entropy_range`); the range is [-t, t] cut to the observed
    one ([0, t] after a ReLU). ``levels``: quantization bins of the search (default: the
    grid's levels on the side of 0 the data covers: 128 of 256 for signed data).
    Use it for long-tailed activations (post-ReLU conv outputs of CNNs)."""

    def __init__(self, bins: int = 2048, *, levels: int | None = None,
                 **kwargs: Unpack[UniformObserverArgs]) -> None:
        super().__init__(bins, **kwargs)
        if levels is not None and int(levels) < 2:
            raise ValueError(f"EntropyObserver needs levels >= 2, got {levels}")
        self.levels = None if levels is None else int(levels)

    def _search_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.levels
        if levels is None:
            signed = bool(self.min_val < 0) and bool(self.max_val > 0)
            levels = self._levels() // 2 if signed else self._levels()
        return qmath.histogram_entropy_range(self.histogram, self.min_val, self.max_val, levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, {super().extra_repr()}"


CALIBRATION_METHODS: dict[str, type] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}
"""Calibration method names (``get_default_qconfig_mapping(calibration=...)``) → observer."""


# ----------------------------------------------------------------------------------------
# Observers without statistics
# ----------------------------------------------------------------------------------------


class FixedQParamsObserver(ObserverBase):
    """Always reports the given (scale, zero_point): for ops with a fixed output range such as
    sigmoid ([0, 1]: 1/256, 0) and tanh ([-1, 1]: 2/256, 128). Buffers ``scale`` (float32 [1])
    and ``zero_point`` (int32 [1])."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self,
        scale: float,
        zero_point: int,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int = 0,
        quant_max: int = 255,
        is_dynamic: bool = False,
    ) -> None:
        _reject_dynamic("FixedQParamsObserver", is_dynamic)
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        _require_qscheme("FixedQParamsObserver", qscheme, qmath.PER_TENSOR_QSCHEMES)
        self.quant_min, self.quant_max = qmath.quant_range(dtype, quant_min, quant_max)
        if not self.quant_min <= zero_point <= self.quant_max:
            raise ValueError(
                f"FixedQParamsObserver: zero_point {zero_point} is outside [{quant_min}, {quant_max}]"
            )
        if not scale > 0:
            raise ValueError(f"FixedQParamsObserver: scale must be positive, got {scale}")
        self.qscheme = qscheme
        self.register_buffer("scale", torch.tensor([scale], dtype=torch.float))
        self.register_buffer("zero_point", torch.tensor([zero_point], dtype=torch.int))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, scale={self.scale.item()}, zero_point={self.zero_point.item()}"


class _PassThroughObserver(ObserverBase):
    """An observer that records nothing: forward returns its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PlaceholderObserver(_PassThroughObserver):
    """Records nothing; carries the target ``dtype`` (e.g. float16) and ``is_dynamic`` to
    convert. Dynamic activations get their qparams at run time, float16 has none."""

    def __init__(
        self,
        dtype: torch.dtype = torch.float32,
        custom_op_name: str = "",
        compute_dtype: torch.dtype | None = None,
        quant_min: int | None = None,
        quant_max: int | None = None,
        qscheme: torch.qscheme | None = None,
        eps: float | None = None,
        is_dynamic: bool = False,
    ) -> None:
        if compute_dtype is not None:
            warnings.warn(
                "PlaceholderObserver(compute_dtype=...) is deprecated; use is_dynamic=True",
                FutureWarning,
                stacklevel=2,
            )
            is_dynamic = True
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        if quant_min is not None and quant_max is not None and not qmath.is_float_dtype(dtype):
            qmath.quant_range(dtype, quant_min, quant_max)  # validates the range
        self.qscheme = torch.per_tensor_affine if qscheme is None else qscheme
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.eps = _FLOAT32_EPS if eps is None else eps
        self.custom_op = custom_op_name

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, is_dynamic={self.is_dynamic}"

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(
            f"PlaceholderObserver(dtype={self.dtype}, is_dynamic={self.is_dynamic}) has no qparams: "
            "dynamic quantization computes them at run time and float dtypes need none"
        )


class NoopObserver(_PassThroughObserver):
    """Records nothing; marks a tensor that stays in ``dtype`` (default float16)."""

    def __init__(self, dtype: torch.dtype = torch.float16, custom_op_name: str = "") -> None:
        super().__init__(dtype=dtype, is_dynamic=False)
        self.custom_op = custom_op_name

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("NoopObserver has no qparams")


class ReuseInputObserver(_PassThroughObserver):
    """Marker for ops such as ``reshape`` whose output shares the observer (and qparams) of
    their input: insert_observers reuses the input's observer instead of adding one; an
    unobserved input leaves the output unobserved too."""

    def __init__(self) -> None:
        super().__init__(torch.quint8, is_dynamic=False)

    def extra_repr(self) -> str:
        return "reuses the input's observer"

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("ReuseInputObserver has no qparams of its own: use the input's observer")


# ----------------------------------------------------------------------------------------
# Defaults (definitions as in PyTorch's observer module)
# ----------------------------------------------------------------------------------------

default_observer = MinMaxObserver.with_args(quant_min=0, quant_max=127)
"""quint8 activations restricted to [0, 127] (same qparams as reduce_range=True)."""

default_placeholder_observer = PlaceholderObserver.with_args()
default_weight_observer = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
weight_observer_range_neg_127_to_127 = MinMaxObserver.with_args(
    dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127, eps=2**-12
)
default_histogram_observer = HistogramObserver.with_args(quant_min=0, quant_max=127)
default_per_channel_weight_observer = PerChannelMinMaxObserver.with_args(
    dtype=torch.qint8, qscheme=torch.per_channel_symmetric
)
per_channel_weight_observer_range_neg_127_to_127 = PerChannelMinMaxObserver.with_args(
    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127, eps=2**-12
)
default_dynamic_quant_observer = PlaceholderObserver.with_args(
    dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True
)
default_float_qparams_observer = PerChannelMinMaxObserver.with_args(
    dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams, ch_axis=0
)
default_float_qparams_observer_4bit = PerChannelMinMaxObserver.with_args(
    dtype=torch.quint4x2, qscheme=torch.per_channel_affine_float_qparams, ch_axis=0
)
default_fixed_qparams_range_neg1to1_observer = FixedQParamsObserver.with_args(
    scale=2.0 / 256.0, zero_point=128, dtype=torch.quint8, quant_min=0, quant_max=255
)
default_fixed_qparams_range_0to1_observer = FixedQParamsObserver.with_args(
    scale=1.0 / 256.0, zero_point=0, dtype=torch.quint8, quant_min=0, quant_max=255
)
default_reuse_input_observer = ReuseInputObserver.with_args()
