"""Dynamic-quantized modules: float in, float out.

Weights are quantized ahead of time (``torch.qint8``, per tensor or per channel) or stored as
``torch.float16``; activations are quantized on the fly inside torch's kernels
(``quantized::linear_dynamic``, ``torch.quantized_lstm``, ``torch.quantized_gru``,
``quantized::quantized_*_cell_dynamic``). ``from_float`` gives exactly what
PyTorch's eager ``quantize_dynamic`` gives for the same float module and dtype: same weight
qparams, same packing, same kernels, so the outputs are bit-identical.

Packed weights and the quantized engine
---------------------------------------
torch's packed weights (``LinearPackedParamsBase``, ``CellParamsBase``) are built for the
quantized engine that is current when they are packed (``torch.backends.quantized.engine``:
"x86"/"fbgemm", "qnnpack", ...); a packed weight keeps running the kernels of the engine it was
packed for. These modules therefore never serialize packed objects themselves:

* ``state_dict()`` holds the *unpacked* weights (``qint8`` quantized tensors, or float32 tensors
  holding float16 values for ``dtype=torch.float16``) and float biases, under the float module's
  parameter names; ``load_state_dict`` re-packs them under the current engine.
* ``torch.save(module)`` / ``copy.deepcopy`` go through ``__getstate__``/``__setstate__``, which
  store the unpacked weights and re-pack them when loaded, under the engine current at load time.
* ``torch.jit.script``-ed modules serialize the packed objects through torch's own pickling,
  which also re-packs under the engine current at ``torch.jit.load``.
* After switching engines in a live process, call ``module.repack()``. ``module.engine`` names the
  engine the weights were packed for.

float16 packing (``linear_prepack_fp16``) exists only on the fbgemm/x86 engines.
"""

from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fxquant.backends.engine import fp16_packing_available

__all__ = ["Linear", "LinearReLU", "LSTM", "GRU", "LSTMCell", "GRUCell", "RNNCell"]

ObserverFactory = Callable[[], Any]

_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_FLOAT_QPARAMS = torch.per_channel_affine_float_qparams
_DYNAMIC_DTYPES = (torch.qint8, torch.float16)
_UNPACKED_KEY = "_fxquant_unpacked_state"


# --------------------------------------------------------------------------------------------
# weight observation and quantization (private; shared with fxquant.nn.embedding)
# --------------------------------------------------------------------------------------------

def _default_weight_observer_factory(dtype: torch.dtype) -> Optional[ObserverFactory]:
    """torch's default weight observer for ``dtype``; None for float16 (nothing to observe)."""
    from fxquant import observers

    return {torch.qint8: observers.default_weight_observer,
            torch.quint8: observers.default_float_qparams_observer,
            torch.quint4x2: observers.default_float_qparams_observer_4bit}.get(dtype)


def _new_observer(factory: Optional[ObserverFactory], dtype: torch.dtype, owner: str) -> Any:
    """One fresh observer from ``factory`` (or torch's default for ``dtype``), checked."""
    factory = factory if factory is not None else _default_weight_observer_factory(dtype)
    if factory is None:
        return None
    obs = factory()
    if obs.dtype != dtype:
        raise ValueError(
            f"{owner}.from_float: dtype={dtype} but the weight observer's dtype is {obs.dtype}; "
            f"pass dtype={obs.dtype} or an observer factory for {dtype}")
    return obs


def _observer_range(observer: Any) -> Tuple[Optional[int], Optional[int]]:
    inner = getattr(observer, "activation_post_process", observer)  # a FakeQuantize wraps one
    return getattr(inner, "quant_min", None), getattr(inner, "quant_max", None)


def _clamp_to_observer_range(q: Tensor, observer: Any) -> Tensor:
    """Clamp integer values into the observer's quant range when it is narrower than the dtype's
    (e.g. qint8 with quant_min=-127), as torch.ao does."""
    if q.dtype not in (torch.qint8, torch.quint8, torch.qint32):
        return q
    qmin, qmax = _observer_range(observer)
    info = torch.iinfo(q.dtype)
    if qmin is None or qmax is None or (qmin <= info.min and qmax >= info.max):
        return q
    ints = q.int_repr().clamp(qmin, qmax)
    if q.qscheme() in _PER_TENSOR:
        return torch._make_per_tensor_quantized_tensor(ints, q.q_scale(), q.q_zero_point())
    return torch._make_per_channel_quantized_tensor(
        ints, q.q_per_channel_scales(), q.q_per_channel_zero_points(), q.q_per_channel_axis())


def _quantize_weight(weight: Tensor, observer: Any) -> Tensor:
    """Observe ``weight`` and quantize it with the observer's qparams, qscheme and dtype."""
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    w = weight.detach().float()
    qscheme = observer.qscheme
    if qscheme in _PER_TENSOR:
        q = torch.quantize_per_tensor(w, float(scale), int(zero_point), observer.dtype)
    elif qscheme in _PER_CHANNEL:
        q = torch.quantize_per_channel(w, scale.to(torch.double), zero_point.to(torch.int64),
                                       observer.ch_axis, observer.dtype)
    elif qscheme == _FLOAT_QPARAMS:
        q = torch.quantize_per_channel(w, scale.to(torch.float), zero_point.to(torch.float),
                                       observer.ch_axis, observer.dtype)
    else:
        raise ValueError(f"weight observer has unsupported qscheme {qscheme}; use a per-tensor "
                         "or per-channel observer")
    return _clamp_to_observer_range(q, observer)


def _dynamic_weight(weight: Tensor, dtype: torch.dtype, factory: Optional[ObserverFactory],
                    owner: str) -> Tensor:
    """The stored form of a float weight: qint8 quantized, or float32 for float16 packing."""
    obs = _new_observer(factory, dtype, owner)
    if dtype == torch.float16:
        return weight.detach().float()
    if obs.qscheme in _PER_CHANNEL and obs.ch_axis != 0:
        raise ValueError(f"{owner}: per-channel weights must use ch_axis=0 (output channels), "
                         f"got ch_axis={obs.ch_axis}")
    if obs.qscheme not in _PER_TENSOR + _PER_CHANNEL:
        raise ValueError(f"{owner}: qint8 weights need a per-tensor or per-channel observer, got "
                         f"qscheme {obs.qscheme}")
    return _quantize_weight(weight, obs)


def _check_dtype(dtype: torch.dtype, allowed: Tuple[torch.dtype, ...], owner: str) -> torch.dtype:
    if dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{owner} supports dtype {names}, got {dtype}; pass one of those")
    return dtype


def _check_weight(name: str, w: Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> None:
    """A stored weight must have the module's shape and the module's dtype."""
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(w.shape)}, expected {shape}; build the module "
                         "with the sizes of the weights you load")
    want = torch.float32 if dtype == torch.float16 else dtype
    if w.dtype != want:
        raise ValueError(f"{name} has dtype {w.dtype} but this module was built with "
                         f"dtype={dtype}; build it with the dtype the weights were saved with")


def _pack_linear(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Any:
    """torch's packed linear weight for the current engine."""
    b = None if bias is None else bias.detach().float()
    if dtype == torch.float16:
        if not fp16_packing_available():
            raise RuntimeError("float16 dynamic weights need the fbgemm/x86 engine; set "
                               "torch.backends.quantized.engine = 'x86' or use dtype=torch.qint8")
        return torch.ops.quantized.linear_prepack_fp16(weight, b)
    return torch.ops.quantized.linear_prepack(weight, b)


def _unpack_linear(packed: Any, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    if dtype == torch.float16:
        return torch.ops.quantized.linear_unpack_fp16(packed)
    return torch.ops.quantized.linear_unpack(packed)


def _placeholder_weight(shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
    w = torch.zeros(shape)
    if dtype == torch.float16:
        return w
    return torch.quantize_per_tensor(w, 1.0, 0, torch.qint8)


def _qscheme_repr(w: Tensor) -> str:
    return f", qscheme={w.qscheme()}" if w.is_quantized else ""


# --------------------------------------------------------------------------------------------
# serialization of packed weights
# --------------------------------------------------------------------------------------------

class _PackedWeightsModule(nn.Module):
    """A module whose weights live in torch's packed objects.

    Subclasses say which tensors make up their state (``_state_keys``), how to read them back
    from the packed objects (``_unpacked_state``) and how to pack them (``_set_unpacked_state``).
    This base turns that into ``state_dict``/``load_state_dict``, pickling and ``repack``.
    """

    engine: str

    def _state_keys(self) -> List[str]:
        raise NotImplementedError

    def _unpacked_state(self) -> Dict[str, Tensor]:
        raise NotImplementedError

    def _set_unpacked_state(self, state: Mapping[str, Tensor]) -> None:
        raise NotImplementedError

    def _packed_attrs(self) -> Tuple[str, ...]:
        raise NotImplementedError

    def repack(self) -> None:
        """Re-pack the weights for the current ``torch.backends.quantized.engine``."""
        self._set_unpacked_state(self._unpacked_state())

    def _record_engine(self) -> None:
        self.engine = torch.backends.quantized.engine

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self._unpacked_state().items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str,
                              local_metadata: Dict[str, Any], strict: bool,
                              missing_keys: List[str], unexpected_keys: List[str],
                              error_msgs: List[str]) -> None:
        ours = {k: state_dict[prefix + k] for k in self._state_keys() if prefix + k in state_dict}
        missing = [prefix + k for k in self._state_keys() if k not in ours]
        missing_keys.extend(missing)
        rest = {k: v for k, v in state_dict.items()
                if not (k.startswith(prefix) and k[len(prefix):] in ours)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if missing:
            return
        try:
            self._set_unpacked_state(ours)
        except (ValueError, RuntimeError) as e:
            error_msgs.append(f"while loading {type(self).__name__} at '{prefix}': {e}")

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state[_UNPACKED_KEY] = self._unpacked_state()
        for attr in self._packed_attrs():
            state.pop(attr, None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        unpacked = state.pop(_UNPACKED_KEY)
        super().__setstate__(state)
        self._set_unpacked_state(unpacked)


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------

def _as_linear(mod: nn.Module, owner: str, allow_relu: bool) -> nn.Linear:
    """The nn.Linear inside ``mod``: mod itself, or mod[0] of a (Linear, ReLU) pair."""
    if isinstance(mod, nn.Linear):
        return mod
    if allow_relu and isinstance(mod, nn.Sequential) and len(mod) == 2 \
            and isinstance(mod[0], nn.Linear) and isinstance(mod[1], nn.ReLU):
        return mod[0]
    want = "nn.Linear or a (nn.Linear, nn.ReLU) sequential pair" if allow_relu else "nn.Linear"
    raise TypeError(f"{owner}.from_float expects {want}, got {type(mod).__name__}")


def _linear_forward(op: Any, op_fp16: Any) -> Callable[..., Tensor]:
    """The forward of a dynamic linear class over the qint8 kernel ``op`` and the float16
    kernel ``op_fp16``: a closure, so that each class names its kernels once and TorchScript
    still sees static ops."""

    def forward(self, x: Tensor) -> Tensor:
        if self.dtype == torch.float16:
            y = op_fp16(x, self._packed)
        else:
            y = op(x, self._packed, reduce_range=True)
        return y.to(x.dtype)

    return forward


class Linear(_PackedWeightsModule):
    """Dynamic-quantized ``nn.Linear``: ``y = x W^T + b`` with float ``x`` and ``y``.

    qint8 weights (per tensor or per channel on axis 0) run ``quantized::linear_dynamic`` with
    ``reduce_range=True`` (as torch.ao does: activations use a 7-bit range on fbgemm/x86);
    float16 weights run ``quantized::linear_dynamic_fp16``.
    """

    _owner: ClassVar[str] = "fxquant.nn.dynamic.Linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.qint8) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.dtype = _check_dtype(dtype, _DYNAMIC_DTYPES, self._owner)
        self.engine = ""
        b = torch.zeros(out_features) if bias else None
        self.set_weight_bias(_placeholder_weight((out_features, in_features), dtype), b)

    forward = _linear_forward(torch.ops.quantized.linear_dynamic,
                              torch.ops.quantized.linear_dynamic_fp16)

    def set_weight_bias(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        """Pack ``weight`` (qint8 quantized, or float for float16) and float ``bias``."""
        _check_weight("weight", weight, (self.out_features, self.in_features), self.dtype)
        if (bias is not None) != self.has_bias:
            raise ValueError(f"bias is {'given' if bias is not None else 'None'} but the module "
                             f"was built with bias={self.has_bias}; build it to match")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self._packed = _pack_linear(weight, bias, self.dtype)
        self._record_engine()

    def weight(self) -> Tensor:
        return _unpack_linear(self._packed, self.dtype)[0]

    def bias(self) -> Optional[Tensor]:
        # qnnpack unpacks a missing bias as zeros, so has_bias decides
        return _unpack_linear(self._packed, self.dtype)[1] if self.has_bias else None

    def _state_keys(self) -> List[str]:
        return ["weight", "bias"] if self.has_bias else ["weight"]

    def _unpacked_state(self) -> Dict[str, Tensor]:
        w, b = _unpack_linear(self._packed, self.dtype)
        return {"weight": w, "bias": b} if self.has_bias and b is not None else {"weight": w}

    def _set_unpacked_state(self, state: Mapping[str, Tensor]) -> None:
        self.set_weight_bias(state["weight"], state.get("bias"))

    def _packed_attrs(self) -> Tuple[str, ...]:
        return ("_packed",)

    def _get_name(self) -> str:
        return "DynamicQuantized" + type(self).__name__

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.has_bias}, dtype={self.dtype}{_qscheme_repr(self.weight())}")

    @classmethod
    def from_float(cls, mod: nn.Module, weight_observer_factory: Optional[ObserverFactory] = None,
                   dtype: torch.dtype = torch.qint8) -> "Linear":
        """Quantize the weight of float ``mod`` as PyTorch's eager ``quantize_dynamic``.

        ``weight_observer_factory`` (called once) makes the weight observer; None means torch's
        default for ``dtype`` (MinMax qint8 per_tensor_symmetric; nothing for float16).
        """
        linear = _as_linear(mod, cls._owner, allow_relu=cls is not Linear)
        _check_dtype(dtype, _DYNAMIC_DTYPES, cls._owner)
        weight = _dynamic_weight(linear.weight, dtype, weight_observer_factory, cls._owner)
        qmod = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype)
        qmod.set_weight_bias(weight, linear.bias)
        return qmod


class LinearReLU(Linear):
    """Dynamic-quantized ``relu(linear(x))`` on ``quantized::linear_relu_dynamic`` (qint8) or
    ``quantized::linear_relu_dynamic_fp16`` (float16).

    ``from_float`` takes an ``nn.Linear`` (the ReLU is implied) or a (Linear, ReLU) sequential
    pair such as torch's fused ``LinearReLU``.
    """

    _owner: ClassVar[str] = "fxquant.nn.dynamic.LinearReLU"

    forward = _linear_forward(torch.ops.quantized.linear_relu_dynamic,
                              torch.ops.quantized.linear_relu_dynamic_fp16)


# --------------------------------------------------------------------------------------------
# LSTM / GRU
# --------------------------------------------------------------------------------------------

def _make_cell_params(p_ih: Any, p_hh: Any, b_ih: Tensor, b_hh: Tensor,
                      dtype: torch.dtype) -> Any:
    """torch's dynamic CellParamsBase for one layer and direction.

    The kernels take the biases from the packed weights; ``b_ih``/``b_hh`` are only required
    arguments (zeros when the module has no bias).
    """
    if dtype == torch.float16:
        return torch.ops.quantized.make_quantized_cell_params_fp16(p_ih, p_hh)
    return torch.ops.quantized.make_quantized_cell_params_dynamic(p_ih, p_hh, b_ih, b_hh, True)


def _rnn_float_state(mod: nn.Module, keys: List[str], dtype: torch.dtype,
                     factory: Optional[ObserverFactory], owner: str) -> Dict[str, Tensor]:
    """Stored weights (quantized, one fresh observer each) and float biases of a float RNN."""
    state: Dict[str, Tensor] = {}
    for key in keys:
        value = getattr(mod, key)
        if key.startswith("weight"):
            state[key] = _dynamic_weight(value, dtype, factory, owner)
        else:
            state[key] = value.detach().float()
    return state


class _NamedWeights(_PackedWeightsModule):
    """Modules whose weights and biases are named as in the float module (RNNs and cells)."""

    _qname: str

    def set_weight_bias(self, state: Mapping[str, Tensor]) -> None:
        """Pack weights (qint8 quantized, or float for float16) and biases named as in the
        float module (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_ih``, ...)."""
        missing = [k for k in self._state_keys() if k not in state]
        if missing:
            raise ValueError(f"set_weight_bias: missing {missing}")
        self._set_unpacked_state(state)

    def get_weight_bias(self) -> Dict[str, Tensor]:
        """The stored weights and biases, under the float module's parameter names."""
        return self._unpacked_state()

    def _get_name(self) -> str:
        return self._qname


class _RNNBase(_NamedWeights):
    """Shared parts of the dynamic LSTM and GRU: argument checks, packing, state, repr."""

    _mode: ClassVar[str] = ""
    _gates: ClassVar[int] = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, dtype: torch.dtype = torch.qint8) -> None:
        super().__init__()
        owner = f"fxquant.nn.dynamic.{self._mode}"
        if num_layers < 1 or input_size < 1 or hidden_size < 1:
            raise ValueError(f"{owner}: input_size, hidden_size and num_layers must be >= 1")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1], got {dropout}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)  # kept for the record; inference never applies dropout
        self.bidirectional = bidirectional
        self.dtype = _check_dtype(dtype, _DYNAMIC_DTYPES, owner)
        self.engine = ""
        self._qname = "DynamicQuantized" + self._mode  # an instance attribute for TorchScript
        self._set_unpacked_state(self._placeholder_state())

    def _num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> List[str]:
        dirs = ["", "_reverse"][: self._num_directions()]
        return [f"_l{layer}{d}" for layer in range(self.num_layers) for d in dirs]

    def _state_keys(self) -> List[str]:
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        return [n + s for s in self._suffixes() for n in names]

    def _weight_shape(self, key: str) -> Tuple[int, ...]:
        rows = self._gates * self.hidden_size
        if key.startswith("bias"):
            return (rows,)
        if key.startswith("weight_hh"):
            return (rows, self.hidden_size)
        first = key.startswith("weight_ih_l0")
        return (rows, self.input_size if first else self.hidden_size * self._num_directions())

    def _placeholder_state(self) -> Dict[str, Tensor]:
        return {k: (torch.zeros(self._weight_shape(k)) if k.startswith("bias")
                    else _placeholder_weight(self._weight_shape(k), self.dtype))
                for k in self._state_keys()}

    def _set_unpacked_state(self, state: Mapping[str, Tensor]) -> None:
        packed_ih, packed_hh, cells = [], [], []
        zeros = torch.zeros(self._gates * self.hidden_size)
        for sfx in self._suffixes():
            for key in (f"weight_ih{sfx}", f"weight_hh{sfx}"):
                _check_weight(key, state[key], self._weight_shape(key), self.dtype)
            b_ih = state[f"bias_ih{sfx}"].float() if self.bias else None
            b_hh = state[f"bias_hh{sfx}"].float() if self.bias else None
            p_ih = _pack_linear(state[f"weight_ih{sfx}"], b_ih, self.dtype)
            p_hh = _pack_linear(state[f"weight_hh{sfx}"], b_hh, self.dtype)
            cells.append(_make_cell_params(p_ih, p_hh, zeros if b_ih is None else b_ih,
                                           zeros if b_hh is None else b_hh, self.dtype))
            packed_ih.append(p_ih)
            packed_hh.append(p_hh)
        self._packed_ih, self._packed_hh, self._cell_params = packed_ih, packed_hh, cells
        # torch.jit.trace resolves a packed object only when it is an attribute of a module
        # (a list attribute is not searched), so each cell's params are one attribute too.
        for i, cell in enumerate(cells):
            setattr(self, f"_cell_params_{i}", cell)
        self._record_engine()

    def _unpacked_state(self) -> Dict[str, Tensor]:
        state: Dict[str, Tensor] = {}
        for sfx, p_ih, p_hh in zip(self._suffixes(), self._packed_ih, self._packed_hh):
            for kind, packed in (("ih", p_ih), ("hh", p_hh)):
                w, b = _unpack_linear(packed, self.dtype)
                state[f"weight_{kind}{sfx}"] = w
                if self.bias and b is not None:
                    state[f"bias_{kind}{sfx}"] = b
        return {k: state[k] for k in self._state_keys()}

    def _packed_attrs(self) -> Tuple[str, ...]:
        cells = tuple(f"_cell_params_{i}" for i in range(len(self._suffixes())))
        return ("_packed_ih", "_packed_hh", "_cell_params") + cells

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.bidirectional:
            s += ", bidirectional=True"
        w, _ = _unpack_linear(self._packed_ih[0], self.dtype)
        return s + f", dtype={self.dtype}{_qscheme_repr(w)}"

    def _check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        if torch.jit.is_tracing():  # a trace keeps no Python checks; skip them (no TracerWarning)
            return
        expected = 2 if batch_sizes is not None else 3
        if input.dim() != expected:
            raise RuntimeError(
                f"{self._qname}: input must have {expected} dimensions "
                f"((seq, batch, feature), or batch first), got {input.dim()}; "
                f"unbatched input needs a batch dimension of 1")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"{self._qname}: input.size(-1) must be input_size="
                               f"{self.input_size}, got {input.size(-1)}")

    def _checked_batch(self, input: Tensor) -> int:
        """The batch size of a checked (seq, batch, feature) or batch-first input."""
        self._check_input(input, None)
        return input.size(0) if self.batch_first else input.size(1)

    def _check_hidden(self, hx: Tensor, batch: int, which: str) -> None:
        if torch.jit.is_tracing():  # a trace keeps no Python checks; skip them (no TracerWarning)
            return
        expected = [self.num_layers * self._num_directions(), batch, self.hidden_size]
        if list(hx.size()) != expected:
            raise RuntimeError(f"{self._qname}: {which} must have size {expected} "
                               f"(num_layers * num_directions, batch, hidden_size), "
                               f"got {list(hx.size())}")

    def _zeros_hidden(self, input: Tensor, batch: int) -> Tensor:
        return torch.zeros(self.num_layers * self._num_directions(), batch, self.hidden_size,
                           dtype=input.dtype, device=input.device)

    @classmethod
    def from_float(cls, mod: nn.Module, weight_observer_factory: Optional[ObserverFactory] = None,
                   dtype: torch.dtype = torch.qint8) -> "_RNNBase":
        """Quantize every weight of float ``mod`` as PyTorch's eager ``quantize_dynamic``:
        one fresh observer per weight matrix (``weight_observer_factory`` or torch's default for
        ``dtype``), float biases kept."""
        owner = f"fxquant.nn.dynamic.{cls._mode}"
        float_cls = getattr(nn, cls._mode)
        if not isinstance(mod, float_cls):
            raise TypeError(f"{owner}.from_float expects nn.{cls._mode}, got {type(mod).__name__}")
        if getattr(mod, "proj_size", 0):
            raise ValueError(f"{owner}.from_float: proj_size={mod.proj_size} has no quantized "
                             "kernel; use an LSTM without projections")
        _check_dtype(dtype, _DYNAMIC_DTYPES, owner)
        qmod = cls(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias, mod.batch_first,
                   mod.dropout, mod.bidirectional, dtype)
        qmod._set_unpacked_state(
            _rnn_float_state(mod, qmod._state_keys(), dtype, weight_observer_factory, owner))
        return qmod


def _permute(hx: Tensor, permutation: Optional[Tensor]) -> Tensor:
    return hx if permutation is None else hx.index_select(1, permutation)


class LSTM(_RNNBase):
    """Dynamic-quantized ``nn.LSTM`` on ``torch.quantized_lstm`` (dynamic cell params).

    Multi-layer, bidirectional, ``batch_first``; ``hx=(h0, c0)`` optional (zeros);
    ``PackedSequence`` input in eager mode (TorchScript: tensor input). Returns
    ``output, (h_n, c_n)`` like ``nn.LSTM``. ``proj_size`` is not supported.
    """

    _mode: ClassVar[str] = "LSTM"
    _gates: ClassVar[int] = 4

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(input, PackedSequence):  # eager only; TorchScript sees a Tensor
            return self._forward_packed(input, hx)
        batch = self._checked_batch(input)
        hx = self._prepare_hidden(input, hx, batch, None)
        out = torch.quantized_lstm(input, hx, self._cell_params, True, self.num_layers,
                                   self.dropout, False, self.bidirectional, self.batch_first,
                                   dtype=self.dtype, use_dynamic=True)
        return out[0], (out[1], out[2])

    def _prepare_hidden(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], batch: int,
                        sorted_indices: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if hx is None:
            zeros = self._zeros_hidden(input, batch)
            return zeros, zeros
        h0 = _permute(hx[0], sorted_indices)
        c0 = _permute(hx[1], sorted_indices)
        self._check_hidden(h0, batch, "h0")
        self._check_hidden(c0, batch, "c0")
        return h0, c0

    @torch.jit.unused
    def _forward_packed(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]]
                        ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        self._check_input(data, batch_sizes)
        h = self._prepare_hidden(data, hx, int(batch_sizes[0]), sorted_indices)
        out = torch.quantized_lstm(data, batch_sizes, h, self._cell_params, True,
                                   self.num_layers, self.dropout, False, self.bidirectional,
                                   dtype=self.dtype, use_dynamic=True)
        packed = PackedSequence(out[0], batch_sizes, sorted_indices, unsorted_indices)
        return packed, (_permute(out[1], unsorted_indices), _permute(out[2], unsorted_indices))


class GRU(_RNNBase):
    """Dynamic-quantized ``nn.GRU`` on ``torch.quantized_gru`` (dynamic cell params).

    Multi-layer, bidirectional, ``batch_first``; ``hx=h0`` optional (zeros); ``PackedSequence``
    input in eager mode (TorchScript: tensor input). Returns ``output, h_n`` like ``nn.GRU``.
    """

    _mode: ClassVar[str] = "GRU"
    _gates: ClassVar[int] = 3

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if isinstance(input, PackedSequence):  # eager only; TorchScript sees a Tensor
            return self._forward_packed(input, hx)
        batch = self._checked_batch(input)
        h0 = self._prepare_hidden(input, hx, batch, None)
        out = torch.quantized_gru(input, h0, self._cell_params, True, self.num_layers,
                                  self.dropout, False, self.bidirectional, self.batch_first)
        return out[0], out[1]

    def _prepare_hidden(self, input: Tensor, hx: Optional[Tensor], batch: int,
                        sorted_indices: Optional[Tensor]) -> Tensor:
        if hx is None:
            return self._zeros_hidden(input, batch)
        h0 = _permute(hx, sorted_indices)
        self._check_hidden(h0, batch, "h0")
        return h0

    @torch.jit.unused
    def _forward_packed(self, input: PackedSequence, hx: Optional[Tensor]
                        ) -> Tuple[PackedSequence, Tensor]:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        self._check_input(data, batch_sizes)
        h0 = self._prepare_hidden(data, hx, int(batch_sizes[0]), sorted_indices)
        out = torch.quantized_gru(data, batch_sizes, h0, self._cell_params, True,
                                  self.num_layers, self.dropout, False, self.bidirectional)
        packed = PackedSequence(out[0], batch_sizes, sorted_indices, unsorted_indices)
        return packed, _permute(out[1], unsorted_indices)


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------

class _CellBase(_NamedWeights):
    """Shared parts of the dynamic LSTMCell, GRUCell and RNNCell."""

    _mode: ClassVar[str] = ""
    _gates: ClassVar[int] = 0

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 dtype: torch.dtype = torch.qint8) -> None:
        super().__init__()
        owner = f"fxquant.nn.dynamic.{self._mode}"
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"{owner}: input_size and hidden_size must be >= 1")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.dtype = _check_dtype(dtype, _DYNAMIC_DTYPES, owner)
        self.engine = ""
        self._qname = "DynamicQuantized" + self._mode  # an instance attribute for TorchScript
        rows = self._gates * hidden_size
        state = {"weight_ih": _placeholder_weight((rows, input_size), dtype),
                 "weight_hh": _placeholder_weight((rows, hidden_size), dtype)}
        if bias:
            state.update(bias_ih=torch.zeros(rows), bias_hh=torch.zeros(rows))
        self._set_unpacked_state(state)

    def _state_keys(self) -> List[str]:
        return ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])

    def _set_unpacked_state(self, state: Mapping[str, Tensor]) -> None:
        rows = self._gates * self.hidden_size
        _check_weight("weight_ih", state["weight_ih"], (rows, self.input_size), self.dtype)
        _check_weight("weight_hh", state["weight_hh"], (rows, self.hidden_size), self.dtype)
        b_ih = state["bias_ih"].detach().float() if self.bias else None
        b_hh = state["bias_hh"].detach().float() if self.bias else None
        self._packed_ih = _pack_linear(state["weight_ih"], b_ih, self.dtype)
        self._packed_hh = _pack_linear(state["weight_hh"], b_hh, self.dtype)
        # the kernels read the biases from the packed weights; these are required arguments
        self._bias_ih = torch.zeros(rows) if b_ih is None else b_ih
        self._bias_hh = torch.zeros(rows) if b_hh is None else b_hh
        self._record_engine()

    def _unpacked_state(self) -> Dict[str, Tensor]:
        w_ih, b_ih = _unpack_linear(self._packed_ih, self.dtype)
        w_hh, b_hh = _unpack_linear(self._packed_hh, self.dtype)
        state = {"weight_ih": w_ih, "weight_hh": w_hh}
        if self.bias and b_ih is not None and b_hh is not None:
            state.update(bias_ih=b_ih, bias_hh=b_hh)
        return state

    def _packed_attrs(self) -> Tuple[str, ...]:
        return ("_packed_ih", "_packed_hh")

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        w, _ = _unpack_linear(self._packed_ih, self.dtype)
        return s + f", dtype={self.dtype}{_qscheme_repr(w)}"

    def _check_input(self, input: Tensor) -> None:
        if torch.jit.is_tracing():  # a trace keeps no Python checks; skip them (no TracerWarning)
            return
        if input.dim() != 2 or input.size(1) != self.input_size:
            raise RuntimeError(f"{self._qname}: input must be (batch, {self.input_size}), "
                               f"got {list(input.size())}; unbatched input needs unsqueeze(0)")

    def _check_hidden(self, input: Tensor, hx: Tensor, which: str) -> None:
        if torch.jit.is_tracing():  # a trace keeps no Python checks; skip them (no TracerWarning)
            return
        expected = [input.size(0), self.hidden_size]
        if list(hx.size()) != expected:
            raise RuntimeError(f"{self._qname}: {which} must have size {expected} "
                               f"(batch, hidden_size), got {list(hx.size())}")

    def _zeros_hidden(self, input: Tensor) -> Tensor:
        return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                           device=input.device)

    @classmethod
    def _cell_from_float(cls, mod: nn.Module, factory: Optional[ObserverFactory],
                         dtype: torch.dtype, **kwargs: Any) -> "_CellBase":
        owner = f"fxquant.nn.dynamic.{cls._mode}"
        float_cls = getattr(nn, cls._mode)
        if not isinstance(mod, float_cls):
            raise TypeError(f"{owner}.from_float expects nn.{cls._mode}, got {type(mod).__name__}")
        _check_dtype(dtype, _DYNAMIC_DTYPES, owner)
        qmod = cls(mod.input_size, mod.hidden_size, mod.bias, dtype=dtype, **kwargs)
        qmod._set_unpacked_state(_rnn_float_state(mod, qmod._state_keys(), dtype, factory, owner))
        return qmod

    @classmethod
    def from_float(cls, mod: nn.Module, weight_observer_factory: Optional[ObserverFactory] = None,
                   dtype: torch.dtype = torch.qint8) -> "_CellBase":
        """Quantize ``weight_ih`` and ``weight_hh`` of the float cell as
        PyTorch's eager ``quantize_dynamic`` (one fresh observer each)."""
        return cls._cell_from_float(mod, weight_observer_factory, dtype)


class LSTMCell(_CellBase):
    """Dynamic-quantized ``nn.LSTMCell`` on ``quantized::quantized_lstm_cell_dynamic``;
    returns ``(h_1, c_1)``."""

    _mode: ClassVar[str] = "LSTMCell"
    _gates: ClassVar[int] = 4

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tensor]:
        self._check_input(input)
        if hx is None:
            zeros = self._zeros_hidden(input)
            hx = (zeros, zeros)
        self._check_hidden(input, hx[0], "h0")
        self._check_hidden(input, hx[1], "c0")
        return torch.ops.quantized.quantized_lstm_cell_dynamic(
            input, [hx[0], hx[1]], self._packed_ih, self._packed_hh, self._bias_ih,
            self._bias_hh)


class GRUCell(_CellBase):
    """Dynamic-quantized ``nn.GRUCell`` on ``quantized::quantized_gru_cell_dynamic``."""

    _mode: ClassVar[str] = "GRUCell"
    _gates: ClassVar[int] = 3

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        self._check_input(input)
        h = self._zeros_hidden(input) if hx is None else hx
        self._check_hidden(input, h, "hx")
        return torch.ops.quantized.quantized_gru_cell_dynamic(
            input, h, self._packed_ih, self._packed_hh, self._bias_ih, self._bias_hh)


class RNNCell(_CellBase):
    """Dynamic-quantized ``nn.RNNCell`` (``nonlinearity`` "tanh" or "relu") on
    ``quantized::quantized_rnn_{tanh,relu}_cell_dynamic``."""

    _mode: ClassVar[str] = "RNNCell"
    _gates: ClassVar[int] = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", dtype: torch.dtype = torch.qint8) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"fxquant.nn.dynamic.RNNCell: nonlinearity must be 'tanh' or "
                             f"'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, bias, dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        self._check_input(input)
        h = self._zeros_hidden(input) if hx is None else hx
        self._check_hidden(input, h, "hx")
        if self.nonlinearity == "relu":
            return torch.ops.quantized.quantized_rnn_relu_cell_dynamic(
                input, h, self._packed_ih, self._packed_hh, self._bias_ih, self._bias_hh)
        return torch.ops.quantized.quantized_rnn_tanh_cell_dynamic(
            input, h, self._packed_ih, self._packed_hh, self._bias_ih, self._bias_hh)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nonlinearity={self.nonlinearity}"

    @classmethod
    def from_float(cls, mod: nn.Module, weight_observer_factory: Optional[ObserverFactory] = None,
                   dtype: torch.dtype = torch.qint8) -> "RNNCell":
        """Quantize the float ``nn.RNNCell`` (its nonlinearity is kept)."""
        nonlinearity = getattr(mod, "nonlinearity", "tanh")
        qmod = cls._cell_from_float(mod, weight_observer_factory, dtype,
                                    nonlinearity=nonlinearity)
        assert isinstance(qmod, RNNCell)
        return qmod
