"""QConfig (which observers a tensor gets) and QConfigMapping (which QConfig each op gets).

Precedence of QConfigMapping rules, highest first (as torch.ao FX graph mode):

    module_name_object_type_order  >  module_name  >  module_name_regex  >  object_type  >  global

* ``module_name`` walks up the module path: a rule for ``"a.b"`` applies to ``"a.b.c"`` too.
* ``module_name_regex`` patterns are tried with ``re.match`` in the order they were first
  registered; the first that matches wins (re-setting a pattern keeps its position).
* ``object_type`` is a module class, a function (``F.relu``, ``torch.add``) or a method name
  (``"reshape"``). For a function or method call inside a module whose *class* has an
  object_type rule, that enclosing-class rule wins over the function's own (torch's behaviour;
  pass ``scope_type`` to :meth:`QConfigMapping.resolve`).
* A ``None`` qconfig means "leave this op in float".

"Reuse input" qconfig: ops such as ``reshape`` get :data:`default_reuse_input_qconfig`
(activation ``ReuseInputObserver``, weight ``NoopObserver``), meaning "the output shares the
input's observer"; test for it with :func:`is_reuse_input_qconfig`.
"""

from __future__ import annotations

import platform
import re
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from fxquant.backends.names import AUTO, BUILTIN_BACKENDS, DEFAULT_BACKEND
from fxquant.backends.registry import resolve_backend_name
from fxquant.errors import ConfigError, ConfigTypeError, did_you_mean
from fxquant.records import QConfigRule, RuleReason
from fxquant.observers import (
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    NoopObserver,
    ObserverFactory,
    PlaceholderObserver,
    ReuseInputObserver,
    default_dynamic_quant_observer,
    default_fixed_qparams_range_0to1_observer,
    default_fixed_qparams_range_neg1to1_observer,
    default_float_qparams_observer,
    default_float_qparams_observer_4bit,
    default_observer,
    default_per_channel_weight_observer,
    default_placeholder_observer,
    default_reuse_input_observer,
    default_weight_observer,
    factory_parts,
)

__all__ = [
    "BACKENDS",
    "FIXED_QPARAMS_OP_TO_OBSERVER",
    "QConfig",
    "QConfigMapping",
    "activation_range",
    "default_dynamic_qconfig",
    "default_per_channel_qconfig",
    "default_qconfig",
    "default_quint8_weight_qconfig",
    "default_reuse_input_qconfig",
    "describe_object_type",
    "float16_dynamic_qconfig",
    "float16_static_qconfig",
    "float_qparams_weight_only_qconfig",
    "float_qparams_weight_only_qconfig_4bit",
    "get_default_qconfig",
    "get_default_qconfig_mapping",
    "as_qconfig_mapping",
    "is_reuse_input_qconfig",
    "per_channel_dynamic_qconfig",
    "qconfig_equals",
    "resolve_backend",
    "backend_policy",
    "CONV_TRANSPOSE_TYPES",
]

BACKENDS: tuple[str, ...] = BUILTIN_BACKENDS  # the built-in backend names


# ----------------------------------------------------------------------------------------
# QConfig
# ----------------------------------------------------------------------------------------


class _QConfigFields(NamedTuple):
    activation: Callable[..., nn.Module] | None
    weight: Callable[..., nn.Module] | None


def _check_factory(role: str, factory: Any) -> None:
    if factory is None:
        return
    if isinstance(factory, nn.Module):
        name = type(factory).__name__
        raise ConfigError(
            f"QConfig {role} got an observer instance ({name}); pass a factory so each tensor "
            f"gets its own observer: {name} or {name}.with_args(...)"
        )
    if not callable(factory):
        raise ConfigError(
            f"QConfig {role} must be an observer class or factory (e.g. MinMaxObserver.with_args(...)) "
            f"or None, got {factory!r}"
        )


class QConfig(_QConfigFields):
    """Observer factories for an op's output activation and its weight.

    Either may be None (no activation observer / no weight). Factories, not instances: every
    observed tensor gets a fresh observer from them.
    """

    __slots__ = ()

    def __new__(cls, activation: Callable[..., nn.Module] | None, weight: Callable[..., nn.Module] | None) -> QConfig:
        _check_factory("activation", activation)
        _check_factory("weight", weight)
        return super().__new__(cls, activation, weight)


QConfigAny = QConfig | None


def _factories_equal(a: Any, b: Any) -> bool:
    cls_a, kw_a = factory_parts(a)
    cls_b, kw_b = factory_parts(b)
    if cls_a is not cls_b or kw_a.keys() != kw_b.keys():
        return False
    inner_a, inner_b = kw_a.pop("observer", None), kw_b.pop("observer", None)  # fake-quant wrappers
    if (inner_a is None) != (inner_b is None) or (inner_a is not None and not _factories_equal(inner_a, inner_b)):
        return False
    deferred_a = getattr(a, "callable_kwargs", {})
    deferred_b = getattr(b, "callable_kwargs", {})
    return kw_a == kw_b and deferred_a == deferred_b


def qconfig_equals(a: QConfigAny, b: QConfigAny) -> bool:
    """Whether two qconfigs build the same observers: same classes, same constructor args."""
    if a is None or b is None:
        return a is b
    return _factories_equal(a.activation, b.activation) and _factories_equal(a.weight, b.weight)


def is_reuse_input_qconfig(qconfig: QConfigAny) -> bool:
    """True for the qconfig of ops whose output reuses the input's observer (e.g. reshape)."""
    if qconfig is None or qconfig.activation is None or qconfig.weight is None:
        return False
    return factory_parts(qconfig.activation)[0] is ReuseInputObserver and factory_parts(qconfig.weight)[0] is NoopObserver


default_qconfig = QConfig(activation=default_observer, weight=default_weight_observer)
default_per_channel_qconfig = QConfig(activation=default_observer, weight=default_per_channel_weight_observer)
default_dynamic_qconfig = QConfig(activation=default_dynamic_quant_observer, weight=default_weight_observer)
per_channel_dynamic_qconfig = QConfig(
    activation=default_dynamic_quant_observer, weight=default_per_channel_weight_observer
)
float16_dynamic_qconfig = QConfig(
    activation=PlaceholderObserver.with_args(dtype=torch.float16, is_dynamic=True),
    weight=PlaceholderObserver.with_args(dtype=torch.float16),
)
float16_static_qconfig = QConfig(
    activation=PlaceholderObserver.with_args(dtype=torch.float16),
    weight=PlaceholderObserver.with_args(dtype=torch.float16),
)
float_qparams_weight_only_qconfig = QConfig(
    activation=default_placeholder_observer, weight=default_float_qparams_observer
)
float_qparams_weight_only_qconfig_4bit = QConfig(
    activation=default_placeholder_observer, weight=default_float_qparams_observer_4bit
)
default_reuse_input_qconfig = QConfig(activation=default_reuse_input_observer, weight=NoopObserver.with_args())
default_quint8_weight_qconfig = QConfig(activation=HistogramObserver.with_args(), weight=MinMaxObserver.with_args())


# ----------------------------------------------------------------------------------------
# Backends and default qconfigs
# ----------------------------------------------------------------------------------------

def resolve_backend(backend: str = AUTO) -> str:
    """A concrete backend name. ``"auto"`` picks by this machine's CPU: x86 on x86_64/AMD64,
    qnnpack on arm64/aarch64. Other names are checked against :data:`BACKENDS` (and any
    registered backend) and returned as given (:mod:`fxquant.backends.names`)."""
    return resolve_backend_name(backend, machine=platform.machine())


def backend_policy(name: str) -> Any:
    """The :class:`~fxquant.backends.base.Backend` whose policy a default (QAT) qconfig
    follows: ``name`` resolved ("auto" included) and looked up."""
    from fxquant.backends.registry import get_backend

    return get_backend(resolve_backend(name))


def activation_range(backend: str, reduce_range: bool | None = None) -> Any:
    """The :class:`~fxquant.backends.cpu.ActivationRange` a default qconfig of ``backend`` uses:
    the CPU's answer (:func:`fxquant.backends.cpu.default_activation_range`: 8-bit where the
    engine accumulates in int32, 7-bit reduce_range on x86 without VNNI), or the user's
    ``reduce_range`` when given (forcing 8-bit where the kernels saturate warns at prepare)."""
    from fxquant.backends.cpu import default_activation_range

    chosen = default_activation_range(backend)
    if reduce_range is None or bool(reduce_range) == chosen.reduce_range:
        return chosen
    bits = "7-bit activations (reduce_range, 0..127)" if reduce_range else \
        "full 8-bit activations (0..255)"
    return replace(chosen, reduce_range=bool(reduce_range),
                   reason=f"{bits}: asked for (reduce_range={bool(reduce_range)}); this CPU's "
                          f"default would be {chosen.reason}")


def get_default_qconfig(backend: str = DEFAULT_BACKEND, *, reduce_range: bool | None = None,
                        calibration: str = "histogram",
                        symmetric_activations: bool = False) -> QConfig:
    """The default post-training qconfig of a backend (histogram activations, int8 weights):

    * activations ``HistogramObserver``: full 8-bit (0..255) where the backend's kernels
      accumulate in int32 on this CPU (qnnpack always; fbgemm / x86 / onednn with VNNI or
      AMX), 7-bit ``reduce_range`` (0..127) on x86 CPUs without VNNI, whose kernels saturate
      int16 sums on full-range input (:func:`activation_range`; README "CPU requirements").
      torch.ao fixes this by backend (reduce_range on fbgemm/x86, full range on onednn) and is
      wrong on one kind of CPU or the other. ``reduce_range=`` pins the choice;
    * weights: per-channel symmetric qint8, per-tensor symmetric on qnnpack
      (``Backend.per_channel_weights``).

    ``calibration`` picks the activation observer (docs/calibration.md): "histogram"
    (default), "minmax", "moving_average", "percentile" (99.99%), "mse" or "entropy" (KL).

    ``symmetric_activations=True``: activations on a symmetric grid whose sign follows the
    observed range (``signed_by_range``: zero point 0 for a non-negative tensor, the
    midpoint for any other), as OpenVINO + NNCF quantize them. OpenVINO's int8 convs run
    faster on such inputs than on a uint8 tensor with another zero point, and
    ``fxquant.compile(..., backend="openvino")`` writes midpoint tensors as int8 with zero
    point 0 (the same values): EfficientNet-B0 ~10% faster there. The cost: a signed tensor
    whose range is lopsided (SiLU's [-0.28, 6]) gets half the levels. With 7-bit activations
    (``reduce_range``, AVX2-only x86 CPUs) the grid is 0..127 with midpoint 63, which no
    engine reads as int8: correct, without the speed-up.
    """
    policy = backend_policy(backend)
    act = activation_range(policy.name, reduce_range)
    weight = default_per_channel_weight_observer if policy.per_channel_weights else default_weight_observer
    observer = calibration_observer(calibration)
    if symmetric_activations:
        # symmetric quint8 takes no reduce_range: 7-bit is the explicit range 0..127
        seven_bit = dict(quant_min=0, quant_max=127) if act.reduce_range else {}
        observer = observer.with_args(qscheme=torch.per_tensor_symmetric, signed_by_range=True,
                                      **seven_bit)
        return QConfig(activation=observer, weight=weight)
    return QConfig(activation=observer.with_args(reduce_range=act.reduce_range), weight=weight)


def calibration_observer(calibration: str) -> Any:
    """The activation observer class of a calibration method name
    (:data:`fxquant.observers.CALIBRATION_METHODS`); ConfigError naming the known ones."""
    from fxquant.observers import CALIBRATION_METHODS

    if calibration not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method {calibration!r}"
                          f"{did_you_mean(str(calibration), CALIBRATION_METHODS)}; use one of "
                          f"{list(CALIBRATION_METHODS)}")
    return CALIBRATION_METHODS[calibration]


FIXED_QPARAMS_OP_TO_OBSERVER: Mapping[Callable | str, ObserverFactory] = types.MappingProxyType(
    {
        nn.Hardsigmoid: default_fixed_qparams_range_0to1_observer,
        F.hardsigmoid: default_fixed_qparams_range_0to1_observer,
        "hardsigmoid": default_fixed_qparams_range_0to1_observer,
        "hardsigmoid_": default_fixed_qparams_range_0to1_observer,
        nn.Sigmoid: default_fixed_qparams_range_0to1_observer,
        torch.sigmoid: default_fixed_qparams_range_0to1_observer,
        "sigmoid": default_fixed_qparams_range_0to1_observer,
        "sigmoid_": default_fixed_qparams_range_0to1_observer,
        nn.Softmax: default_fixed_qparams_range_0to1_observer,
        nn.Tanh: default_fixed_qparams_range_neg1to1_observer,
        torch.tanh: default_fixed_qparams_range_neg1to1_observer,
        "tanh": default_fixed_qparams_range_neg1to1_observer,
        "tanh_": default_fixed_qparams_range_neg1to1_observer,
    }
)
"""Ops with a fixed output range and the observer giving their fixed qparams."""

# the transposed convs, whose weights the default mappings may quantize per tensor
CONV_TRANSPOSE_TYPES: tuple[Callable, ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
)


def get_default_qconfig_mapping(backend: str = AUTO, *, reduce_range: bool | None = None,
                                calibration: str = "histogram",
                                symmetric_activations: bool = False) -> QConfigMapping:
    """The default post-training QConfigMapping of a backend, as torch.ao builds it:

    global ``get_default_qconfig(backend, reduce_range=reduce_range, calibration=calibration,
    symmetric_activations=symmetric_activations)`` (8-bit or 7-bit
    activations as this CPU's kernels allow; ``mapping.activation_range`` says which and why;
    its observer from ``calibration``: "histogram", "minmax", "moving_average", "percentile",
    "mse", "entropy"), plus
      * ``"reshape"``: :data:`default_reuse_input_qconfig`;
      * ConvTranspose1/2/3d and F.conv_transpose1/2/3d: per-tensor weights on fbgemm/x86
        (no per-channel transposed conv kernels there: ``Backend.per_tensor_conv_transpose``),
        else the global qconfig;
      * F.layer_norm / nn.LayerNorm: the global activation, float (placeholder) weight;
      * nn.PReLU: :data:`default_quint8_weight_qconfig`;
      * sigmoid / hardsigmoid / softmax / tanh: fixed qparams (see FIXED_QPARAMS_OP_TO_OBSERVER).
    ``mapping.backend`` records the resolved backend.
    """
    policy = backend_policy(backend)
    backend = policy.name
    qconfig = get_default_qconfig(backend, reduce_range=reduce_range, calibration=calibration,
                                  symmetric_activations=symmetric_activations)
    transpose = QConfig(qconfig.activation, default_weight_observer) if policy.per_tensor_conv_transpose else qconfig
    layernorm = QConfig(qconfig.activation, default_placeholder_observer)
    mapping = QConfigMapping().set_global(qconfig).set_object_type("reshape", default_reuse_input_qconfig)
    for op in CONV_TRANSPOSE_TYPES:
        mapping.set_object_type(op, transpose)
    mapping.set_object_type(F.layer_norm, layernorm).set_object_type(nn.LayerNorm, layernorm)
    mapping.set_object_type(nn.PReLU, default_quint8_weight_qconfig)
    fixed: dict[ObserverFactory, QConfig] = {}
    for op, observer in FIXED_QPARAMS_OP_TO_OBSERVER.items():
        mapping.set_object_type(op, fixed.setdefault(observer, QConfig(observer, default_weight_observer)))
    mapping.backend = backend
    mapping.activation_range = activation_range(backend, reduce_range)
    return mapping


# ----------------------------------------------------------------------------------------
# QConfigMapping
# ----------------------------------------------------------------------------------------

_GLOBAL_KEY = ""
_OBJECT_TYPE_KEY = "object_type"
_REGEX_KEY = "module_name_regex"
_MODULE_NAME_KEY = "module_name"
_ORDER_KEY = "module_name_object_type_order"
_DICT_KEYS = (_GLOBAL_KEY, _OBJECT_TYPE_KEY, _REGEX_KEY, _MODULE_NAME_KEY, _ORDER_KEY)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def describe_object_type(obj: Any) -> str:
    """A short readable name: nn.Linear, F.relu, torch.add, 'reshape', operator.add."""
    if isinstance(obj, str):
        return repr(obj)
    name = getattr(obj, "__name__", None)
    module = getattr(obj, "__module__", None) or ""
    if name is None:
        return repr(obj)
    if isinstance(obj, type) and module.startswith("torch.nn.modules") and getattr(nn, name, None) is obj:
        return f"nn.{name}"
    if getattr(F, name, None) is obj:
        return f"F.{name}"
    if getattr(torch, name, None) is obj:
        return f"torch.{name}"
    if module in ("operator", "_operator"):
        return f"operator.{name}"
    return getattr(obj, "__qualname__", name)


def _check_qconfig_value(where: str, qconfig: Any) -> None:
    if qconfig is None or (isinstance(qconfig, tuple) and hasattr(qconfig, "activation") and hasattr(qconfig, "weight")):
        return
    raise ConfigTypeError(f"{where}: expected a QConfig or None (None keeps the op in float), got {qconfig!r}")


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


class QConfigMapping:
    """Which QConfig each op gets; see the module docstring for precedence.

    The rule tables keep torch.ao's attribute names (``global_qconfig``,
    ``object_type_qconfigs``, ``module_name_regex_qconfigs``, ``module_name_qconfigs``,
    ``module_name_object_type_order_qconfigs``). ``backend`` names the backend the mapping
    was built for by :func:`get_default_qconfig_mapping` (None for hand-made mappings).
    """

    def __init__(self) -> None:
        self.global_qconfig: QConfigAny = None
        self.object_type_qconfigs: OrderedDict[Callable | str, QConfigAny] = OrderedDict()
        self.module_name_regex_qconfigs: OrderedDict[str, QConfigAny] = OrderedDict()
        self.module_name_qconfigs: OrderedDict[str, QConfigAny] = OrderedDict()
        self.module_name_object_type_order_qconfigs: OrderedDict[tuple[str, Callable, int], QConfigAny] = OrderedDict()
        self.backend: str | None = None
        # what the default activation range was chosen from (get_default_*_mapping); None for
        # hand-made mappings. Informational: prepare records it, nothing reads it back.
        self.activation_range: Any = None
        # why the default dynamic mapping's qint8 weights are per-channel or per-tensor
        # (fxquant.api.dynamic_qconfig_mapping); None elsewhere. Informational too.
        self.dynamic_weights: str | None = None

    # -- setters (each returns self) -------------------------------------------------------

    def set_global(self, global_qconfig: QConfigAny) -> QConfigMapping:
        _check_qconfig_value("set_global", global_qconfig)
        self.global_qconfig = global_qconfig
        return self

    def set_object_type(self, object_type: Callable | str, qconfig: QConfigAny) -> QConfigMapping:
        """For a module class, a function (F.relu, torch.add) or a method name ("reshape")."""
        if not (isinstance(object_type, str) or callable(object_type)):
            raise ConfigTypeError(
                "set_object_type: object_type must be a module class, a function or a method name "
                f"string, got {object_type!r}"
            )
        _check_qconfig_value(f"set_object_type({describe_object_type(object_type)})", qconfig)
        self.object_type_qconfigs[object_type] = qconfig
        return self

    def set_module_name_regex(self, module_name_regex: str, qconfig: QConfigAny) -> QConfigMapping:
        """For modules whose path ``re.match``-es the pattern; earlier patterns win."""
        try:
            re.compile(module_name_regex)
        except (re.error, TypeError) as err:
            raise ConfigError(f"set_module_name_regex: invalid regex {module_name_regex!r}: {err}") from err
        _check_qconfig_value(f"set_module_name_regex({module_name_regex!r})", qconfig)
        self.module_name_regex_qconfigs[module_name_regex] = qconfig
        return self

    def set_module_name(self, module_name: str, qconfig: QConfigAny) -> QConfigMapping:
        """For the module at this path and everything inside it."""
        if not isinstance(module_name, str):
            raise ConfigTypeError(f"set_module_name: module_name must be a str path like 'layer1.0', got {module_name!r}")
        if module_name == "":
            raise ConfigError("set_module_name: the empty path names the root module; use set_global(qconfig)")
        _check_qconfig_value(f"set_module_name({module_name!r})", qconfig)
        self.module_name_qconfigs[module_name] = qconfig
        return self

    def set_module_name_object_type_order(
        self, module_name: str, object_type: Callable, index: int, qconfig: QConfigAny
    ) -> QConfigMapping:
        """For the `index`-th (0-based) call of `object_type` directly inside module `module_name`."""
        if not isinstance(module_name, str):
            raise ConfigTypeError(f"set_module_name_object_type_order: module_name must be a str, got {module_name!r}")
        if not isinstance(index, int) or index < 0:
            raise ConfigError(f"set_module_name_object_type_order: index must be an int >= 0, got {index!r}")
        _check_qconfig_value("set_module_name_object_type_order", qconfig)
        self.module_name_object_type_order_qconfigs[(module_name, object_type, index)] = qconfig
        return self

    # -- lookup ----------------------------------------------------------------------------

    def resolve(
        self,
        module_path: str,
        object_type: Callable | str | None,
        order_index: int | None = None,
        *,
        scope_type: type | None = None,
    ) -> tuple[QConfigAny, str]:
        """The QConfig of one op and the reason naming the rule that decided it.

        module_path: for a module call its own path ("sub.linear1"); for a function or method
            call the path of the module it runs in ("" at top level).
        object_type: the module class, the function, or the method name.
        order_index: how many earlier calls of `object_type` the same module made (0-based);
            for a module call, counted among its parent's children (its order rule is keyed
            by the parent's path), as torch does. None skips order rules.
        scope_type: for function/method calls, the class of the enclosing module; its
            object_type rule outranks the function's own.
        """
        for find in (self._by_order, self._by_module_name, self._by_regex):
            found = find(module_path, object_type, order_index)
            if found is not None:
                return found
        found = self._by_object_type(object_type, scope_type)
        if found is not None:
            return found
        return self.global_qconfig, _reason(QConfigRule.GLOBAL, "global", self.global_qconfig)

    def _by_order(self, module_path: str, object_type: Any, order_index: int | None) -> _Found | None:
        if order_index is None or object_type is None:
            return None
        scope = _parent(module_path) if _is_module_class(object_type) else module_path
        for (name, kind, index), qconfig in self.module_name_object_type_order_qconfigs.items():
            if name == scope and kind == object_type and index == order_index:
                what = f"module_name_object_type_order ({name!r}, {describe_object_type(kind)}, {index})"
                return qconfig, _reason(QConfigRule.ORDER, what, qconfig)
        return None

    def _by_module_name(self, module_path: str, object_type: Any, order_index: int | None) -> _Found | None:
        path = module_path
        while path != "":
            if path in self.module_name_qconfigs:
                qconfig = self.module_name_qconfigs[path]
                inherited = f" (parent of {module_path!r})" if path != module_path else ""
                return qconfig, _reason(QConfigRule.MODULE_NAME, f"module_name {path!r}{inherited}",
                                        qconfig)
            path = _parent(path)
        return None

    def _by_regex(self, module_path: str, object_type: Any, order_index: int | None) -> _Found | None:
        for pattern, qconfig in self.module_name_regex_qconfigs.items():
            if re.match(pattern, module_path):
                return qconfig, _reason(QConfigRule.MODULE_NAME_REGEX,
                                        f"module_name_regex {pattern!r}", qconfig)
        return None

    def _by_object_type(self, object_type: Any, scope_type: type | None) -> _Found | None:
        if scope_type is not None and scope_type in self.object_type_qconfigs:
            qconfig = self.object_type_qconfigs[scope_type]
            what = f"object_type {describe_object_type(scope_type)} (enclosing module)"
            return qconfig, _reason(QConfigRule.OBJECT_TYPE, what, qconfig)
        if object_type is not None and object_type in self.object_type_qconfigs:
            qconfig = self.object_type_qconfigs[object_type]
            return qconfig, _reason(QConfigRule.OBJECT_TYPE,
                                    f"object_type {describe_object_type(object_type)}", qconfig)
        return None

    # -- torch qconfig_dict format --------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """torch's qconfig_dict: {"": global, "object_type": [(type, qconfig)], "module_name_regex":
        [...], "module_name": [...], "module_name_object_type_order": [(name, type, index, qconfig)]}."""
        return {
            _GLOBAL_KEY: self.global_qconfig,
            _OBJECT_TYPE_KEY: list(self.object_type_qconfigs.items()),
            _REGEX_KEY: list(self.module_name_regex_qconfigs.items()),
            _MODULE_NAME_KEY: list(self.module_name_qconfigs.items()),
            _ORDER_KEY: [(*key, qconfig) for key, qconfig in self.module_name_object_type_order_qconfigs.items()],
        }

    @classmethod
    def from_dict(cls, qconfig_dict: Mapping[str, Any]) -> QConfigMapping:
        """Inverse of :meth:`to_dict`; every key is optional, unknown keys are an error."""
        unknown = [key for key in qconfig_dict if key not in _DICT_KEYS]
        if unknown:
            close = "".join(did_you_mean(str(key), _DICT_KEYS) for key in unknown)
            raise ConfigError(f"qconfig_dict has unknown keys {unknown}{close}; allowed keys are "
                              f"{list(_DICT_KEYS)} ('' is the global qconfig)")
        mapping = cls()
        if _GLOBAL_KEY in qconfig_dict:
            mapping.set_global(qconfig_dict[_GLOBAL_KEY])
        for object_type, qconfig in _entries(qconfig_dict, _OBJECT_TYPE_KEY, "(object_type, qconfig)"):
            mapping.set_object_type(object_type, qconfig)
        for pattern, qconfig in _entries(qconfig_dict, _REGEX_KEY, "(regex, qconfig)"):
            mapping.set_module_name_regex(pattern, qconfig)
        for name, qconfig in _entries(qconfig_dict, _MODULE_NAME_KEY, "(module_name, qconfig)"):
            mapping.set_module_name(name, qconfig)
        for name, object_type, index, qconfig in _entries(
                qconfig_dict, _ORDER_KEY, "(module_name, object_type, index, qconfig)"):
            mapping.set_module_name_object_type_order(name, object_type, index, qconfig)
        return mapping

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (backend={self.backend!r}", f" global_qconfig\n  {self.global_qconfig}"]
        for title in ("object_type_qconfigs", "module_name_regex_qconfigs", "module_name_qconfigs",
                      "module_name_object_type_order_qconfigs"):
            table = getattr(self, title)
            lines.append(f" {title}")
            lines.extend(f"  {_describe_key(key)}: {qconfig}" for key, qconfig in table.items())
        return "\n".join(lines) + "\n)"


_Found = tuple[QConfigAny, str]


def _entries(qconfig_dict: Mapping[str, Any], key: str, shape: str) -> list[tuple[Any, ...]]:
    """The list of tuples under ``key`` of a qconfig_dict, each checked to have ``shape``'s
    number of items (a dict or a bare pair there is a common slip: say so, not 'cannot unpack')."""
    entries = qconfig_dict.get(key, [])
    width = shape.count(",") + 1
    example = f"qconfig_dict[{key!r}] must be a list of {shape} tuples"
    if not isinstance(entries, (list, tuple)):
        raise ConfigTypeError(f"{example}, got {type(entries).__name__}",
                              hint="e.g. list(d.items()) for a dict" if isinstance(entries, dict) else "")
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) != width:
            raise ConfigTypeError(f"{example}; got the entry {entry!r}",
                                  hint=f"write each entry as {shape}")
    return [tuple(entry) for entry in entries]


def _describe_key(key: Any) -> str:
    if isinstance(key, tuple):
        return "(" + ", ".join(describe_object_type(part) if callable(part) else repr(part) for part in key) + ")"
    return describe_object_type(key)


def _reason(kind: QConfigRule, rule: str, qconfig: QConfigAny) -> RuleReason:
    """The rule's text ("→ None" added when it leaves the op float), knowing its kind."""
    return RuleReason(f"{rule} → None" if qconfig is None else rule, kind)


def as_qconfig_mapping(obj: Any, where: str = "qconfig_mapping") -> QConfigMapping:
    """``obj`` as a :class:`QConfigMapping`: a QConfigMapping as it is, a torch-format
    qconfig_dict converted; anything else is a :class:`~fxquant.errors.ConfigTypeError` naming
    its type and what is accepted (a str, a list, a single QConfig, torch.ao's QConfigMapping)."""
    if isinstance(obj, QConfigMapping):
        return obj
    if isinstance(obj, Mapping):
        return QConfigMapping.from_dict(obj)
    got = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise ConfigTypeError(f"{where} must be a fxquant QConfigMapping or a qconfig_dict, got {got} "
                          f"({obj!r:.60})", hint=_mapping_hint(obj))


def _mapping_hint(obj: Any) -> str:
    if isinstance(obj, str):
        return (f"for the default mapping of a backend use "
                f"fxquant.get_default_qconfig_mapping({obj!r}) (and backend={obj!r})")
    if isinstance(obj, tuple) and hasattr(obj, "activation") and hasattr(obj, "weight"):
        return "a single QConfig applies to everything with QConfigMapping().set_global(qconfig)"
    if type(obj).__name__ == "QConfigMapping":
        return ("this QConfigMapping is another library's (torch's?): build fxquant's with "
                "fxquant.get_default_qconfig_mapping(backend) or fxquant.QConfigMapping()")
    if obj is None:
        return ("pass fxquant.get_default_qconfig_mapping(backend), or QConfigMapping() to keep "
                "every op float")
    return ("pass fxquant.get_default_qconfig_mapping(backend), a QConfigMapping you built, or a "
            "qconfig_dict {'': qconfig, 'module_name': [(name, qconfig)], ...}")
