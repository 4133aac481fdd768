"""Write a converted fxquant model as a QDQ ONNX graph, from fxquant's own decisions.

Why build the graph by hand (``onnx.helper``) instead of ``torch.onnx.export``: the converted
graph holds quantized tensors and prepacked ``quantized::*`` kernels, which the exporter does
not map to QuantizeLinear / DequantizeLinear; and fxquant's decisions (which op is int8, which
stays float, every scale and zero point) must reach the ONNX file unchanged, not be guessed
again by another tool. So the converted GraphModule is run once on the example inputs (an fx
Interpreter records, for every node, its shape and - for a quantized tensor - the scale, zero
point and dtype the native kernel produced), and each node is written as:

* a quantized tensor in the fx graph = a uint8/int8 ONNX tensor (the output of a
  QuantizeLinear with exactly those qparams);
* an op on quantized tensors = DequantizeLinear on each quantized input, the float ONNX op,
  QuantizeLinear with the node's output qparams. This is the QDQ form ONNX Runtime and
  OpenVINO fuse into their int8 kernels, and numerically the reference graph of the node;
* a quantized conv / linear = int8 weight initializer -> DequantizeLinear (per-channel ``axis``
  where fxquant quantized per channel), int32 bias (scale = input scale x weight scale) ->
  DequantizeLinear, the float Conv / Gemm, an optional Relu, QuantizeLinear;
* a clamp / ReLU6 / hardtanh / ReLU on a quantized tensor whose output keeps the input's
  qparams (the native graph's int8 clamp after a conv) = a Clip on the uint8 tensor with the
  integer bounds the native kernel uses. There is no QuantizeLinear/DequantizeLinear pair
  between the conv and the Clip: the Clip's output quantization is the conv's.
  ``Q(clip(x)) == clip(Q(x), Q(lo), Q(hi))`` because rounding is monotone, so this is exact.
* float ops (islands fxquant kept float) = the same float ONNX ops without Q/DQ.

Shapes are static (those of the example inputs): shape arithmetic in the graph (``x.size(0)``)
is folded to constants, reshapes use the recorded output shape. A node with no ONNX form here
raises :class:`OnnxExportError` naming the node, its module path and source line.

onnx is imported by the caller (:mod:`fxquant.backends.onnx`) and passed in as ``helper`` /
``TensorProto``; this module itself imports no optional package.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxquant.errors import OnnxExportError
from fxquant.nn import fused
from fxquant.nn import quantized as qnn
from fxquant.nn.conv_add import ConvAct2d, ConvAdd2d

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17: older runtimes read it too


# ------------------------------------------------------------------------ recorded values
@dataclass(frozen=True)
class QInfo:
    """Per-tensor qparams of a quantized activation, as the native kernel produced them."""

    scale: float
    zero_point: int
    dtype: torch.dtype

    @property
    def np_dtype(self) -> Any:
        return np.uint8 if self.dtype == torch.quint8 else np.int8


@dataclass(frozen=True)
class TensorVal:
    shape: tuple[int, ...]
    dtype: torch.dtype  # the torch dtype (torch.quint8 for a quantized tensor)
    q: Optional[QInfo] = None


@dataclass(frozen=True)
class Const:
    value: Any


Recorded = Union[TensorVal, Const, tuple]


def _summary(value: Any, node: fx.Node) -> Recorded:
    if isinstance(value, torch.Tensor):
        if not value.is_quantized:
            return TensorVal(tuple(value.shape), value.dtype)
        if value.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric) \
                or value.dtype not in (torch.quint8, torch.qint8):
            raise OnnxExportError(
                f"a {value.dtype} {value.qscheme()} activation has no QuantizeLinear form here",
                node, hint="keep this op float (QConfigMapping ... None) to export it")
        q = QInfo(float(value.q_scale()), int(value.q_zero_point()), value.dtype)
        return TensorVal(tuple(value.shape), value.dtype, q)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_summary(v, node) for v in value)
    return Const(value)


def record(gm: fx.GraphModule, example_inputs: tuple) -> dict[fx.Node, Recorded]:
    """Run ``gm`` once and summarize every node's value (shape, dtype, qparams)."""
    values: dict[fx.Node, Recorded] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.op != "output":
                values[n] = _summary(out, n)
            return out

    with torch.no_grad():
        _Recorder(gm).run(*example_inputs)
    return values


def int8_midpoint_values(gm: fx.GraphModule, values: dict[fx.Node, Recorded]
                         ) -> dict[fx.Node, Recorded]:
    """``values`` with every quint8 tensor of zero point 128 inside the graph written as int8
    with zero point 0: the same real values (each integer 128 lower, the saturation bounds
    0 / 255 become -128 / 127), so the graph computes exactly what it did. An engine that runs
    int8 convs faster on a zero-point-0 input (OpenVINO) then sees one: with
    ``symmetric_activations`` every signed activation has zero point 128. The model's outputs
    keep their dtype (the module returns what the native model returns), and so does a tensor
    an Add reads: OpenVINO fuses the Add into the int8 conv that made an int8 operand even
    through the repeated QDQ pair of ``Builder.sum_input`` (which keeps it apart for uint8),
    dropping the conv's rounding (a test ResNet: 92-94% of the logits within one native step
    instead of 100%)."""
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    keep = {leaf for leaf in pytree.tree_flatten(out_node.args[0])[0]
            if isinstance(leaf, fx.Node)}
    keep |= {n for n in gm.graph.nodes if any(_is_add(u) for u in n.users)}

    def signed(v: Recorded) -> Recorded:
        if isinstance(v, tuple):
            return tuple(signed(x) for x in v)
        if isinstance(v, TensorVal) and v.q is not None and v.q.dtype == torch.quint8 \
                and v.q.zero_point == 128:
            return TensorVal(v.shape, torch.qint8, QInfo(v.q.scale, 0, torch.qint8))
        return v
    return {n: (v if n in keep else signed(v)) for n, v in values.items()}


def _is_add(n: fx.Node) -> bool:
    """An add of any spelling (torch.add, ``+``, ``+=``, ``x.add``, quantized::add[_relu])."""
    if n.op not in ("call_function", "call_method"):
        return False
    t = n.target
    name = t if isinstance(t, str) else getattr(t, "_qualified_op_name", None) or \
        getattr(t, "__name__", str(t))
    return name.split("::")[-1] in ("add", "add_", "iadd", "add_relu", "add_relu_")


# ------------------------------------------------------------------------ the builder
@dataclass
class Builder:
    """ONNX nodes and initializers under construction, and the names of the fx values."""

    gm: fx.GraphModule
    values: dict[fx.Node, Recorded]
    helper: Any
    numpy_helper: Any
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    names: dict[fx.Node, Any] = field(default_factory=dict)  # raw name (uint8 if quantized)
    _used: set = field(default_factory=set)
    node: Optional[fx.Node] = None  # the fx node being written
    bias: str = "int32"  # conv / linear bias: "int32", "float" or "auto" (see _bias_initializer)
    relu_after_quantize: bool = False  # set by relu(): a uint8 Clip at the zero point follows
    round_sum_inputs: bool = False  # see sum_input(): for engines that fuse an Add into a conv
    requantized: set = field(default_factory=set)  # outputs an emitter quantized itself

    def relu(self, y: str) -> str:
        """The ReLU of a fused kernel (conv-relu, linear-relu, add-relu). Where the node's
        output zero point is above the dtype's minimum, a float Relu before QuantizeLinear
        would keep ONNX Runtime from fusing the op (it drops a Relu before a Q only when the
        zero point is the minimum), so the ReLU becomes a Clip at the zero point on the
        quantized output instead: exact, as rounding is monotone."""
        q = self.qinfo(self.node) if self.node is not None else None
        if q is not None and q.zero_point > (0 if q.dtype == torch.quint8 else -128):
            self.relu_after_quantize = True
            return y
        return self.add("Relu", [y])

    def fresh(self, base: str) -> str:
        base = "".join(c if c.isalnum() or c in "_." else "_" for c in base) or "t"
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def const(self, array: Any, base: str) -> str:
        name = self.fresh(base)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def f32(self, value: Any, base: str = "c") -> str:
        return self.const(np.asarray(value, dtype=np.float32), base)

    def i64(self, value: Sequence[int], base: str = "shape") -> str:
        return self.const(np.asarray(list(value), dtype=np.int64), base)

    def add(self, op: str, inputs: Sequence[Optional[str]], outputs: int = 1, **attrs: Any
            ) -> Any:
        base = self.node.name if self.node is not None else op.lower()
        outs = [self.fresh(f"{base}_{op.lower()}") for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(
            op, [i or "" for i in inputs], outs, name=self.fresh(f"{base}/{op}"),
            **{k: v for k, v in attrs.items() if v is not None}))
        return outs[0] if outputs == 1 else outs

    # -- quantize / dequantize
    def quantize(self, x: str, q: QInfo) -> str:
        s = self.f32(q.scale, f"{self._base()}_scale")
        z = self.const(np.asarray(q.zero_point, dtype=q.np_dtype), f"{self._base()}_zero_point")
        return self.add("QuantizeLinear", [x, s, z])

    def dequantize(self, x: str, q: QInfo) -> str:
        s = self.f32(q.scale, f"{self._base()}_in_scale")
        z = self.const(np.asarray(q.zero_point, dtype=q.np_dtype), f"{self._base()}_in_zp")
        return self.add("DequantizeLinear", [x, s, z])

    def _base(self) -> str:
        return self.node.name if self.node is not None else "q"

    # -- reading the fx node's arguments
    def value(self, arg: Any) -> Recorded:
        if isinstance(arg, fx.Node):
            if arg not in self.values:
                raise OnnxExportError("no recorded value (the node did not run)", arg)
            return self.values[arg]
        return Const(arg)

    def qinfo(self, arg: Any) -> Optional[QInfo]:
        v = self.value(arg)
        return v.q if isinstance(v, TensorVal) else None

    def shape(self, arg: Any) -> tuple[int, ...]:
        v = self.value(arg)
        if not isinstance(v, TensorVal):
            raise OnnxExportError(f"expected a tensor, got {v}", self.node)
        return v.shape

    def raw(self, arg: Any) -> Any:
        """The ONNX name of a tensor argument as it is (uint8 for a quantized tensor)."""
        if isinstance(arg, fx.Node):
            if arg not in self.names:
                if arg.op == "get_attr":
                    self.names[arg] = self.tensor_constant(fetch(self.gm, str(arg.target)),
                                                           arg.name)
                else:
                    raise OnnxExportError(f"input {arg.name} has no ONNX value", self.node)
            return self.names[arg]
        if isinstance(arg, torch.Tensor):
            return self.tensor_constant(arg, "const")
        if isinstance(arg, (int, float, bool)):
            return self.f32(float(arg), "scalar")
        raise OnnxExportError(f"argument {arg!r} is not a tensor", self.node)

    def x(self, arg: Any) -> str:
        """The float ONNX name of a tensor argument: a quantized one is dequantized here (one
        DequantizeLinear per consumer, the QDQ form engines fuse)."""
        name = self.raw(arg)
        q = self.qinfo(arg) if isinstance(arg, fx.Node) else None
        return self.dequantize(name, q) if q is not None else name

    def sum_input(self, arg: Any) -> str:
        """The float ONNX name of an Add operand. With ``round_sum_inputs`` (OpenVINO), an
        operand a conv / linear produced gets a second QuantizeLinear/DequantizeLinear pair
        with its own qparams: exact (the values are on that grid already), but it keeps
        OpenVINO's CPU plugin from fusing the Add into the producer as oneDNN's sum post-op,
        which drops the rounding of the producer's output to its grid (the native add rounds
        it): on a residual CNN that fusion put 3-24% of the logits more than one native step
        away; with the pair none (tests/test_onnx_engines.py)."""
        name = self.x(arg)
        q = self.qinfo(arg) if isinstance(arg, fx.Node) else None
        if q is None or not self.round_sum_inputs or not self._weighted_producer(self.raw(arg)):
            return name
        return self.dequantize(self.quantize(name, q), q)

    def _weighted_producer(self, name: str) -> bool:
        """Whether ONNX value ``name`` is a conv / linear output, through its quantization and
        the ReLU / Clip / Reshape an engine fuses into the producer."""
        producers = {out: node for node in self.nodes for out in node.output}
        node = producers.get(name)
        while node is not None and node.op_type in ("QuantizeLinear", "Clip", "Relu", "Reshape"):
            node = producers.get(node.input[0])
        return node is not None and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")

    def tensor_constant(self, t: torch.Tensor, base: str) -> str:
        t = t.detach()
        if t.is_quantized:
            t = t.dequantize()
        if t.is_floating_point():
            return self.f32(t.float().numpy(), base)
        return self.const(t.numpy(), base)

    def constant(self, arg: Any) -> Any:
        """A Python value of an argument (folded from the recorded run)."""
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.constant(a) for a in arg)
        v = self.value(arg)
        if isinstance(v, Const):
            return v.value
        raise OnnxExportError(f"a tensor where a constant was expected ({arg})", self.node,
                              hint="fxquant exports static graphs: this argument must not "
                                   "depend on tensor values")


def fetch(gm: nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), gm)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


# ------------------------------------------------------------------------ op emitters
# A float emitter returns the float ONNX name(s) of the node's result; the driver quantizes it
# when the native node's output is quantized. A raw emitter (RAW) returns the final name.
Emitter = Callable[[Builder, fx.Node], Any]
ModuleEmitter = Callable[[Builder, fx.Node, nn.Module], Any]


def _unary(op: str, **attrs: Any) -> Emitter:
    return lambda b, n: b.add(op, [b.x(n.args[0])], **attrs)


def _hardsigmoid(b: Builder, n: fx.Node) -> str:
    return b.add("HardSigmoid", [b.x(n.args[0])], alpha=1.0 / 6, beta=0.5)


def _silu(b: Builder, n: fx.Node) -> str:
    x = b.x(n.args[0])
    return b.add("Mul", [x, b.add("Sigmoid", [x])])


def _gelu(b: Builder, n: fx.Node, approximate: str = "none") -> str:
    approximate = arg(n, 1, "approximate", approximate) if n.op != "call_module" else approximate
    if approximate != "none":
        raise OnnxExportError(f"gelu(approximate={approximate!r}) is not exported", n)
    x = b.x(n.args[0])
    erf = b.add("Erf", [b.add("Mul", [x, b.f32(1 / math.sqrt(2))])])
    return b.add("Mul", [b.add("Mul", [x, b.f32(0.5)]), b.add("Add", [erf, b.f32(1.0)])])


def _softmax(op: str) -> Emitter:
    def emit(b: Builder, n: fx.Node) -> str:
        rank = len(b.shape(n.args[0]))
        dim = b.constant(arg(n, 1, "dim"))
        if dim is None:
            dim = 0 if rank in (0, 1, 3) else 1
        return b.add(op, [b.x(n.args[0])], axis=int(dim) % rank)
    return emit


def _binary(op: str, relu: bool = False) -> Emitter:
    def emit(b: Builder, n: fx.Node) -> str:
        alpha = n.kwargs.get("alpha", 1)
        if alpha != 1:
            raise OnnxExportError(f"{op} with alpha={alpha} is not exported", n)
        read = b.sum_input if op == "Add" else b.x
        y = b.add(op, [read(n.args[0]), read(n.args[1])])
        return b.relu(y) if relu else y
    return emit


def _elu_q(b: Builder, n: fx.Node) -> str:
    """quantized::elu(x, scale, zero_point, alpha, scale, input_scale)."""
    alpha, scale, input_scale = (float(b.constant(a)) for a in n.args[3:6])
    x = b.x(n.args[0])
    if input_scale != 1.0:
        x = b.add("Mul", [x, b.f32(input_scale)])
    y = b.add("Elu", [x], alpha=alpha)
    return b.add("Mul", [y, b.f32(scale)]) if scale != 1.0 else y


def _leaky_relu(b: Builder, n: fx.Node) -> str:
    slope = b.constant(arg(n, 1, "negative_slope", 0.01))
    return b.add("LeakyRelu", [b.x(n.args[0])], alpha=float(slope))


def _prelu_q(b: Builder, n: fx.Node) -> str:
    """quantized::prelu(x, quantized weight, scale, zero_point)."""
    return _prelu(b, n, fetch(b.gm, str(n.args[1].target)) if isinstance(n.args[1], fx.Node)
                  else n.args[1])


def _prelu(b: Builder, n: fx.Node, weight: torch.Tensor) -> str:
    weight = weight.detach()
    weight = weight.dequantize() if weight.is_quantized else weight
    rank = len(b.shape(n.args[0]))
    if weight.numel() > 1 and rank >= 2:
        weight = weight.reshape([-1] + [1] * (rank - 2))
    return b.add("PRelu", [b.x(n.args[0]), b.f32(weight.float().numpy(), "slope")])


def _layer_norm(b: Builder, n: fx.Node, shape: Any, weight: Any, bias: Any, eps: float) -> str:
    shape = [shape] if isinstance(shape, int) else list(shape)
    ones = torch.ones(shape)
    w = b.tensor_constant(_tensor_of(b, weight, ones), "ln_weight")
    bias_t = _tensor_of(b, bias, torch.zeros(shape))
    return b.add("LayerNormalization", [b.x(n.args[0]), w, b.tensor_constant(bias_t, "ln_bias")],
                 axis=-len(shape), epsilon=float(eps))


def _tensor_of(b: Builder, value: Any, default: torch.Tensor) -> torch.Tensor:
    if value is None:
        return default
    if isinstance(value, fx.Node):
        if value.op != "get_attr":
            raise OnnxExportError("a normalization weight computed at run time", b.node)
        return fetch(b.gm, str(value.target))
    return value


def _layer_norm_fn(b: Builder, n: fx.Node) -> str:
    """F.layer_norm(x, shape, weight, bias, eps) and quantized::layer_norm(x, shape, weight,
    bias, eps, scale, zero_point)."""
    return _layer_norm(b, n, b.constant(arg(n, 1, "normalized_shape")), arg(n, 2, "weight"),
                       arg(n, 3, "bias"), b.constant(arg(n, 4, "eps", 1e-5)))


def _mean(b: Builder, n: fx.Node) -> str:
    rank = len(b.shape(n.args[0]))
    dims = b.constant(arg(n, 1, "dim"))
    keep = bool(b.constant(arg(n, 2, "keepdim", False)))
    if n.kwargs.get("dtype") is not None:
        raise OnnxExportError("mean(dtype=...) is not exported", n)
    if dims is None:
        dims = list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return _averaged(b, n, lambda x: b.add("ReduceMean", [x], axes=[d % rank for d in dims],
                                           keepdims=int(keep)))


def _averaged(b: Builder, n: fx.Node, average: Callable[[str], str]) -> str:
    """An average (mean, average pools) of a quantized tensor that keeps its qparams. The
    native kernels round the mean of the raw integers half to even; QuantizeLinear rounds
    (mean - zero point) half to even, and for an odd zero point the two differ on every tie
    (an average of 64 integers is a tie 1 time in 64: one step, which the layers after it
    can grow). Written with an even zero point (zero point - 1 where it is odd) and scale 1
    on both sides, the integers are the same (the values shift by one step and back), the
    engine averages integers (exact in float32 for power-of-two windows: no product with the
    scale to put a tie off by an ulp) and the rounding is the native one; the pair still
    fuses (QLinearGlobalAveragePool ...)."""
    q_in, q_out = b.qinfo(n.args[0]), b.qinfo(n)
    if q_in is None or q_in != q_out:
        return average(b.x(n.args[0]))
    units = QInfo(1.0, q_in.zero_point - q_in.zero_point % 2, q_in.dtype)
    out = b.quantize(average(b.dequantize(b.raw(n.args[0]), units)), units)
    b.requantized.add(out)
    return out


def _matmul(b: Builder, n: fx.Node) -> str:
    return b.add("MatMul", [b.x(n.args[0]), b.x(n.args[1])])


def _cat(b: Builder, n: fx.Node) -> str:
    tensors = arg(n, 0, "tensors")
    rank = len(b.shape(n))
    dim = int(b.constant(arg(n, 1, "dim", 0))) % rank
    return b.add("Concat", [b.x(t) for t in tensors], axis=dim)


def _stack(b: Builder, n: fx.Node) -> str:
    tensors = arg(n, 0, "tensors")
    rank = len(b.shape(n))
    dim = int(b.constant(arg(n, 1, "dim", 0))) % rank
    items = [b.add("Unsqueeze", [b.x(t), b.i64([dim], "axes")]) for t in tensors]
    return b.add("Concat", items, axis=dim)


def _reshape(b: Builder, n: fx.Node) -> str:
    """Every reshape-like op (view, flatten, squeeze, unflatten, ...): the recorded shape."""
    return b.add("Reshape", [b.x(n.args[0]), b.i64(b.shape(n))])


def _permutation(b: Builder, n: fx.Node, fn: Callable[[torch.Tensor], torch.Tensor]) -> list[int]:
    """The permutation a transpose-like op applies, read off a probe tensor whose dims are
    numbered (dim i has size i + 2 so the sizes tell the dims apart)."""
    rank = len(b.shape(n.args[0]))
    probe = torch.empty([i + 2 for i in range(rank)], device="meta")
    out = fn(probe).shape
    return [s - 2 for s in out]


def _transpose_like(b: Builder, n: fx.Node) -> str:
    rest = [b.constant(a) for a in n.args[1:]]
    kwargs = {k: b.constant(v) for k, v in n.kwargs.items()}
    if n.op == "call_method":
        fn = lambda t: getattr(t, n.target)(*rest, **kwargs)  # noqa: E731
    else:
        fn = lambda t: n.target(t, *rest, **kwargs)  # noqa: E731
    return b.add("Transpose", [b.x(n.args[0])], perm=_permutation(b, n, fn))


def _getitem(b: Builder, n: fx.Node) -> Any:
    """Basic indexing of a tensor (ints, slices with step 1.., None, Ellipsis)."""
    index = b.constant(n.args[1])
    index = index if isinstance(index, tuple) else (index,)
    shape = b.shape(n.args[0])
    if sum(i is Ellipsis for i in index) > 1 or any(
            not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        raise OnnxExportError(f"tensor indexing with {index!r} is not exported", n,
                              hint="only ints, slices, None and ... index a tensor here")
    dims = [i for i in index if i is not None]
    if Ellipsis in dims:
        at = dims.index(Ellipsis)
        dims = dims[:at] + [slice(None)] * (len(shape) - len(dims) + 1) + dims[at + 1:]
    starts, ends, axes, steps = [], [], [], []
    for axis, i in enumerate(dims):
        if isinstance(i, int):
            i = slice(i, i + 1 if i != -1 else None)
        start, stop, step = i.indices(shape[axis])
        if (start, stop, step) != (0, shape[axis], 1):
            if step < 1:
                raise OnnxExportError("negative slice steps are not exported", n)
            starts, ends, axes, steps = starts + [start], ends + [stop], axes + [axis], \
                steps + [step]
    x = b.x(n.args[0])
    if axes:
        x = b.add("Slice", [x, b.i64(starts), b.i64(ends), b.i64(axes), b.i64(steps)])
    return b.add("Reshape", [x, b.i64(b.shape(n))])


def _split_like(b: Builder, n: fx.Node) -> list[str]:
    """chunk / split / tensor_split / unbind: a Split at the recorded output sizes."""
    outs = b.value(n)
    in_shape = b.shape(n.args[0])
    rank = len(in_shape)
    name = n.target if isinstance(n.target, str) else n.target.__name__
    dim_arg = {"chunk": (2, "dim"), "split": (2, "dim"), "tensor_split": (2, "dim"),
               "unbind": (1, "dim")}.get(name)
    if dim_arg is None or not isinstance(outs, tuple):
        raise OnnxExportError(f"{name} is not exported", n)
    dim = int(b.constant(arg(n, *dim_arg, 0))) % rank
    unbind = name == "unbind"
    sizes = [1 if unbind else o.shape[dim] for o in outs]
    parts = b.add("Split", [b.x(n.args[0]), b.i64(sizes, "split")], outputs=len(sizes), axis=dim)
    parts = parts if isinstance(parts, list) else [parts]
    return [b.add("Reshape", [p, b.i64(o.shape)]) for p, o in zip(parts, outs)]


def _pool_args(n: fx.Node, dims: int, names: Sequence[str], defaults: Sequence[Any],
               b: Builder) -> dict[str, Any]:
    out = {}
    for i, (name, default) in enumerate(zip(names, defaults)):
        out[name] = b.constant(arg(n, i + 1, name, default))
    return out


def _tuple(v: Any, dims: int) -> list[int]:
    return [int(v)] * dims if isinstance(v, int) else [int(i) for i in v]


def _max_pool(b: Builder, n: fx.Node, dims: int, kernel: Any, stride: Any, padding: Any,
              dilation: Any, ceil_mode: bool) -> str:
    k = _tuple(kernel, dims)
    s = _tuple(stride if stride not in (None, [], ()) else kernel, dims)
    p = _tuple(padding, dims)
    return b.add("MaxPool", [b.x(n.args[0])], kernel_shape=k, strides=s, pads=p + p,
                 dilations=_tuple(dilation, dims), ceil_mode=int(bool(ceil_mode)))


def _avg_pool(b: Builder, n: fx.Node, dims: int, kernel: Any, stride: Any, padding: Any,
              ceil_mode: bool, count_include_pad: bool, divisor_override: Any) -> str:
    if divisor_override is not None:
        raise OnnxExportError("avg_pool(divisor_override=...) is not exported", n)
    k = _tuple(kernel, dims)
    s = _tuple(stride if stride not in (None, [], ()) else kernel, dims)
    p = _tuple(padding, dims)

    def pool(x: str) -> str:
        return b.add("AveragePool", [x], kernel_shape=k, strides=s, pads=p + p,
                     ceil_mode=int(bool(ceil_mode)),
                     count_include_pad=int(bool(count_include_pad)))
    if any(p) or ceil_mode:  # windows with padding: the native rounding is not the raw mean's
        return pool(b.x(n.args[0]))
    return _averaged(b, n, pool)


def _adaptive(b: Builder, n: fx.Node, dims: int, op: str) -> str:
    """Adaptive pooling: a global pool for output size 1, else a plain pool where the input
    divides evenly (what torch computes then)."""
    in_spatial = b.shape(n.args[0])[-dims:]
    out_spatial = b.shape(n)[-dims:]
    if any(i % o for i, o in zip(in_spatial, out_spatial)):
        raise OnnxExportError(f"adaptive pooling from {tuple(in_spatial)} to "
                              f"{tuple(out_spatial)} (not a whole multiple) is not exported", n)
    k = [i // o for i, o in zip(in_spatial, out_spatial)]

    def pool(x: str) -> str:
        if all(o == 1 for o in out_spatial):
            return b.add("GlobalAveragePool" if op == "AveragePool" else "GlobalMaxPool", [x])
        return b.add(op, [x], kernel_shape=k, strides=k)
    return _averaged(b, n, pool) if op == "AveragePool" else pool(b.x(n.args[0]))


_POOL_F = {
    F.max_pool1d: (1, "max"), F.max_pool2d: (2, "max"), F.max_pool3d: (3, "max"),
    F.avg_pool1d: (1, "avg"), F.avg_pool2d: (2, "avg"), F.avg_pool3d: (3, "avg"),
    F.adaptive_avg_pool1d: (1, "aavg"), F.adaptive_avg_pool2d: (2, "aavg"),
    F.adaptive_avg_pool3d: (3, "aavg"), F.adaptive_max_pool1d: (1, "amax"),
    F.adaptive_max_pool2d: (2, "amax"), F.adaptive_max_pool3d: (3, "amax"),
}


def _pool_fn(b: Builder, n: fx.Node) -> str:
    dims, kind = _POOL_F[n.target]
    if kind == "max":
        a = _pool_args(n, dims, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                 "return_indices"), (None, None, 0, 1, False, False), b)
        if a.pop("return_indices"):
            raise OnnxExportError("max_pool(return_indices=True) is not exported", n)
        return _max_pool(b, n, dims, *a.values())
    if kind == "avg":
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override")
        a = _pool_args(n, dims, names, (None, None, 0, False, True, None), b)
        if dims == 1:
            a.pop("divisor_override")
            return _avg_pool(b, n, dims, *a.values(), None)
        return _avg_pool(b, n, dims, *a.values())
    return _adaptive(b, n, dims, "AveragePool" if kind == "aavg" else "MaxPool")


def _interpolate(b: Builder, n: fx.Node) -> str:
    mode = b.constant(arg(n, 3, "mode", "nearest"))
    align = b.constant(arg(n, 4, "align_corners", None))
    if mode == "nearest":
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                     nearest_mode="floor")
    elif mode in ("bilinear", "linear", "trilinear"):
        attrs = dict(mode="linear", coordinate_transformation_mode="align_corners" if align
                     else "pytorch_half_pixel")
    else:
        raise OnnxExportError(f"interpolate(mode={mode!r}) is not exported", n)
    sizes = b.i64(b.shape(n), "sizes")
    return b.add("Resize", [b.x(n.args[0]), "", "", sizes], **attrs)


def _pad(b: Builder, n: fx.Node) -> str:
    pad = list(b.constant(arg(n, 1, "pad")))
    mode = b.constant(arg(n, 2, "mode", "constant"))
    value = b.constant(arg(n, 3, "value", None)) or 0.0
    rank = len(b.shape(n.args[0]))
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    onnx_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(mode)
    if onnx_mode is None:
        raise OnnxExportError(f"pad(mode={mode!r}) is not exported", n)
    return b.add("Pad", [b.x(n.args[0]), b.i64(begins + ends, "pads"), b.f32(value)],
                 mode=onnx_mode)


# -- raw emitters: their result is final (no QuantizeLinear added by the driver)
def _quantize(b: Builder, n: fx.Node) -> str:
    q = b.qinfo(n)
    x = b.raw(n.args[0])
    if b.qinfo(n.args[0]) is not None:
        raise OnnxExportError("quantize of an already quantized tensor", n)
    return b.quantize(x, q)


def _dequantize(b: Builder, n: fx.Node) -> str:
    return b.x(n.args[0])


def _identity(b: Builder, n: fx.Node) -> str:
    return b.raw(n.args[0])


def _tuple_item(b: Builder, n: fx.Node) -> Any:
    src = b.raw(n.args[0])
    return src[int(b.constant(n.args[1]))]


def _bounds(b: Builder, n: fx.Node, mod: Optional[nn.Module]) -> tuple[Optional[float],
                                                                       Optional[float]]:
    """(min, max) of a relu / relu6 / hardtanh / clamp call or module."""
    target = mod if mod is not None else n.target
    if isinstance(target, nn.ReLU) or target in (F.relu, torch.relu, "relu", "relu_",
                                                 torch.relu_, F.relu_):
        return 0.0, None
    if isinstance(target, nn.ReLU6) or target is F.relu6:
        return 0.0, 6.0
    if isinstance(target, nn.Hardtanh):
        return float(target.min_val), float(target.max_val)
    if target in (F.hardtanh, F.hardtanh_):
        return (float(b.constant(arg(n, 1, "min_val", -1.0))),
                float(b.constant(arg(n, 2, "max_val", 1.0))))
    lo, hi = b.constant(arg(n, 1, "min")), b.constant(arg(n, 2, "max"))
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _integer_bound(value: float, q: QInfo) -> int:
    """The integer a native quantized clamp compares with: ``value`` quantized the way the
    kernel quantizes it."""
    t = torch.quantize_per_tensor(torch.tensor([value]), q.scale, q.zero_point, q.dtype)
    return int(t.int_repr()[0])


def clamp(b: Builder, n: fx.Node, mod: Optional[nn.Module] = None) -> str:
    """ReLU / ReLU6 / hardtanh / clamp. On a quantized tensor that keeps its qparams (the
    native int8 clamp): a Clip on the integers, directly on the producer's QuantizeLinear
    output. Otherwise a float Clip (the driver quantizes it when the output is quantized)."""
    lo, hi = _bounds(b, n, mod)
    q_in, q_out = b.qinfo(n.args[0]), b.qinfo(n)
    if q_in is not None and q_in == q_out:
        np_dtype = q_in.np_dtype
        lo_i = b.const(np.asarray(_integer_bound(lo, q_in), np_dtype), "clip_min") \
            if lo is not None else ""
        hi_i = b.const(np.asarray(_integer_bound(hi, q_in), np_dtype), "clip_max") \
            if hi is not None else ""
        return b.add("Clip", [b.raw(n.args[0]), lo_i, hi_i])
    lo_f = b.f32(lo, "clip_min") if lo is not None else ""
    hi_f = b.f32(hi, "clip_max") if hi is not None else ""
    y = b.add("Clip", [b.x(n.args[0]), lo_f, hi_f])
    return b.quantize(y, q_out) if q_out is not None else y


# The tables below key the targets of a converted graph: the canonical spellings of
# fxquant.ops (normalize rewrote the others), the method calls lowering adds itself
# ("dequantize", "contiguous", "reshape" for a view, "mean" + "squeeze"), the in-place
# spellings normalize keeps as written when their tensor has views (x.relu_(), F.hardtanh_),
# and Python arithmetic on sizes (operator.add ...).
RAW: dict[Any, Emitter] = {
    torch.quantize_per_tensor: _quantize, "dequantize": _dequantize, torch.dequantize: _dequantize,
    "contiguous": _identity, "detach": _identity, torch.detach: _identity, "clone": _identity,
    torch.clone: _identity, F.dropout: _identity, "relu_": clamp,
    F.relu: clamp, torch.relu_: clamp, F.relu6: clamp, F.hardtanh: clamp,
    F.hardtanh_: clamp, torch.clamp: clamp,
}

_ELEMENTWISE: dict[Any, Emitter] = {
    torch.sigmoid: _unary("Sigmoid"), torch.tanh: _unary("Tanh"),
    F.hardswish: _unary("HardSwish"), F.hardsigmoid: _hardsigmoid,
    F.silu: _silu, F.gelu: _gelu, F.elu: lambda b, n: b.add(
        "Elu", [b.x(n.args[0])], alpha=float(b.constant(arg(n, 1, "alpha", 1.0)))),
    F.leaky_relu: _leaky_relu, F.selu: lambda b, n: b.add("Selu", [b.x(n.args[0])]),
    F.celu: lambda b, n: b.add("Celu", [b.x(n.args[0])],
                               alpha=float(b.constant(arg(n, 1, "alpha", 1.0)))),
    torch.exp: _unary("Exp"), torch.sqrt: _unary("Sqrt"),
    F.softmax: _softmax("Softmax"), F.log_softmax: _softmax("LogSoftmax"),
}

_ARITH: dict[Any, Emitter] = {
    torch.add: _binary("Add"), operator.add: _binary("Add"), operator.iadd: _binary("Add"),
    torch.sub: _binary("Sub"), operator.sub: _binary("Sub"), torch.mul: _binary("Mul"),
    operator.mul: _binary("Mul"), operator.imul: _binary("Mul"), torch.div: _binary("Div"),
    operator.truediv: _binary("Div"), torch.matmul: _matmul,
    "quantized::add": _binary("Add"), "quantized::add_relu": _binary("Add", relu=True),
    "quantized::mul": _binary("Mul"), "quantized::mul_relu": _binary("Mul", relu=True),
    "quantized::add_scalar": _binary("Add"), "quantized::mul_scalar": _binary("Mul"),
    "quantized::matmul": _matmul, "quantized::hardswish": _unary("HardSwish"),
    "quantized::sigmoid": _unary("Sigmoid"), "quantized::softmax": _softmax("Softmax"),
    "quantized::elu": _elu_q, "quantized::celu": lambda b, n: b.add(
        "Celu", [b.x(n.args[0])], alpha=float(b.constant(n.args[3]))),
    "quantized::leaky_relu": _leaky_relu, "quantized::prelu": _prelu_q,
    "quantized::layer_norm": _layer_norm_fn, F.layer_norm: _layer_norm_fn,
}

_SHAPE: dict[Any, Emitter] = {
    torch.cat: _cat, torch.stack: _stack, torch.flatten: _reshape, torch.reshape: _reshape,
    "reshape": _reshape, "view": _reshape, "view_as": _reshape, "reshape_as": _reshape,
    torch.squeeze: _reshape, "squeeze": _reshape, torch.unsqueeze: _reshape,
    torch.unflatten: _reshape, torch.permute: _transpose_like, torch.transpose: _transpose_like,
    torch.t: _transpose_like, torch.movedim: _transpose_like, torch.mean: _mean, "mean": _mean,
    F.interpolate: _interpolate, F.pad: _pad, torch.chunk: _split_like, torch.split: _split_like,
    torch.tensor_split: _split_like, torch.unbind: _split_like,
    **{f: _pool_fn for f in _POOL_F},
}

FLOAT: dict[Any, Emitter] = {**_ELEMENTWISE, **_ARITH, **_SHAPE}


def function_key(node: fx.Node) -> Any:
    """The table key of a call_function / call_method node: the function, the method name,
    or ``"quantized::<op>"`` for a torch.ops.quantized kernel."""
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return target


# ------------------------------------------------------------------------ module emitters
def _weight_initializer(b: Builder, w: torch.Tensor, base: str) -> tuple[str, np.ndarray, int]:
    """An int8 weight initializer and its DequantizeLinear: (float name, scales, axis or -1)."""
    ints = w.int_repr().numpy()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales = w.q_per_channel_scales().to(torch.float32).numpy()
        zps = w.q_per_channel_zero_points().numpy().astype(ints.dtype)
        axis = int(w.q_per_channel_axis())
    else:
        scales = np.asarray(w.q_scale(), dtype=np.float32)
        zps = np.asarray(w.q_zero_point(), dtype=ints.dtype)
        axis = -1
    inputs = [b.const(ints, f"{base}_weight_int8"), b.f32(scales, f"{base}_weight_scale"),
              b.const(zps, f"{base}_weight_zero_point")]
    name = b.add("DequantizeLinear", inputs, axis=axis if axis >= 0 else None)
    return name, scales, axis


def _bias_initializer(b: Builder, bias: Optional[torch.Tensor], in_q: QInfo,
                      w_scales: np.ndarray, channels: int) -> Optional[str]:
    """The bias as int32 with scale input scale x weight scale (per output channel), zero
    point 0, and its DequantizeLinear: what ONNX Runtime's QLinearConv/QGemm fusion expects.
    With ``b.bias`` "float" the float bias itself (exact, as fbgemm adds it; ONNX Runtime then
    leaves the conv unfused); with "auto" int32 where that is exact (a model converted with
    ``bias="int32"``: the bias is a whole number of those units), else float."""
    if bias is None:
        return None
    scales = (np.float64(in_q.scale) * np.broadcast_to(w_scales.astype(np.float64),
                                                        (channels,))).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    units = bias.detach().double().numpy() / safe
    ints = np.clip(np.rint(units), -(2**31), 2**31 - 1)
    exact = bool(np.all(np.abs(units - ints) <= 1e-3))
    if b.bias == "float" or (b.bias == "auto" and not exact):
        return b.f32(bias.detach().float().numpy(), f"{b.node.name}_bias")
    inputs = [b.const(ints.astype(np.int32), f"{b.node.name}_bias_int32"),
              b.f32(scales, f"{b.node.name}_bias_scale"),
              b.const(np.zeros(channels, np.int32), f"{b.node.name}_bias_zero_point")]
    return b.add("DequantizeLinear", inputs, axis=0)


def _conv_input(b: Builder, n: fx.Node, mod: Any) -> str:
    """The conv's float input; padding modes other than zeros pad the integers first."""
    mode = getattr(mod, "padding_mode", "zeros")
    if mode == "zeros":
        return b.x(n.args[0])
    onnx_mode = {"reflect": "reflect", "replicate": "edge"}.get(mode)
    if onnx_mode is None:
        raise OnnxExportError(f"conv padding_mode={mode!r} is not exported", n)
    rank = len(b.shape(n.args[0]))
    p = [0, 0] + [int(v) for v in mod.padding]
    padded = b.add("Pad", [b.raw(n.args[0]), b.i64(p + p, "pads")], mode=onnx_mode)
    q = b.qinfo(n.args[0])
    assert len(p) == rank
    return b.dequantize(padded, q) if q is not None else padded


def _conv_attrs(mod: Any, pads_given: bool) -> dict[str, Any]:
    pads = [0] * len(mod.padding) if not pads_given else [int(v) for v in mod.padding]
    attrs = dict(kernel_shape=list(mod.kernel_size), strides=list(mod.stride),
                 pads=pads + pads, dilations=list(mod.dilation), group=int(mod.groups))
    if getattr(mod, "transposed", False) or isinstance(mod, qnn._ConvTransposeNd):
        attrs["output_padding"] = [int(v) for v in mod.output_padding]
    return attrs


def _qconv(b: Builder, n: fx.Node, mod: Any) -> str:
    in_q = b.qinfo(n.args[0])
    if in_q is None:
        raise OnnxExportError(f"{type(mod).__name__} on a float input", n)
    transposed = isinstance(mod, qnn._ConvTransposeNd)
    w_name, w_scales, _ = _weight_initializer(b, mod.weight(), n.name)
    channels = int(mod.out_channels)
    scales = w_scales
    if transposed and w_scales.size > 1 and mod.groups > 1:
        scales = np.tile(w_scales, mod.groups)
    bias = _bias_initializer(b, mod.bias(), in_q, scales, channels)
    x = _conv_input(b, n, mod)
    zeros_mode = getattr(mod, "padding_mode", "zeros") == "zeros"
    y = b.add("ConvTranspose" if transposed else "Conv", [x, w_name, bias],
              **_conv_attrs(mod, zeros_mode))
    relu = isinstance(mod, (qnn.ConvReLU1d, qnn.ConvReLU2d, qnn.ConvReLU3d))
    return b.relu(y) if relu else y


def _qconv_add(b: Builder, n: fx.Node, mod: ConvAdd2d) -> str:
    """Conv -> Add (the dequantized accumulator) [-> Relu], quantized once after: the graph
    OpenVINO runs as one int8 conv with a sum post-op (ONNX Runtime runs the conv in float:
    its QLinearConv has no sum input)."""
    y = b.add("Add", [_qconv(b, n, mod), b.x(n.args[1])])
    return b.relu(y) if mod.relu else y


def _qconv_act(b: Builder, n: fx.Node, mod: ConvAct2d) -> str:
    """Conv -> SiLU (Sigmoid, Mul) or HardSwish, quantized once after: the graph OpenVINO runs
    as one int8 conv with the activation as a post-op."""
    y = _qconv(b, n, mod)
    if mod.activation == "silu":
        return b.add("Mul", [y, b.add("Sigmoid", [y])])
    return b.add("HardSwish", [y])


def _gemm(b: Builder, n: fx.Node, weight: str, bias: Optional[str], out_features: int) -> str:
    """x @ W^T + bias as a Gemm (transB), input reshaped to 2-D and back when it is not."""
    in_shape, out_shape = b.shape(n.args[0]), b.shape(n)
    x = b.x(n.args[0])
    if len(in_shape) != 2:
        x = b.add("Reshape", [x, b.i64([-1, in_shape[-1]])])
    y = b.add("Gemm", [x, weight, bias], transB=1)
    if len(in_shape) != 2:
        y = b.add("Reshape", [y, b.i64(out_shape)])
    return y


def _qlinear(b: Builder, n: fx.Node, mod: Any) -> str:
    in_q = b.qinfo(n.args[0])
    if in_q is None:
        raise OnnxExportError(f"{type(mod).__name__} on a float input", n)
    w = mod.weight()
    w_name, w_scales, _ = _weight_initializer(b, w, n.name)
    bias = _bias_initializer(b, mod.bias(), in_q, w_scales, int(w.shape[0]))
    y = _gemm(b, n, w_name, bias, int(w.shape[0]))
    return b.relu(y) if isinstance(mod, qnn.LinearReLU) else y


def _float_linear(b: Builder, n: fx.Node, mod: nn.Linear) -> str:
    w = b.f32(mod.weight.detach().numpy(), f"{n.name}_weight")
    bias = b.f32(mod.bias.detach().numpy(), f"{n.name}_bias") if mod.bias is not None else None
    return _gemm(b, n, w, bias, mod.out_features)


def _float_conv(b: Builder, n: fx.Node, mod: nn.modules.conv._ConvNd) -> str:
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise OnnxExportError(f"float conv with padding {mod.padding!r} / "
                              f"{mod.padding_mode} is not exported", n)
    inputs = [b.x(n.args[0]), b.f32(mod.weight.detach().numpy(), f"{n.name}_weight")]
    if mod.bias is not None:
        inputs.append(b.f32(mod.bias.detach().numpy(), f"{n.name}_bias"))
    return b.add("ConvTranspose" if mod.transposed else "Conv", inputs,
                 **_conv_attrs(mod, True))


def _batch_norm(b: Builder, n: fx.Node, mod: Any) -> str:
    if getattr(mod, "running_mean", None) is None:
        raise OnnxExportError("BatchNorm without running statistics is not exported", n)
    c = int(mod.num_features)
    weight = mod.weight if mod.weight is not None else torch.ones(c)
    bias = mod.bias if mod.bias is not None else torch.zeros(c)
    params = [b.f32(t.detach().numpy(), f"{n.name}_{k}") for k, t in
              (("scale", weight), ("bias", bias), ("mean", mod.running_mean),
               ("var", mod.running_var))]
    y = b.add("BatchNormalization", [b.x(n.args[0]), *params], epsilon=float(mod.eps))
    return b.relu(y) if isinstance(mod, (qnn.BNReLU2d, qnn.BNReLU3d)) else y


def _softmax_module(op: str) -> ModuleEmitter:
    def emit(b: Builder, n: fx.Node, mod: Any) -> str:
        rank = len(b.shape(n.args[0]))
        dim = mod.dim
        if dim is None:
            dim = 0 if rank in (0, 1, 3) else 1
        return b.add(op, [b.x(n.args[0])], axis=int(dim) % rank)
    return emit


def _fused_float(b: Builder, n: fx.Node, mod: fused.FusedModule) -> str:
    """A fused float container fxquant kept float: its first member, then its activation."""
    if isinstance(mod, (fused._ConvBnBase, fused.LinearBn1d)):
        folded = mod.fold_eval()
        return module_emitter(folded, n)(b, n, folded)
    first, *rest = list(mod)
    y = module_emitter(first, n)(b, n, first)
    for member in rest:
        if isinstance(member, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            lo, hi = _bounds(b, n, member)
            y = b.add("Clip", [y, b.f32(lo, "clip_min") if lo is not None else "",
                               b.f32(hi, "clip_max") if hi is not None else ""])
        else:
            raise OnnxExportError(f"fused member {type(member).__name__} is not exported", n)
    return y


def _module_float(fn: Emitter) -> ModuleEmitter:
    return lambda b, n, mod: fn(b, n)


_MODULES: list[tuple[tuple[type, ...], ModuleEmitter]] = [
    ((ConvAdd2d,), _qconv_add),
    ((ConvAct2d,), _qconv_act),
    ((qnn.Conv1d, qnn.Conv2d, qnn.Conv3d, qnn._ConvTransposeNd), _qconv),
    ((qnn.Linear,), _qlinear),
    ((qnn._BatchNormNd, nn.modules.batchnorm._BatchNorm), _batch_norm),
    ((nn.Linear,), _float_linear),
    ((nn.modules.conv._ConvNd,), _float_conv),
    ((fused.FusedModule,), _fused_float),
    ((nn.ReLU,), lambda b, n, mod: clamp(b, n, mod)),
    ((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
     lambda b, n, mod: _identity(b, n)),
    ((nn.Flatten,), _module_float(_reshape)),
    ((nn.PReLU,), lambda b, n, mod: _prelu(b, n, mod.weight)),
    ((nn.Softmax,), _softmax_module("Softmax")),  # dim None only: normalize keeps it a module
    ((nn.LogSoftmax,), _softmax_module("LogSoftmax")),  # dim None only, as nn.Softmax
    ((nn.LayerNorm,), lambda b, n, mod: _layer_norm(b, n, mod.normalized_shape, mod.weight,
                                                    mod.bias, mod.eps)),
]
# (the stateless activation, resampling, reshaping and pooling modules, nn.ReLU6 / nn.Hardtanh
# / nn.MaxPool2d / nn.AdaptiveAvgPool2d included, reach a converted graph as their function:
# normalize rewrites them, see fxquant.ops)


def module_emitter(mod: nn.Module, node: fx.Node) -> ModuleEmitter:
    for classes, emit in _MODULES:
        if isinstance(mod, classes):
            return emit
    raise OnnxExportError(f"module {type(mod).__name__} has no ONNX form in fxquant's exporter",
                          node, hint=_UNSUPPORTED_HINT)


_UNSUPPORTED_HINT = ("keep it out of the exported part, or run the model on the native path "
                     "(dynamic / weight-only quantized modules have no QDQ form here)")


# ------------------------------------------------------------------------ the driver
_RAW_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d,
                nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class GraphIO:
    """How the ONNX graph's inputs and outputs map to the module's: which example inputs are
    tensors (the rest are baked in), and for each output leaf its ONNX output (with the qparams
    of a quantized output, rebuilt as a quantized tensor) or a constant."""

    input_names: list[str]
    input_positions: list[int]
    input_shapes: list[tuple[int, ...]]
    output_names: list[str]
    output_q: list[Optional[QInfo]]
    leaves: list[Any]  # ("output", i) or ("const", value)
    spec: Any


def _live(gm: fx.GraphModule) -> set[fx.Node]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    live, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


def emit_node(b: Builder, node: fx.Node) -> Any:
    """Write one fx node; returns its raw ONNX name(s)."""
    val = b.values[node]
    if node.op == "call_module":
        mod = fetch(b.gm, str(node.target))
        emit = module_emitter(mod, node)
        if isinstance(mod, _RAW_MODULES):
            return emit(b, node, mod)
        return _module_clamp(b, node, mod, _finish(b, val, emit(b, node, mod)))
    key = function_key(node)
    if key is operator.getitem and isinstance(b.value(node.args[0]), tuple):
        return _tuple_item(b, node)
    if key is operator.getitem:
        return _finish(b, val, _getitem(b, node))
    try:
        raw, emit = key in RAW, RAW.get(key) or FLOAT.get(key)
    except TypeError:  # an unhashable target
        raw, emit = False, None
    if emit is None:
        name = key if isinstance(key, str) else getattr(key, "__name__", repr(key))
        raise OnnxExportError(f"{node.op} {name} has no ONNX form in fxquant's exporter", node,
                              hint=_UNSUPPORTED_HINT)
    out = emit(b, node)
    return out if raw else _finish(b, val, out)


def _module_clamp(b: Builder, node: fx.Node, mod: nn.Module, out: str) -> str:
    """A quantized conv / linear that clips its own int8 output in place (``clamp_min`` /
    ``clamp_max``: ReLU6 / hardtanh bounds the kernel's saturation cannot enforce, as with
    7-bit activations): a Clip on the uint8 output of the conv's QuantizeLinear, with the
    integer bounds the in-place ``hardtanh_`` uses. No Q/DQ pair between the conv and the
    Clip: the Clip's output quantization is the conv's."""
    lo, hi = getattr(mod, "clamp_min", None), getattr(mod, "clamp_max", None)
    if lo is None and hi is None:
        return out
    q = b.qinfo(node)
    if q is None:
        raise OnnxExportError(f"{type(mod).__name__} with a float output", node)
    bounds = [b.const(np.asarray(_integer_bound(float(v), q), q.np_dtype), f"clip_{k}")
              if v is not None else "" for k, v in (("min", lo), ("max", hi))]
    return b.add("Clip", [out, *bounds])


def _finish(b: Builder, val: Recorded, out: Any) -> Any:
    """QuantizeLinear with the native node's output qparams where its output is quantized."""
    if isinstance(val, tuple):
        return [_finish(b, v, o) for v, o in zip(val, out)]
    if isinstance(val, TensorVal) and val.q is not None and out not in b.requantized:
        return b.quantize(out, val.q)
    return out


def _elem_type(onnx: Any, val: TensorVal) -> int:
    if val.q is not None:
        return onnx.TensorProto.UINT8 if val.q.dtype == torch.quint8 else onnx.TensorProto.INT8
    np_dtype = torch.empty((), dtype=val.dtype).numpy().dtype
    return onnx.helper.np_dtype_to_tensor_dtype(np_dtype)


def build_model(gm: fx.GraphModule, example_inputs: tuple, onnx: Any, bias: str = "int32",
                round_sum_inputs: bool = False, int8_midpoint: bool = False
                ) -> tuple[Any, GraphIO]:
    """The ONNX ModelProto of a converted GraphModule run on ``example_inputs``; ``bias``:
    "int32" (what ONNX Runtime's QLinearConv / QGemm fusion needs), "float", or "auto" (int32
    where it is exact, see :func:`_bias_initializer`); ``round_sum_inputs``: see
    :meth:`Builder.sum_input` (for OpenVINO); ``int8_midpoint``: see :func:`int8_midpoint_values`."""
    if bias not in ("int32", "float", "auto"):
        raise OnnxExportError(f"bias={bias!r}: use 'int32', 'float' or 'auto'")
    values = record(gm, example_inputs)
    if int8_midpoint:
        values = int8_midpoint_values(gm, values)
    b = Builder(gm, values, onnx.helper, onnx.numpy_helper, bias=bias,
                round_sum_inputs=round_sum_inputs)
    inputs, positions, shapes, names = [], [], [], []
    live = _live(gm)
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = values.get(node)
        if not isinstance(val, TensorVal):
            continue  # a constant input (or an absent default): baked into the graph
        if val.q is not None:
            raise OnnxExportError("a quantized model input is not exported", node,
                                  hint="give the model float inputs")
        name = b.fresh(node.name)
        b.names[node] = name
        inputs.append(onnx.helper.make_tensor_value_info(name, _elem_type(onnx, val),
                                                         list(val.shape)))
        positions.append(i)
        shapes.append(val.shape)
        names.append(name)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node not in live \
                or isinstance(values.get(node), Const):
            continue
        b.node = node
        out = emit_node(b, node)
        if b.relu_after_quantize:
            q = values[node].q
            zp = b.const(np.asarray(q.zero_point, q.np_dtype), "relu_min")
            out = b.add("Clip", [out, zp, ""])
            b.relu_after_quantize = False
        b.names[node] = out
    b.node = None
    io, outputs = _outputs(b, gm, onnx, names, positions, shapes)
    graph = onnx.helper.make_graph(b.nodes, "fxquant", inputs, outputs,
                                   initializer=b.initializers)
    model = onnx.helper.make_model(graph, producer_name="fxquant",
                                   opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model, io


def _outputs(b: Builder, gm: fx.GraphModule, onnx: Any, names: list[str], positions: list[int],
             shapes: list[tuple[int, ...]]) -> tuple[GraphIO, list]:
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves, spec = pytree.tree_flatten(out_node.args[0])
    kinds, outputs, out_names, out_q = [], [], [], []
    for leaf in leaves:
        val = b.value(leaf)
        if isinstance(val, Const):
            kinds.append(("const", val.value))
            continue
        if not isinstance(val, TensorVal):
            raise OnnxExportError("a tuple of tensors returned as one value is not exported",
                                  leaf if isinstance(leaf, fx.Node) else None,
                                  hint="return the items themselves")
        b.node = leaf if isinstance(leaf, fx.Node) else None
        src = b.raw(leaf)
        name = b.fresh(f"output_{len(out_names)}")
        b.nodes.append(onnx.helper.make_node("Identity", [src], [name], name=name))
        outputs.append(onnx.helper.make_tensor_value_info(name, _elem_type(onnx, val),
                                                          list(val.shape)))
        kinds.append(("output", len(out_names)))
        out_names.append(name)
        out_q.append(val.q)
    b.node = None
    return GraphIO(names, positions, shapes, out_names, out_q, kinds, spec), outputs
