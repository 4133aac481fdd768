"""Quantized modules over torch.ops.quantized.* with prepacked weights.

Inputs and outputs are quint8 quantized tensors; biases stay float (the kernels take float
bias). Every class has

* ``from_float(mod, wq, output_scale, output_zero_point)``: from the float module and the
  weight's ``WeightQParams`` (``wq`` must be None for the BatchNorm kinds);
* ``from_reference(ref_mod, output_scale, output_zero_point)``: from the fxquant.nn.reference
  module (or, for BatchNorm, the float BatchNorm);
* ``weight``: an attribute, as on the float module: the weight the kernel computes with, as a
  float tensor (``m.weight.device`` / ``.dtype`` / ``.shape`` read as on the float module, so a
  forward written for the float model runs); calling it, ``m.weight()``, returns the
  quantized weight (the older API, kept);
* ``bias()`` (unpacked), a readable repr, ``state_dict`` round-trip,
  ``torch.save``/``torch.load`` and ``torch.jit.script`` support.

Fused ReLU is a separate class (``LinearReLU``, ``ConvReLU2d``, ``BNReLU2d``, ...). Its
``from_float`` takes the fused float module from fxquant.nn.fused or a plain conv/linear/BN
(the caller has decided the ReLU is fused); its ``from_reference`` takes the plain reference
module. ConvBn* float modules must be folded first (``fold_eval()``).

Packing follows ``torch.backends.quantized.engine`` at the time the weights are set; the
converter selects the engine with ``fxquant.backends.engine.engine(name)`` around lowering.
After ``torch.load``, ``copy.deepcopy`` or ``load_state_dict`` the weights are re-packed under
the engine current at that moment. ``scale`` and ``zero_point`` are plain python
float / int attributes, which is what makes the modules scriptable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.backends.engine import (conv_unpack_unavailable, current_engine,
                                     deconv_packing_engine, has_per_channel_deconv,
                                     is_deconv3d_wrong, keeps_first_call_primitive,
                                     supported_engines)
from fxquant.backends.engine import engine as use_engine
from fxquant.nn import fused, reference
from fxquant.nn.common import WeightQParams
from fxquant.nn.fused import FusedModule
from fxquant.nn.reference import ReferenceWeighted

__all__ = [
    "BNReLU2d", "BNReLU3d", "BatchNorm2d", "BatchNorm3d",
    "Conv1d", "Conv2d", "Conv3d", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Linear", "LinearReLU", "QUANTIZED_MODULES",
]

_OPS = torch.ops.quantized


def _check_output_qparams(owner: str, scale: float, zero_point: int) -> tuple[float, int]:
    scale, zero_point = float(scale), int(zero_point)
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"{owner}: output_scale must be finite and > 0, got {scale}")
    if not 0 <= zero_point <= 255:
        raise ValueError(
            f"{owner}: output_zero_point must be in [0, 255] for quint8 outputs, got {zero_point}"
        )
    return scale, zero_point


def _float_bias(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.detach().float().clone()


class _DequantizedWeight(torch.Tensor):
    """A quantized module's weight read as an attribute: the dequantized weight, a plain float
    tensor for every torch op (``__torch_function__`` disabled, results are plain tensors).
    Calling it returns the quantized weight: ``m.weight()`` as before it was an attribute."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def of(quantized: torch.Tensor) -> "_DequantizedWeight":
        w = torch.Tensor._make_subclass(_DequantizedWeight, quantized.dequantize(), False)
        w._quantized = quantized
        return w

    def __call__(self) -> torch.Tensor:
        return self._quantized

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickles (torch.save) as a float tensor
        return torch.Tensor.__reduce_ex__(self.as_subclass(torch.Tensor), protocol)


@torch.jit.unused
def _callable_weight(quantized: torch.Tensor) -> torch.Tensor:
    return _DequantizedWeight.of(quantized)


def _packed_forward(op: Any) -> Callable[..., torch.Tensor]:
    """The forward of a packed-weight class whose kernel is ``op``. A closure, not a lookup
    by name at run time: TorchScript resolves ``op`` from the closure to a static call, and
    ``_packed_params`` has a different packed type per kernel.

    It calls the operator's C++ entry point (``OpOverloadPacket._op``, which TorchScript
    resolves the same way) rather than the packet: the packet's ``__call__`` first scans the
    arguments in Python for fake script objects (a torch.compile tracing concern; the packed
    weights are a script object), a few microseconds per call, a few percent of a small
    model's int8 time. Tracing with fake script objects does not reach these modules: the
    compiled paths run the integer representation (plain tensors)."""
    kernel = getattr(op, "_op", op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel(self._prepare_input(x), self._packed_params, self.scale, self.zero_point)

    return forward


def _unpacker(op: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """``_unpack`` calling ``op`` (scripted too: the ``weight`` property reads it)."""

    def _unpack(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return op(self._packed_params)

    return _unpack


def _batch_norm_forward(op: Any) -> Callable[..., torch.Tensor]:
    """The forward of a quantized BatchNorm class whose kernel is ``op`` (as _packed_forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return op(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                  self.scale, self.zero_point)

    return forward


class _QuantizedBase(nn.Module):
    """Output qparams and their state-dict entries, shared by all quantized modules."""

    _NAME = "Quantized"

    def __init__(self) -> None:
        super().__init__()
        self.scale: float = 1.0
        self.zero_point: int = 0
        self._qname: str = self._NAME  # instance copy: scripted forward can read it

    def __init_subclass__(cls, kernel: str = "", dims: int = 0, **kwargs: Any) -> None:
        """``class Conv2d(_ConvNd, kernel="conv2d", dims=2)``: the class line names the
        torch.ops.quantized kernel (``_bind`` sets the forward calling it and the float /
        reference / fused classes of the same name) and the class is ``Quantized<Name>``."""
        super().__init_subclass__(**kwargs)
        if kernel:
            cls._NAME = "Quantized" + cls.__name__
            cls._bind(kernel, dims)

    @classmethod
    def _bind(cls, kernel: str, dims: int) -> None:
        raise NotImplementedError(f"{cls.__name__} cannot bind a kernel")

    def _get_name(self) -> str:
        return self._NAME

    def set_output_qparams(self, scale: float, zero_point: int) -> None:
        """Set the scale / zero point of the quint8 output."""
        self.scale, self.zero_point = _check_output_qparams(self._NAME, scale, zero_point)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scale"] = torch.tensor(self.scale, dtype=torch.float64)
        destination[prefix + "zero_point"] = torch.tensor(self.zero_point, dtype=torch.int64)

    def _pop_output_qparams(self, state_dict: dict, prefix: str, missing: list[str]) -> None:
        keys = (prefix + "scale", prefix + "zero_point")
        if all(k in state_dict for k in keys):
            self.set_output_qparams(float(state_dict.pop(keys[0])), int(state_dict.pop(keys[1])))
        else:
            missing.extend(k for k in keys if k not in state_dict)


# --------------------------------------------------------------------------------------------
# weighted modules with packed weights


class _PackedWeighted(_QuantizedBase):
    """Holds ``_packed_params``; subclasses say how to pack, unpack, and check shapes."""

    # class attributes stay unannotated: torch.jit.script reads class annotations as
    # attribute types
    _FLOAT = nn.Module
    _FUSED = None  # the fused float class, set on the ReLU kinds
    _REFERENCE = nn.Module
    _PREPACK = None  # torch.ops.quantized.<kernel>_prepack (see _bind)
    _SPATIAL_DIMS = 0
    _WEIGHT_CH_AXIS = 0

    def _init_packed(self, weight_shape: list[int], bias: bool) -> None:
        self._packed_params = None
        self.pack_engine = None  # an engine to pack with, whatever the current one (str)
        self._unpacked_copy = None  # (weight, bias) where the engine cannot unpack
        w = torch._empty_affine_quantized(weight_shape, scale=1.0, zero_point=0,
                                          dtype=torch.qint8)
        self.set_weight_bias(w, torch.zeros(self._out_channels()) if bias else None)

    @classmethod
    def _bind(cls, kernel: str, dims: int) -> None:
        """``kernel`` ("conv2d") gives the forward and ``<kernel>_prepack`` / ``_unpack``;
        a ``*_relu`` kernel is the fused kind of its base class (it keeps the base's packing)."""
        cls.forward = _packed_forward(getattr(_OPS, kernel))
        if kernel.endswith("_relu"):
            cls._FUSED = getattr(fused, cls.__name__)
            return
        cls._FLOAT, cls._REFERENCE = getattr(nn, cls.__name__), getattr(reference, cls.__name__)
        cls._PREPACK = getattr(_OPS, kernel + "_prepack")
        cls._unpack = _unpacker(getattr(_OPS, kernel + "_unpack"))
        cls._SPATIAL_DIMS = dims

    # -- subclass hooks
    def _pack(self, w: torch.Tensor, b: torch.Tensor | None) -> Any:
        return self._PREPACK(w, b, *self._pack_args())

    def _pack_args(self) -> tuple[Any, ...]:
        """The prepack arguments after weight and bias."""
        return ()

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _unpack(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _weight_shape(self) -> list[int]:
        raise NotImplementedError

    def _out_channels(self) -> int:
        raise NotImplementedError

    @classmethod
    def _empty_like(cls, mod: nn.Module) -> _PackedWeighted:
        raise NotImplementedError

    # -- weights
    def packing_engine(self) -> str:
        """The engine whose prepack runs: ``pack_engine`` when set (a kernel chosen because
        the backend's own was wrong), else the current one (transposed convs may differ)."""
        return getattr(self, "pack_engine", None) or current_engine()

    def set_weight_bias(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        """Pack quantized qint8 weight ``w`` and float bias ``b`` (see ``packing_engine``)."""
        self._check_weight(w)
        b = _float_bias(b)
        if b is not None and tuple(b.shape) != (self._out_channels(),):
            raise ValueError(f"{self._NAME}: bias must have shape ({self._out_channels()},), "
                             f"got {tuple(b.shape)}")
        packing = self.packing_engine()
        with use_engine(packing):
            self._packed_params = self._pack(w, b)
        self.packed_engine: str = packing
        self._has_bias: bool = b is not None
        self.weight_dtype: torch.dtype = w.dtype
        self.weight_qscheme: str = str(w.qscheme())
        # qnnpack's Conv3d runs but cannot be unpacked: keep a copy for weight(), state_dict
        keep = conv_unpack_unavailable(packing, self._SPATIAL_DIMS)
        self._unpacked_copy = (w, b) if keep else None

    def forget_first_call(self) -> bool:
        """Repack the weights when their packed form keeps the kernel built for the first
        input shape it ran on (oneDNN: ``keeps_first_call_primitive``), so that the next call
        sets it. Convert runs the new modules at the example inputs' shape (probe, kernel
        check, engine choice); without this a model prepared with a batch-4 example ran at
        batch 1 rebuilt its oneDNN conv kernels on every call. True when repacked."""
        if not keeps_first_call_primitive(self.packed_engine):
            return False
        with use_engine(self.packed_engine):
            self.set_weight_bias(*self._weight_bias())
        return True

    def _check_weight(self, w: torch.Tensor) -> None:
        if not isinstance(w, torch.Tensor) or not w.is_quantized or w.dtype != torch.qint8:
            got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{self._NAME} needs a qint8 quantized weight, got {got}; quantize "
                             "it with WeightQParams(dtype=torch.qint8).quantize(w)")
        if list(w.shape) != self._weight_shape():
            raise ValueError(f"{self._NAME}: weight must have shape {self._weight_shape()}, "
                             f"got {list(w.shape)}")
        per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        if per_channel and w.q_per_channel_axis() != self._WEIGHT_CH_AXIS:
            raise ValueError(f"{self._NAME}: per-channel weights must use ch_axis="
                             f"{self._WEIGHT_CH_AXIS}, got {w.q_per_channel_axis()}")

    def _weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self._unpacked_copy if self._unpacked_copy is not None else self._unpack()
        return w, (b if self._has_bias else None)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the kernel computes with, dequantized: ``.device``, ``.dtype``,
        ``.shape`` read as on the float module (also in TorchScript). In Python,
        ``m.weight()`` is the quantized weight."""
        w = self._quantized_weight()
        if torch.jit.is_scripting():
            return w.dequantize()
        return _callable_weight(w)

    def _quantized_weight(self) -> torch.Tensor:
        if self._unpacked_copy is not None:
            return self._unpacked_copy[0]
        return self._unpack()[0]

    def fake_quantized_weight(self) -> torch.Tensor:
        """The weight quantized then dequantized (as the reference module's method)."""
        return self._weight_bias()[0].dequantize()

    def bias(self) -> torch.Tensor | None:
        """The float bias, unpacked (None when the module has no bias)."""
        return self._weight_bias()[1]

    # -- serialization: unpacked weight/bias travel, packing is redone on arrival
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w, b = self._weight_bias()
        destination[prefix + "weight"] = w
        destination[prefix + "bias"] = b

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str], *rest: Any) -> None:
        unexpected_keys, error_msgs = rest
        if prefix + "weight" in state_dict:
            w, b = state_dict.pop(prefix + "weight"), state_dict.pop(prefix + "bias", None)
            try:
                self.set_weight_bias(w, b)
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
        else:
            missing_keys.append(prefix + "weight")
        self._pop_output_qparams(state_dict, prefix, missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_fxquant_weight_bias"] = self._weight_bias()
        state["_packed_params"] = None
        state["_unpacked_copy"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        w, b = state.pop("_fxquant_weight_bias")
        super().__setstate__(state)
        self.set_weight_bias(w, b)

    # -- construction
    @classmethod
    def _float_core(cls, mod: nn.Module) -> nn.Module:
        """The plain float module inside ``mod``; a clear TypeError for anything else."""
        if cls._FUSED is not None and isinstance(mod, cls._FUSED):
            return mod[0]
        accepts = cls._FLOAT.__name__ + (f" or fused {cls._FUSED.__name__}" if cls._FUSED else "")
        if isinstance(mod, ReferenceWeighted):
            raise TypeError(f"{cls._NAME}.from_float got reference {type(mod).__name__}; "
                            "use from_reference for reference modules")
        if isinstance(mod, FusedModule):
            hint = ("fold the BatchNorm first with .fold_eval()" if hasattr(mod, "fold_eval")
                    else "use the fused quantized class for it")
            raise TypeError(f"{cls._NAME}.from_float takes {accepts}, got fused "
                            f"{type(mod).__name__}: {hint}")
        if not isinstance(mod, cls._FLOAT):
            raise TypeError(f"{cls._NAME}.from_float takes {accepts}, got {type(mod).__name__}")
        return mod

    @classmethod
    def from_float(cls, mod: nn.Module, wq: WeightQParams | None, output_scale: float,
                   output_zero_point: int) -> Any:
        """Quantized module from float ``mod``, its weight qparams and the output qparams."""
        core = cls._float_core(mod)
        if not isinstance(wq, WeightQParams):
            raise TypeError(f"{cls._NAME}.from_float needs the weight's WeightQParams "
                            f"(from WeightQParams.from_observer), got {type(wq).__name__}")
        qmod = cls._empty_like(core)
        qmod.set_weight_bias(wq.quantize(core.weight), core.bias)
        qmod.set_output_qparams(output_scale, output_zero_point)
        return qmod

    @classmethod
    def from_reference(cls, ref_mod: nn.Module, output_scale: float,
                       output_zero_point: int, pack_engine: str | None = None) -> Any:
        """Quantized module from a fxquant.nn.reference module and the output qparams.

        The ReLU kinds also take their fused float container holding the reference module
        as its first child (the ReLU is what the class fuses). ``pack_engine``: pack the
        weights with this engine now and on every re-pack (load, deepcopy), whatever the
        current engine is (lowering uses it when the backend's own kernel is wrong).
        """
        if cls._FUSED is not None and isinstance(ref_mod, cls._FUSED):
            ref_mod = ref_mod[0]
        if not isinstance(ref_mod, cls._REFERENCE):
            raise TypeError(f"{cls._NAME}.from_reference takes a reference "
                            f"{cls._REFERENCE.__name__} (fxquant.nn.reference), "
                            f"got {type(ref_mod).__name__}")
        qmod = cls._empty_like(ref_mod)
        if pack_engine is not None:
            if pack_engine not in supported_engines():
                raise ValueError(f"{cls._NAME}: engine {pack_engine!r} is not in this torch "
                                 f"build ({', '.join(supported_engines())})")
            qmod.pack_engine = pack_engine
        qmod.set_weight_bias(ref_mod.quantized_weight(), ref_mod.bias)
        qmod.set_output_qparams(output_scale, output_zero_point)
        return qmod

    def _weight_repr(self) -> str:
        s = f"scale={self.scale}, zero_point={self.zero_point}, dtype={self.weight_dtype}, " \
            f"qscheme={self.weight_qscheme}"
        return s if self._has_bias else s + ", bias=False"


class Linear(_PackedWeighted, kernel="linear"):
    """Quantized linear: quint8 (*, in_features) -> quint8 (*, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._init_packed(self._weight_shape(), bias)

    def _weight_shape(self) -> list[int]:
        return [self.out_features, self.in_features]

    def _out_channels(self) -> int:
        return self.out_features

    @classmethod
    def _empty_like(cls, mod: nn.Module) -> Linear:
        return cls(mod.in_features, mod.out_features, mod.bias is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self._weight_repr()}")


class LinearReLU(Linear, kernel="linear_relu"):
    """Quantized linear followed by ReLU, one kernel (quantized::linear_relu)."""


# --------------------------------------------------------------------------------------------
# convolutions


def _ntuple(value: Any, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}")
    return out


def _resolve_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...],
                     owner: str) -> tuple[int, ...]:
    """Int padding per spatial dim; 'valid' / symmetric 'same' resolved like nn.Conv."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in totals):
            raise NotImplementedError(
                f"{owner}: padding='same' with kernel {kernel} / dilation {dilation} needs "
                "asymmetric padding, which the quantized conv kernels cannot express; use "
                "odd kernel sizes or pad explicitly before the conv"
            )
        return tuple(t // 2 for t in totals)
    return _ntuple(padding, len(kernel), "padding")


def _pad_quantized(x: torch.Tensor, pad: list[int], mode: str) -> torch.Tensor:
    """F.pad for a per-tensor quantized tensor in any mode, exact: pads the integers."""
    ints = x.int_repr()
    padded = F.pad(ints.float(), pad, mode=mode).to(ints.dtype)
    return torch._make_per_tensor_quantized_tensor(padded, x.q_scale(), x.q_zero_point())


class _ConvNd(_PackedWeighted):
    """Shared state of the quantized (transposed) convolutions."""


    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        self._configure(in_channels, out_channels, groups, padding_mode)
        self._configure_geometry(kernel_size, stride, padding, dilation, 0)
        self._init_packed(self._weight_shape(), bias)

    def _configure(self, in_channels: int, out_channels: int, groups: int,
                   padding_mode: str) -> None:
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.groups = int(groups)
        self.padding_mode = self._check_padding_mode(padding_mode)
        self._check_channels()

    def _configure_geometry(self, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                            output_padding: Any) -> None:
        n = self._SPATIAL_DIMS
        self.kernel_size = _ntuple(kernel_size, n, "kernel_size")
        self.stride = _ntuple(stride, n, "stride")
        self.dilation = _ntuple(dilation, n, "dilation")
        self.padding = _resolve_padding(padding, self.kernel_size, self.dilation, self._NAME)
        self.output_padding = _ntuple(output_padding, n, "output_padding")
        self._input_pad: list[int] = [p for p in reversed(self.padding) for _ in range(2)]
        self._input_dims: int = n + 2

    def _check_padding_mode(self, mode: str) -> str:
        if mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"{self._NAME}: unknown padding_mode {mode!r}")
        return mode

    def _check_channels(self) -> None:
        if self.groups <= 0 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{self._NAME}: in_channels ({self.in_channels}) and out_channels "
                f"({self.out_channels}) must both be divisible by groups ({self.groups})"
            )

    def _weight_shape(self) -> list[int]:
        return [self.out_channels, self.in_channels // self.groups, *self.kernel_size]

    def _out_channels(self) -> int:
        return self.out_channels

    def _pack_args(self) -> tuple[Any, ...]:
        return list(self.stride), self._kernel_padding(), list(self.dilation), self.groups

    def _kernel_padding(self) -> list[int]:
        """Padding given to the kernel: zero when we pad the input ourselves."""
        return list(self.padding) if self.padding_mode == "zeros" else [0] * len(self.padding)

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self._input_dims:
            raise ValueError(f"{self._qname} expects a {self._input_dims}-D (N, C, *spatial) "
                             f"quantized input, got {x.dim()}-D")
        if self.padding_mode == "zeros":
            return x
        return _pad_quantized(x, self._input_pad, self.padding_mode)

    @classmethod
    def _empty_like(cls, mod: nn.Module) -> _ConvNd:
        return cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                   mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode)

    def extra_repr(self) -> str:
        n = self._SPATIAL_DIMS
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, {self._weight_repr()}")
        extras = [("padding", self.padding, (0,) * n), ("dilation", self.dilation, (1,) * n),
                  ("output_padding", self.output_padding, (0,) * n), ("groups", self.groups, 1),
                  ("padding_mode", self.padding_mode, "zeros")]
        return s + "".join(f", {k}={v!r}" if isinstance(v, str) else f", {k}={v}"
                           for k, v, default in extras if v != default)


class Conv1d(_ConvNd, kernel="conv1d", dims=1):
    """Quantized Conv1d (padding modes: zeros, reflect, replicate, circular)."""


class Conv2d(_ConvNd, kernel="conv2d", dims=2):
    """Quantized Conv2d (padding modes: zeros, reflect, replicate, circular)."""


class Conv3d(_ConvNd, kernel="conv3d", dims=3):
    """Quantized Conv3d (padding modes: zeros, reflect, replicate, circular)."""


class ConvReLU1d(Conv1d, kernel="conv1d_relu"):
    """Quantized Conv1d followed by ReLU, one kernel (quantized::conv1d_relu)."""


class ConvReLU2d(Conv2d, kernel="conv2d_relu"):
    """Quantized Conv2d followed by ReLU, one kernel (quantized::conv2d_relu)."""


class ConvReLU3d(Conv3d, kernel="conv3d_relu"):
    """Quantized Conv3d followed by ReLU, one kernel (quantized::conv3d_relu)."""


class _ConvTransposeNd(_ConvNd):
    """Transposed convs: weight (C_in, C_out // groups, *k); zeros padding only.

    Engines: under "x86" and "onednn" the weights are packed with fbgemm, because torch's
    onednn quantized deconvolution returned wrong values (off by up to 255 steps against
    float math on the same int8 data; fbgemm and qnnpack matched) in torch 2.13 on our CPUs.
    Per-channel weights need qnnpack: the other engines have no per-channel transposed-conv
    kernel, so they are refused with NotImplementedError.
    """

    _WEIGHT_CH_AXIS = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, output_padding: Any = 0, groups: int = 1, bias: bool = True,
                 dilation: Any = 1, padding_mode: str = "zeros") -> None:
        _QuantizedBase.__init__(self)
        self._configure(in_channels, out_channels, groups, padding_mode)
        self._configure_geometry(kernel_size, stride, padding, dilation, output_padding)
        self._init_packed(self._weight_shape(), bias)

    def packing_engine(self) -> str:
        if getattr(self, "pack_engine", None):
            return self.pack_engine
        packing = deconv_packing_engine()
        if packing is None:
            raise NotImplementedError(
                f"{self._NAME}: the {current_engine()!r} engine's transposed conv gives wrong "
                "results and this torch build has no fbgemm to pack with instead; keep it in float"
            )
        return packing

    def _check_padding_mode(self, mode: str) -> str:
        if mode != "zeros":
            raise ValueError(f"{self._NAME} supports only padding_mode='zeros', got {mode!r}")
        return mode

    def _weight_shape(self) -> list[int]:
        return [self.in_channels, self.out_channels // self.groups, *self.kernel_size]

    def _check_weight(self, w: torch.Tensor) -> None:
        super()._check_weight(w)
        packing = self.packing_engine()
        if w.qscheme() != torch.per_tensor_affine and not has_per_channel_deconv(packing):
            raise NotImplementedError(
                f"{self._NAME}: per-channel weights are not supported for transposed conv on "
                f"the {current_engine()!r} engine (it packs with {packing}; only qnnpack has a "
                "per-channel transposed-conv kernel); use a per-tensor weight observer for "
                "ConvTranspose"
            )

    def _pack_args(self) -> tuple[Any, ...]:
        return (list(self.stride), list(self.padding), list(self.output_padding),
                list(self.dilation), self.groups)

    @classmethod
    def _empty_like(cls, mod: nn.Module) -> _ConvTransposeNd:
        return cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                   mod.output_padding, mod.groups, mod.bias is not None, mod.dilation,
                   mod.padding_mode)


class ConvTranspose1d(_ConvTransposeNd, kernel="conv_transpose1d", dims=1):
    """Quantized ConvTranspose1d (quantized::conv_transpose1d)."""


class ConvTranspose2d(_ConvTransposeNd, kernel="conv_transpose2d", dims=2):
    """Quantized ConvTranspose2d (quantized::conv_transpose2d)."""


class ConvTranspose3d(_ConvTransposeNd, kernel="conv_transpose3d", dims=3):
    """Quantized ConvTranspose3d (quantized::conv_transpose3d)."""

    def _pack(self, w: torch.Tensor, b: torch.Tensor | None) -> Any:
        if is_deconv3d_wrong():
            raise NotImplementedError(
                "QuantizedConvTranspose3d is not supported on the 'qnnpack' engine: its "
                "conv_transpose3d kernel returns nondeterministic, wrong values (torch "
                f"{torch.__version__}); lower ConvTranspose3d with fbgemm, x86 or onednn, or "
                "keep it in float"
            )
        return super()._pack(w, b)


# --------------------------------------------------------------------------------------------
# batch norm


class _BatchNormNd(_QuantizedBase):
    """Quantized eval BatchNorm; statistics and affine terms are float buffers."""

    _FLOAT = nn.BatchNorm2d
    _FUSED = None
    _DIMS = 4

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self._input_dims: int = self._DIMS
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                           ("running_var", 1.0)):
            self.register_buffer(name, torch.full((self.num_features,), fill))

    @classmethod
    def _bind(cls, kernel: str, dims: int) -> None:
        """As _PackedWeighted._bind; ``dims`` spatial dims (the input has two more)."""
        cls.forward = _batch_norm_forward(getattr(_OPS, kernel))
        if kernel.endswith("_relu"):
            cls._FUSED = getattr(fused, cls.__name__)
            return
        cls._FLOAT, cls._DIMS = getattr(nn, cls.__name__), dims + 2

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, scale={self.scale}, "
                f"zero_point={self.zero_point}")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self._input_dims:
            raise ValueError(f"{self._qname} expects a {self._input_dims}-D quantized input, "
                             f"got {x.dim()}-D")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str], *rest: Any) -> None:
        self._pop_output_qparams(state_dict, prefix, missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      *rest)

    @classmethod
    def _float_core(cls, mod: nn.Module) -> nn.modules.batchnorm._BatchNorm:
        if cls._FUSED is not None and isinstance(mod, cls._FUSED):
            mod = mod[0]
        accepts = cls._FLOAT.__name__ + (f" or fused {cls._FUSED.__name__}" if cls._FUSED else "")
        if not isinstance(mod, cls._FLOAT):
            raise TypeError(f"{cls._NAME}.from_float takes {accepts}, got {type(mod).__name__}")
        if mod.running_mean is None or mod.running_var is None:
            raise ValueError(f"{cls._NAME}: the float BatchNorm has no running statistics "
                             "(track_running_stats=False); it cannot be quantized")
        return mod

    @classmethod
    def from_float(cls, mod: nn.Module, wq: WeightQParams | None, output_scale: float,
                   output_zero_point: int) -> Any:
        """From a float BatchNorm (or fused BNReLU for the ReLU kinds); ``wq`` must be None."""
        if wq is not None:
            raise ValueError(f"{cls._NAME}.from_float: BatchNorm has no quantized weight; "
                             "pass wq=None")
        bn = cls._float_core(mod)
        qbn = cls(bn.num_features, bn.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(bn, name)
            if value is not None:
                getattr(qbn, name).copy_(value.detach())
        qbn.set_output_qparams(output_scale, output_zero_point)
        return qbn

    @classmethod
    def from_reference(cls, ref_mod: nn.Module, output_scale: float,
                       output_zero_point: int) -> Any:
        """The reference form of a BatchNorm is the float BatchNorm itself."""
        return cls.from_float(ref_mod, None, output_scale, output_zero_point)


class BatchNorm2d(_BatchNormNd, kernel="batch_norm2d", dims=2):
    """Quantized BatchNorm2d (quantized::batch_norm2d)."""


class BatchNorm3d(_BatchNormNd, kernel="batch_norm3d", dims=3):
    """Quantized BatchNorm3d (quantized::batch_norm3d)."""


class BNReLU2d(BatchNorm2d, kernel="batch_norm2d_relu"):
    """Quantized BatchNorm2d followed by ReLU (quantized::batch_norm2d_relu)."""


class BNReLU3d(BatchNorm3d, kernel="batch_norm3d_relu"):
    """Quantized BatchNorm3d followed by ReLU (quantized::batch_norm3d_relu)."""


QUANTIZED_MODULES: tuple[type[nn.Module], ...] = (
    Linear, LinearReLU, Conv1d, Conv2d, Conv3d, ConvReLU1d, ConvReLU2d, ConvReLU3d,
    ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
    BatchNorm2d, BatchNorm3d, BNReLU2d, BNReLU3d,
)
"""Every quantized module class here; the tracer treats them as leaves."""
