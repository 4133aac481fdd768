"""The integer representation: a converted graph on plain ``uint8`` / ``int8`` tensors.

``convert_fx(prepared, representation="int")`` builds it from the *reference* graph (the spec:
dequantize -> float op -> quantize) by respelling each piece without quantized dtypes:

* ``torch.quantize_per_tensor(x, s, z, quint8)`` -> ``fxquant::quantize_per_tensor(x, s, z,
  0, 255, torch.uint8)``; ``q.dequantize()`` -> ``fxquant::dequantize_per_tensor(q, s, z, ...)``
  (``s`` / ``z`` stay the QParams buffers the reference graph reads, so the ``state_dict``
  carries every activation qparam);
* reference weighted modules (conv / linear / transposed conv) -> :class:`IntWeighted` modules
  holding the weight as an ``int8`` buffer with float scale / int zero-point buffers (per channel
  where the qconfig says), dequantized in ``forward`` by ``fxquant::dequantize_per_channel`` /
  ``fxquant::dequantize_per_tensor``;
* dynamic ``nn.Linear``: int8 weight + per-call activation quantization in plain torch ops
  (:class:`IntDynamicLinear`, the qparams fbgemm's ``linear_dynamic`` chooses); dynamic
  ``nn.LSTM`` / ``nn.GRU``: *weight-only* (int8 weights dequantized in the graph, float
  recurrence: :class:`IntWeightOnlyRNN`), because the recurrent kernels' per-gate activation
  quantization has no plain-torch spelling that export and Inductor would keep fused.

Why own ops rather than ``torch.ops.quantized_decomposed``: torch registers that namespace only
when the deprecated ao quantization package's ``fx._decomposed`` module (or Inductor) is
imported, and library code may not import that package. The ``fxquant::`` ops have the same schemas as ``quantized_decomposed``'s
``.tensor`` overloads and torch's own quantize math (``round_half_even(x * (1/scale) +
zero_point)``, clamped: bit-identical to ``torch.quantize_per_tensor``), with CompositeExplicitAutograd kernels in plain torch integer/float math and fake
(meta) kernels, so they run eagerly on any torch build, trace, ``torch.export`` and compile;
:mod:`fxquant.backends.inductor` respells them as ``quantized_decomposed`` ops, whose Inductor
lowerings and int8 fusion patterns exist. A program exported with them needs ``import
fxquant.backends.integer`` (done by ``import fxquant``) before ``torch.export.load``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.backends.reference_ops import QParams, is_dequantize, is_quantize
from fxquant.errors import FxQuantError
from fxquant.meta import inherit, qinfo, record
from fxquant.records import Action, QKind
from fxquant.nn.reference import ReferenceWeighted

PASS_NAME = "lower_to_int"

# quantized dtype of the reference graph -> (plain storage dtype, full integer range)
_STORAGE: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.quint8: (torch.uint8, 0, 255),
    torch.qint8: (torch.int8, -128, 127),
    torch.qint32: (torch.int32, -(2 ** 31), 2 ** 31 - 1),
}
QUANTIZED_DTYPES = frozenset({torch.quint8, torch.qint8, torch.qint32, torch.quint4x2,
                              torch.quint2x4})


class IntRepresentationError(FxQuantError):
    """A piece of the reference graph has no integer-representation spelling (yet)."""


# ------------------------------------------------------------------------------- the q/dq ops
_LIB = torch.library.Library("fxquant", "FRAGMENT")  # noqa: TOR901 - fxquant owns "fxquant"
_LIB.define("quantize_per_tensor(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
            "int quant_max, ScalarType dtype) -> Tensor")
_LIB.define("dequantize_per_tensor(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
            "int quant_max, ScalarType dtype) -> Tensor")
_LIB.define("dequantize_per_channel(Tensor input, Tensor scales, Tensor zero_points, int axis, "
            "int quant_min, int quant_max, ScalarType dtype) -> Tensor")


def _quantize_math(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(round(x * (1/scale) + zero_point))`` in float32, as torch's quantize_per_tensor
    does: the inverse scale a float32, the zero point added *before* rounding half to even
    (``quantized_decomposed`` rounds first, which differs by one on exact ties with an odd zero
    point: averages of grid values hit them)."""
    inv = 1.0 / scale.to(torch.float32)
    q = torch.round(x.to(torch.float32) * inv + zero_point.to(torch.float32))
    return q.clamp(quant_min, quant_max).to(dtype)


@torch.library.impl(_LIB, "quantize_per_tensor", "CompositeExplicitAutograd")
def _quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    return _quantize_math(x, scale.reshape(()), zero_point.reshape(()), quant_min, quant_max,
                          dtype)


@torch.library.impl(_LIB, "dequantize_per_tensor", "CompositeExplicitAutograd")
def _dequantize_per_tensor(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                           quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    _check_storage(q, dtype)
    return (q.to(torch.float32) - zero_point.reshape(()).to(torch.float32)) \
        * scale.reshape(()).to(torch.float32)


@torch.library.impl(_LIB, "dequantize_per_channel", "CompositeExplicitAutograd")
def _dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                            axis: int, quant_min: int, quant_max: int, dtype: torch.dtype
                            ) -> torch.Tensor:
    _check_storage(q, dtype)
    shape = [1] * q.dim()
    shape[axis] = -1
    zp = zero_points.reshape(shape).to(torch.float32)
    return (q.to(torch.float32) - zp) * scales.reshape(shape).to(torch.float32)


def _check_storage(q: torch.Tensor, dtype: torch.dtype) -> None:
    if q.dtype != dtype:
        raise TypeError(f"fxquant dequantize: input dtype {q.dtype} does not match dtype={dtype}")


@torch.library.register_fake("fxquant::quantize_per_tensor", lib=_LIB)
def _quantize_per_tensor_fake(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                              quant_min: int, quant_max: int, dtype: torch.dtype
                              ) -> torch.Tensor:
    return torch.empty_like(x, dtype=dtype)


@torch.library.register_fake("fxquant::dequantize_per_tensor", lib=_LIB)
def _dequantize_per_tensor_fake(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                                quant_min: int, quant_max: int, dtype: torch.dtype
                                ) -> torch.Tensor:
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.register_fake("fxquant::dequantize_per_channel", lib=_LIB)
def _dequantize_per_channel_fake(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                                 axis: int, quant_min: int, quant_max: int, dtype: torch.dtype
                                 ) -> torch.Tensor:
    return torch.empty_like(q, dtype=torch.float32)


QUANTIZE = torch.ops.fxquant.quantize_per_tensor.default
DEQUANTIZE = torch.ops.fxquant.dequantize_per_tensor.default
DEQUANTIZE_PER_CHANNEL = torch.ops.fxquant.dequantize_per_channel.default
INT_OPS = (QUANTIZE, DEQUANTIZE, DEQUANTIZE_PER_CHANNEL)


def storage_of(dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
    """(plain dtype, quant_min, quant_max) that stand for a quantized dtype."""
    if dtype not in _STORAGE:
        raise IntRepresentationError(f"no integer representation for {dtype}",
                                     hint="int representation covers quint8 / qint8 / qint32")
    return _STORAGE[dtype]


# ---------------------------------------------------------------------- weights, plain math
def quantize_weight_int(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        axis: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """int8 values of ``w`` for per-tensor (``axis < 0``) or per-channel qparams, computed in
    plain float math (``round(w * (1/scale) + zero_point)``, clamped to the weight observer's
    range) so that no quantized tensor is ever made. Multiplication by the float32 inverse,
    not division, and the zero point added before rounding: that is how torch's own quantize
    rounds (division differs on a few weights in ten thousand; checked against
    ``quantize_per_channel`` in tests/test_integer_repr.py)."""
    w = w.detach().to(torch.float32)
    if axis < 0:
        s = scale.reshape(()).to(torch.float32)
        z = zero_point.reshape(()).to(torch.float32)
    else:
        shape = [1] * w.dim()
        shape[axis] = -1
        s = scale.reshape(shape).to(torch.float32)
        z = zero_point.reshape(shape).to(torch.float32)
    q = torch.round(w * (1.0 / s) + z)
    return q.clamp(quant_min, quant_max).to(torch.int8)


def _weight_range(dtype: torch.dtype, quant_min: Optional[int], quant_max: Optional[int]
                  ) -> tuple[int, int]:
    _, lo, hi = storage_of(dtype)
    return (lo if quant_min is None else max(lo, quant_min),
            hi if quant_max is None else min(hi, quant_max))


class _IntWeight(nn.Module):
    """An int8 weight with its qparams as buffers; ``dequantized()`` is what float ops read."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 axis: int, qrange: tuple[int, int]) -> None:
        super().__init__()
        self.axis = axis  # < 0: per tensor
        self.quant_min, self.quant_max = qrange
        self.register_buffer("weight_int", quantize_weight_int(weight, scale, zero_point, axis,
                                                               *qrange))
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int64).reshape(-1).clone())

    def dequantized(self) -> torch.Tensor:
        if self.axis < 0:
            return DEQUANTIZE(self.weight_int, self.scale, self.zero_point, self.quant_min,
                              self.quant_max, torch.int8)
        return DEQUANTIZE_PER_CHANNEL(self.weight_int, self.scale, self.zero_point, self.axis,
                                      self.quant_min, self.quant_max, torch.int8)

    def extra_repr(self) -> str:
        where = "per tensor" if self.axis < 0 else f"per channel (axis {self.axis})"
        return f"int8 {tuple(self.weight_int.shape)}, {where}"


class IntWeighted(nn.Module):
    """Conv / linear / transposed conv on an int8 weight: ``float_op(x, dequantize(w_int8),
    bias)``, the reference module's computation with the weight stored as integers."""

    def __init__(self, ref: nn.Module) -> None:
        super().__init__()
        if not isinstance(ref, ReferenceWeighted):
            raise TypeError(f"IntWeighted takes a fxquant reference module, got {type(ref)}")
        wq = ref.weight_qparams()
        axis = wq.ch_axis % ref.weight.dim() if wq.is_per_channel else -1
        self.weight = _IntWeight(ref.weight, wq.scale, wq.zero_point, axis,
                                 _weight_range(wq.dtype, wq.quant_min, wq.quant_max))
        self.bias = None if ref.bias is None else nn.Parameter(ref.bias.detach().clone(),
                                                               requires_grad=False)
        self.kind = "linear" if isinstance(ref, nn.Linear) else \
            ("conv_transpose" if ref.transposed else "conv")
        self.float_name = ref._FLOAT_MODULE.__name__
        if self.kind != "linear":
            self.dims = len(ref.kernel_size)
            self.stride, self.padding = ref.stride, ref.padding
            self.dilation, self.groups = ref.dilation, ref.groups
            self.padding_mode = ref.padding_mode
            self.output_padding = ref.output_padding
            self.pad_twice = list(ref._reversed_padding_repeated_twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.dequantized()
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        if self.kind == "conv_transpose":
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.dims - 1]
            return fn(x, w, self.bias, self.stride, self.padding, self.output_padding,
                      self.groups, self.dilation)
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad_twice, mode=self.padding_mode)
            return fn(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return fn(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _get_name(self) -> str:
        return f"Int{self.float_name}"


# -------------------------------------------------------------------------- dynamic modules
def _dynamic_activation_qparams(x: torch.Tensor, quant_max: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero_point) ``quantized::linear_dynamic`` chooses for ``x`` over
    [0, quant_max] (ATen's ``quant_utils::ChooseQuantizationParams``: range widened to include
    0, the zero point taken from whichever end loses less precision, rounded and clamped; its
    tiny-scale adjustment below ~6e-5 is not reproduced), as tensors so the computation traces
    and exports."""
    lo = torch.clamp(x.min(), max=0.0).to(torch.float64)
    hi = torch.clamp(x.max(), min=0.0).to(torch.float64)
    scale = (hi - lo) / quant_max
    scale = torch.where(scale == 0, torch.full_like(scale, 0.1), scale).to(torch.float32)
    scale64 = scale.to(torch.float64)
    zp_min, zp_max = -lo / scale64, quant_max - hi / scale64
    err_min = -(lo / scale64).abs()
    err_max = quant_max - (hi / scale64).abs()
    zp = torch.where(err_min < err_max, zp_min, zp_max)
    zp = torch.round(zp).clamp(0, quant_max).to(torch.int64)
    return scale, zp


class IntDynamicLinear(nn.Module):
    """Dynamic-quantized Linear in plain torch ops: the activation is quantized per call (its
    own min/max, uint8 over [0, 127] where fbgemm's ``reduce_range`` applies) and dequantized,
    the weight is int8; float matmul. ``relu``: the fused dynamic LinearReLU."""

    def __init__(self, linear: nn.Linear, weight: _IntWeight, reduce_range: bool,
                 relu: bool = False) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        self.quant_max = 127 if reduce_range else 255
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = _dynamic_activation_qparams(x, self.quant_max)
        xq = QUANTIZE(x, scale, zp, 0, self.quant_max, torch.uint8)
        xd = DEQUANTIZE(xq, scale, zp, 0, self.quant_max, torch.uint8)
        y = F.linear(xd, self.weight.dequantized(), self.bias)
        return F.relu(y) if self.relu else y


class IntWeightOnlyRNN(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` with int8 weights dequantized in the graph and the recurrence
    in float (weight-only quantization: the native dynamic kernels also quantize each gate
    matmul's input, which this does not)."""

    def __init__(self, rnn: nn.RNNBase, weights: dict[str, _IntWeight]) -> None:
        super().__init__()
        self.mode = rnn.mode
        self.num_layers, self.bidirectional = rnn.num_layers, rnn.bidirectional
        self.batch_first, self.hidden_size = rnn.batch_first, rnn.hidden_size
        self.has_bias = rnn.bias
        self.names = [n for n in rnn._flat_weights_names]
        self.int_weights = nn.ModuleDict({n: weights[n] for n in self.names if n in weights})
        for n in self.names:
            if n not in weights:
                self.register_buffer(n, getattr(rnn, n).detach().clone())

    def _flat(self) -> list[torch.Tensor]:
        return [self.int_weights[n].dequantized() if n in self.int_weights else getattr(self, n)
                for n in self.names]

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        dirs = 2 if self.bidirectional else 1
        batch = x.size(0) if self.batch_first else x.size(1)
        zeros = torch.zeros(self.num_layers * dirs, batch, self.hidden_size, dtype=x.dtype,
                            device=x.device)
        if self.mode == "LSTM":
            hx = (zeros, zeros) if hx is None else hx
            out, h, c = torch.lstm(x, hx, self._flat(), self.has_bias, self.num_layers, 0.0,
                                   False, self.bidirectional, self.batch_first)
            return out, (h, c)
        hx = zeros if hx is None else hx
        out, h = torch.gru(x, hx, self._flat(), self.has_bias, self.num_layers, 0.0, False,
                           self.bidirectional, self.batch_first)
        return out, h

    def _get_name(self) -> str:
        return f"IntWeightOnly{self.mode}"


def _weight_observer_int(weight: torch.Tensor, factory: Any, owner: str) -> _IntWeight:
    obs = factory()
    if obs.dtype not in (torch.qint8,):
        raise IntRepresentationError(
            f"{owner}: weight dtype {obs.dtype} has no integer representation",
            hint="int representation supports qint8 weights (float16 dynamic: use "
                 "representation='native')")
    obs(weight.detach())
    scale, zp = obs.calculate_qparams()
    per_channel = scale.numel() > 1 or "channel" in str(getattr(obs, "qscheme", ""))
    axis = getattr(obs, "ch_axis", 0) % weight.dim() if per_channel else -1
    qrange = _weight_range(obs.dtype, getattr(obs, "quant_min", None),
                           getattr(obs, "quant_max", None))
    return _IntWeight(weight, scale, zp, axis, qrange)


def dynamic_int_module(module: nn.Module, factory: Any, backend: str, node: fx.Node
                       ) -> nn.Module:
    """The integer-representation module for a dynamic / weight-only quantized module."""
    from fxquant.backends.cpu import engine_of
    from fxquant.backends.engine import dynamic_reduce_range
    from fxquant.nn.fused import FusedModule

    inner = module[0] if isinstance(module, FusedModule) else module
    relu = isinstance(module, FusedModule) and len(module) > 1 and \
        all(isinstance(m, nn.ReLU) for m in list(module)[1:])
    if isinstance(inner, nn.Linear) and (relu or not isinstance(module, FusedModule)):
        w = _weight_observer_int(inner.weight, factory, str(node.target))
        return IntDynamicLinear(inner, w, reduce_range=dynamic_reduce_range(engine_of(backend)),
                                relu=relu)
    if type(module) in (nn.LSTM, nn.GRU) and not getattr(module, "proj_size", 0):
        weights = {n: _weight_observer_int(getattr(module, n), factory, str(node.target))
                   for n in module._flat_weights_names if n.startswith("weight")}
        return IntWeightOnlyRNN(module, weights)
    raise IntRepresentationError(
        f"dynamic / weight-only {type(module).__name__} has no integer representation", node,
        hint="int representation covers dynamic Linear (LinearReLU), LSTM and GRU; use "
             "representation='native' or give this module qconfig None", pass_name=PASS_NAME)


# ----------------------------------------------------------------------------- graph rewrite
def _qparam_nodes(gm: fx.GraphModule, q: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The quantize's scale / zero_point as get_attr nodes of QParams buffers (constants get a
    QParams holder so the state_dict carries them)."""
    _, s, z = q.args[:3]
    if isinstance(s, fx.Node) and isinstance(z, fx.Node):
        return s, z
    if isinstance(s, fx.Node) or isinstance(z, fx.Node):
        raise IntRepresentationError("quantize with one tensor and one constant qparam", q,
                                     pass_name=PASS_NAME)
    name, i = f"{q.name}_qparams", 1
    while hasattr(gm, name):
        name, i = f"{q.name}_qparams_{i}", i + 1
    gm.add_submodule(name, QParams(float(s), int(z)))
    with gm.graph.inserting_before(q):
        return gm.graph.get_attr(f"{name}.scale"), gm.graph.get_attr(f"{name}.zero_point")


def _rewrite_quantize(gm: fx.GraphModule, q: fx.Node) -> tuple[fx.Node, tuple[Any, ...]]:
    dtype = q.args[3] if len(q.args) > 3 else q.kwargs.get("dtype")
    storage, lo, hi = storage_of(dtype)
    s, z = _qparam_nodes(gm, q)
    qargs = (s, z, lo, hi, storage)
    with gm.graph.inserting_before(q):
        new = gm.graph.call_function(QUANTIZE, (q.args[0], *qargs))
    inherit(new, q)
    record(new, PASS_NAME, Action.QUANTIZE, f"{str(dtype).replace('torch.', '')} -> plain "
                                       f"{str(storage).replace('torch.', '')} [{lo}, {hi}]")
    q.replace_all_uses_with(new)
    gm.graph.erase_node(q)
    return new, qargs


def _rewrite_dequantize(gm: fx.GraphModule, dq: fx.Node, known: dict[fx.Node, tuple]) -> None:
    src = dq.args[0]
    if src not in known:
        raise IntRepresentationError(
            f"dequantize of {getattr(src, 'name', src)}, which is not a quantize node: its "
            f"integer qparams are unknown", dq, pass_name=PASS_NAME,
            hint="representation='int' needs a reference graph where every dequantize reads a "
                 "quantize (report this model)")
    with gm.graph.inserting_before(dq):
        new = gm.graph.call_function(DEQUANTIZE, (src, *known[src]))
    inherit(new, dq)
    record(new, PASS_NAME, Action.DEQUANTIZE, "plain integers back to float32")
    dq.replace_all_uses_with(new)
    gm.graph.erase_node(dq)


def _replace_reference_modules(gm: fx.GraphModule) -> int:
    count = 0
    for name, module in list(gm.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ReferenceWeighted):
                setattr(module, child_name, IntWeighted(child))
                count += 1
    return count


def _lower_dynamic(gm: fx.GraphModule, node: fx.Node, backend: str) -> bool:
    info = qinfo(node)
    if node.op != "call_module" or info.weight_spec is None or info.weight_spec.observer is None:
        record(node, PASS_NAME, Action.KEEP_FLOAT, "dynamic / weight-only op without a weight "
               "module: stays float in the int representation")
        return False
    module = gm.get_submodule(str(node.target))
    new = dynamic_int_module(module, info.weight_spec.observer, backend, node)
    parent, _, leaf = str(node.target).rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
    record(node, PASS_NAME, Action.LOWER, f"{new._get_name()}: int8 weights in plain tensors")
    return True


def lower_graph(gm: fx.GraphModule, backend: str) -> dict[str, int]:
    """Respell the reference graph ``gm`` in place (see the module docstring); returns stats."""
    stats = {"quantize": 0, "dequantize": 0, "weighted": 0, "dynamic": 0}
    known: dict[fx.Node, tuple] = {}
    for node in list(gm.graph.nodes):
        if is_quantize(node):
            new, qargs = _rewrite_quantize(gm, node)
            known[new] = qargs
            stats["quantize"] += 1
        elif is_dequantize(node):
            _rewrite_dequantize(gm, node, known)
            stats["dequantize"] += 1
        elif qinfo(node).qkind in (QKind.DYNAMIC, QKind.WEIGHT_ONLY) and node.op == "call_module":
            stats["dynamic"] += _lower_dynamic(gm, node, backend)
    stats["weighted"] = _replace_reference_modules(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    check_no_quantized(gm)
    return {k: v for k, v in stats.items() if v}


def check_no_quantized(gm: nn.Module) -> None:
    """Raise if any tensor of ``gm`` (parameters, buffers) has a quantized dtype or a graph
    node still calls a quantized-tensor op."""
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.dtype in QUANTIZED_DTYPES:
            raise IntRepresentationError(f"tensor {name} has quantized dtype {t.dtype}",
                                         module_path=name, pass_name=PASS_NAME)
    graph = getattr(gm, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if is_quantize(node) or is_dequantize(node) or \
                (node.op == "call_function" and str(node.target).startswith("quantized.")):
            raise IntRepresentationError("a quantized-tensor op is left in the int "
                                         "representation", node, pass_name=PASS_NAME)


def is_int_representation(model: nn.Module) -> bool:
    """Whether ``model`` (a GraphModule or a model with converted GraphModule pieces) runs the
    integer representation: some fxquant q/dq op and no quantized-dtype tensor."""
    found = False
    for m in model.modules():
        if isinstance(m, fx.GraphModule):
            found |= any(n.op == "call_function" and n.target in INT_OPS for n in m.graph.nodes)
    tensors = list(model.parameters()) + list(model.buffers())
    return found and not any(t.dtype in QUANTIZED_DTYPES for t in tensors)
