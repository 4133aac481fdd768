"""The op table shared by torch's native CPU backends (fbgemm, x86, qnnpack, onednn).

Each backend file takes these rules and adds or removes what its kernels differ on.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Optional, Union

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.backends.activations import CLAMP_FAMILY, activation_rules
from fxquant.backends.base import (DYNAMIC, FIXED, OWN, SHARED, SHARED_ALL, WEIGHT_ONLY,
                                   WEIGHTED, LowerCtx, Lowered, Rule)
from fxquant.backends.reference_ops import weighted_core
from fxquant.backends.names import ONEDNN, QNNPACK
from fxquant.nn import dynamic as dyn
from fxquant.nn import embedding as emb
from fxquant.nn import fused
from fxquant.nn import quantized as q
from fxquant.patterns import NoMatch, Op, target_name

_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


# ---------------------------------------------------------------- lowering functions
def lower_weighted(ctx: LowerCtx) -> Lowered:
    """dequantize -> reference conv/linear (-> relu / clamp inside a fused module) -> quantize
    becomes one quantized module with prepacked weights. A clamp (ReLU6, Hardtanh, clamp) was
    observed, so its bound is in the output qparams: the kernel's saturation enforces it where
    the output uses the full integer range; with reduce_range headroom the module clips its
    int8 output in place (fxquant.nn.clamped). On x86 / fbgemm, convs may be packed for a
    faster engine (fxquant.backends.engine_choice)."""
    from fxquant.backends import engine_choice

    core, container = weighted_core(ctx.module)
    qcls = _QUANTIZED_WEIGHTED.get((type(container) if container is not None else None,
                                    _float_class(core)))
    bounds = None
    if isinstance(container, _CLAMPED):
        bounds = (float(container[1].min_val), float(container[1].max_val))
        # the kernel's relu is the lower bound when it is 0
        qcls = _QUANTIZED_WEIGHTED[(_RELU_OF[type(container)] if bounds[0] == 0.0 else None,
                                    _float_class(core))]
    if qcls is None:
        return NoMatch(f"no quantized module for {type(ctx.module).__name__}")
    in_module_clamp = bounds is not None and not _saturation_enforces(bounds, ctx)
    build = _weighted_builder(qcls, core, ctx, bounds if in_module_clamp else None)
    try:
        qmod = build(ctx.pack_engine)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        return NoMatch(f"{qcls.__name__} cannot take these qparams: {e}")
    err = ctx.probe(qmod)
    if err:
        return NoMatch(f"{type(qmod).__name__} does not run on this engine: {err}")
    qmod = engine_choice.choose(ctx, qmod, build)
    ctx.set_module(qmod)
    if in_module_clamp:
        # reduce_range (x86/fbgemm on AVX2) leaves headroom: the kernel saturates at 255,
        # past the observed range, so the module clips its int8 output to the bound
        ctx.kernel = (f"{qcls.__name__} + in-place int8 clamp{bounds} inside "
                      f"{type(qmod).__name__} (the output range has reduce_range headroom)")
    return ctx.gm.graph.call_module(ctx.node.target, (ctx.qinputs[0],))


def lower_conv_add(ctx: LowerCtx) -> Lowered:
    """conv -> add(·, other) [-> relu], a group ``convert_fx(..., fuse_sums=True)`` formed
    (fxquant.passes.fuse_sums), as one module: oneDNN's int8 conv with a sum post-op, the
    conv's output added unrounded (fxquant.nn.conv_add)."""
    from fxquant.backends.reference_ops import is_dequantize
    from fxquant.nn.conv_add import ACTIVATION_DTYPES, ConvAdd2d

    if len(ctx.group) < 2 or not is_dequantize(ctx.group[1].args[1]):
        return NoMatch("not a conv + add of a dequantized tensor")
    other = ctx.group[1].args[1].args[0]
    core, container = weighted_core(ctx.module)
    if container is not None or ctx.out_dtype not in ACTIVATION_DTYPES:
        return NoMatch("the fused conv + add kernel takes a plain Conv2d and quint8 output")
    qmod = ConvAdd2d.from_reference_add(core, ctx.out_scale, ctx.out_zero_point,
                                        relu=len(ctx.group) == 3)
    refused = _runs_or_why(qmod, (ctx.qinputs[0], other), "a sum post-op")
    if refused is not None:
        return refused
    ctx.set_module(qmod)
    ctx.kernel = "onednn::qconv2d_pointwise.binary (conv + sum" + (
        " + relu)" if qmod.relu else ")")
    return ctx.gm.graph.call_module(ctx.node.target, (ctx.qinputs[0], other))


def lower_conv_act(ctx: LowerCtx) -> Lowered:
    """conv -> SiLU / hardswish, a group ``convert_fx(..., fuse_activations=True)`` formed
    (fxquant.passes.fuse_activations), as one module: oneDNN's int8 conv with the activation
    as a post-op, the conv's output not rounded before it (fxquant.nn.conv_add.ConvAct2d)."""
    from fxquant.nn.conv_add import ACTIVATION_DTYPES, ACTIVATION_FUNCTIONS, ConvAct2d

    act = ctx.group[-1]
    name = ACTIVATION_FUNCTIONS.get(act.target)
    if len(ctx.group) != 2 or name is None:
        return NoMatch("not a conv + SiLU / hardswish")
    core, container = weighted_core(ctx.module)
    if container is not None or ctx.out_dtype not in ACTIVATION_DTYPES:
        return NoMatch("the fused conv + activation kernel takes a plain Conv2d and quint8 "
                       "output")
    qmod = ConvAct2d.from_reference_act(core, ctx.out_scale, ctx.out_zero_point, name)
    refused = _runs_or_why(qmod, (ctx.qinputs[0],), f"a {name} post-op")
    if refused is not None:
        return refused
    ctx.set_module(qmod)
    ctx.kernel = f"onednn::qconv2d_pointwise (conv + {name})"
    return ctx.gm.graph.call_module(ctx.node.target, (ctx.qinputs[0],))


def _runs_or_why(qmod: nn.Module, inputs: tuple, post_op: str) -> Optional[NoMatch]:
    """None when a fused oneDNN conv module (fxquant.nn.conv_add) runs on samples of its
    quantized ``inputs`` (or there are none to try), else the NoMatch that keeps the reference
    (the kernel is missing from this torch build or CPU)."""
    from fxquant.backends.base import _sample_quantized

    samples = tuple(_sample_quantized(t) for t in inputs)
    if any(t is None for t in samples):
        return None
    try:
        with torch.no_grad():
            qmod(*samples)
    except Exception as e:  # noqa: BLE001 - no such kernel here: keep the reference
        return NoMatch(f"oneDNN's conv with {post_op} does not run here: "
                       f"{str(e).strip().splitlines()[0][:200]}")
    return None


def _never(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    return False


def _weighted_builder(qcls: type, core: nn.Module, ctx: LowerCtx,
                      bounds: Optional[tuple[float, float]]) -> Any:
    """engine -> the quantized module packed for it (the clamped form when ``bounds``)."""
    from fxquant.nn import clamped

    def build(engine: Optional[str]) -> nn.Module:
        if bounds is None:
            return qcls.from_reference(core, ctx.out_scale, ctx.out_zero_point, engine)
        plain = next(c for c in qcls.__mro__ if c in clamped.CLAMPED_OF)
        return clamped.CLAMPED_OF[plain].from_reference_clamped(
            core, ctx.out_scale, ctx.out_zero_point, bounds, engine)
    return build


def _saturation_enforces(bounds: tuple[float, float], ctx: LowerCtx) -> bool:
    """Do the output's integer limits map inside [lo, hi] (up to half a step)? Then the kernel's
    saturation is the clamp and no clamp op is needed."""
    lo_int, hi_int = (0, 255) if ctx.out_dtype == torch.quint8 else (-128, 127)
    s, z = ctx.out_scale, ctx.out_zero_point
    return (hi_int - z) * s <= bounds[1] + s / 2 and (lo_int - z) * s >= bounds[0] - s / 2


def _float_class(mod: nn.Module) -> type:
    return next(c for c in type(mod).__mro__ if c.__module__.startswith("torch.nn.modules"))


def lower_batch_norm(ctx: LowerCtx) -> Lowered:
    mod = ctx.module
    qcls = {nn.BatchNorm2d: q.BatchNorm2d, nn.BatchNorm3d: q.BatchNorm3d,
            fused.BNReLU2d: q.BNReLU2d, fused.BNReLU3d: q.BNReLU3d}[type(mod)]
    qmod = qcls.from_float(mod, None, ctx.out_scale, ctx.out_zero_point)
    err = ctx.probe(qmod)
    if err:
        return NoMatch(f"{qcls.__name__} does not run on this engine: {err}")
    ctx.set_module(qmod)
    return ctx.gm.graph.call_module(ctx.node.target, (ctx.qinputs[0],))


def lower_same_op(ctx: LowerCtx) -> Lowered:
    """The op runs as written on the quantized tensor (pooling, relu, flatten, ...): the kernel
    keeps the input's scale and zero point, which the shared observer made the output's."""
    node = ctx.node
    err = ctx.probe(_callable_of(ctx), extra=tuple(node.args[1:]))
    if err:
        return NoMatch(f"{_op_label(ctx)} has no quantized kernel on this engine: {err}")
    args = list(node.args)
    args[0] = ctx.qinputs[0]
    ctx.kernel = f"{_op_label(ctx)} on the quantized tensor"
    return ctx.gm.graph.create_node(node.op, node.target, tuple(args), dict(node.kwargs))


def lower_view_as_reshape(ctx: LowerCtx) -> Lowered:
    """``x.view(shape)`` on a quantized tensor: quantized convs return channels-last tensors,
    which ``view`` cannot reshape; ``reshape`` gives the same values (copying when needed)."""
    node = ctx.node
    if node.target == "view_as":
        shape = ctx.note(ctx.gm.graph.call_method("size", (node.args[1],)), "shape for reshape")
        args = (ctx.qinputs[0], shape)
    else:
        args = (ctx.qinputs[0], *node.args[1:])
    ctx.kernel = "reshape on the quantized tensor (view cannot take channels-last input)"
    return ctx.gm.graph.call_method("reshape", args, dict(node.kwargs))


def lower_mean(ctx: LowerCtx) -> Lowered:
    """``x.mean(dims)`` on a quantized tensor, as ``mean(dims, keepdim=True)`` then ``squeeze``:
    torch's quantized mean without keepdim fails on tensors whose strides read as both
    contiguous and channels-last (a conv output of 1x1 spatial size, or of one channel)."""
    node = ctx.node
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or isinstance(dims, fx.Node) or isinstance(keepdim, fx.Node) \
            or "dtype" in node.kwargs:
        return NoMatch("mean over all elements, run-time dims or a dtype: no quantized form here")
    err = ctx.probe(lambda x: x.mean(dims, keepdim=True))
    if err:
        return NoMatch(f"quantized mean does not run here: {err}")
    ctx.kernel = "mean on the quantized tensor"
    mean = ctx.gm.graph.call_method("mean", (ctx.qinputs[0], dims), {"keepdim": True})
    if keepdim:
        return mean
    ctx.note(mean, "mean with keepdim; the squeeze after it drops the reduced dims")
    return ctx.gm.graph.call_method("squeeze", (mean, dims))


def lower_shared_list(ctx: LowerCtx) -> Lowered:
    """cat / stack of quantized tensors that share one scale/zero_point: a plain copy."""
    node = ctx.node
    tensors = node.args[0]
    if len(ctx.qinputs) != len(tensors):
        return NoMatch("not every input is a quantized tensor")
    qs = [ctx.qinputs[(0, i)] for i in range(len(tensors))]
    err = ctx.probe(lambda *xs: node.target(list(xs), *node.args[1:], **node.kwargs),
                    keys=tuple((0, i) for i in range(len(tensors))))
    if err:
        return NoMatch(f"{_op_label(ctx)} has no quantized kernel on this engine: {err}")
    ctx.kernel = f"{_op_label(ctx)} of quantized tensors with shared qparams (no requantize)"
    return ctx.gm.graph.call_function(node.target, (qs, *node.args[1:]), dict(node.kwargs))


def lower_scalar(kernel: Any, kernel_relu: Any = None):
    """x + c / x * c: the kernel derives its output qparams from the input's (add: same scale,
    shifted zero point; mul: scaled), as torch.ao does; the output observer is shared."""
    def lower(ctx: LowerCtx) -> Lowered:
        scalar = ctx.node.args[1]
        if isinstance(scalar, fx.Node) or not isinstance(scalar, (int, float)):
            return NoMatch("the scalar operand is only known at run time")
        if len(ctx.group) > 1:
            return NoMatch("scalar form with a fused relu has no kernel")
        seen: list[tuple[float, int]] = []

        def run(a: torch.Tensor) -> None:
            out = kernel(a, float(scalar))
            seen.append((float(out.q_scale()), int(out.q_zero_point())))

        err = ctx.probe(run)
        if err:
            return NoMatch(f"quantized::{kernel.__name__} does not run here: {err}")
        ctx.kernel = f"quantized::{kernel.__name__}"
        ctx.derived_qparams = True
        # the kernel derives its output qparams from the input's and the scalar only: known now
        ctx.derived = seen[0] if seen and len(set(seen)) == 1 else None
        return ctx.gm.graph.call_function(kernel, (ctx.qinputs[0], float(scalar)))
    return lower


def lower_matmul(ctx: LowerCtx) -> Lowered:
    if set(ctx.qinputs) != {0, 1}:
        return NoMatch("one operand is not a quantized tensor")
    err = ctx.probe(lambda a, b: torch.ops.quantized.matmul(a, b, ctx.out_scale,
                                                            ctx.out_zero_point), keys=(0, 1))
    if err:
        return NoMatch(f"quantized::matmul does not run here: {err}")
    ctx.kernel = "quantized::matmul"
    return ctx.gm.graph.call_function(torch.ops.quantized.matmul,
                                      (ctx.qinputs[0], ctx.qinputs[1], ctx.out_scale,
                                       ctx.out_zero_point))


def lower_same_op_contiguous(ctx: LowerCtx) -> Lowered:
    """As lower_same_op, on a contiguous copy of the input: qnnpack's clamp-family kernels
    (hardtanh, relu6, clamp) give wrong values on channels-last tensors, which is what every
    quantized conv returns (seen on torch 2.13: errors up to the full clamp range)."""
    node = ctx.node
    err = ctx.probe(lambda x, *rest: _callable_of(ctx)(x.contiguous(), *rest),
                    extra=tuple(node.args[1:]))
    if err or any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return NoMatch(f"{_op_label(ctx)} has no quantized kernel here for these arguments: "
                       f"{err or 'bounds known only at run time'}")
    args = list(node.args)
    contiguous = ctx.note(ctx.gm.graph.call_method("contiguous", (ctx.qinputs[0],)),
                          "qnnpack's clamp kernels are wrong on channels-last input")
    args[0] = contiguous
    ctx.kernel = f"{_op_label(ctx)} on the quantized tensor (made contiguous first: qnnpack)"
    return ctx.gm.graph.create_node(node.op, node.target, tuple(args), dict(node.kwargs))


def _callable_of(ctx: LowerCtx) -> Any:
    node = ctx.node
    if node.op == "call_module":
        return ctx.module
    if node.op == "call_method":
        return lambda x, *rest: getattr(x, node.target)(*rest, **node.kwargs)
    return lambda x, *rest: node.target(x, *rest, **node.kwargs)


def _op_label(ctx: LowerCtx) -> str:
    node = ctx.node
    if node.op == "call_module":
        return type(ctx.module).__name__
    return target_name(node.target)


def lower_binary(kernel: Any, kernel_relu: Any):
    def lower(ctx: LowerCtx) -> Lowered:
        if set(ctx.qinputs) != {0, 1}:
            return NoMatch("one operand is not a quantized tensor (tensor-scalar form has no "
                           "kernel here yet)")
        relu = _ends_in_relu(ctx)
        if isinstance(relu, NoMatch):
            return relu
        target = kernel_relu if relu else kernel
        order = _broadcast_order(ctx)
        err = ctx.probe(lambda a, b: target(a, b, ctx.out_scale, ctx.out_zero_point),
                        keys=order)
        if err:  # e.g. qnnpack refuses input/output scale ratios outside [2**-14, 2**8)
            return NoMatch(f"quantized::{target.__name__} refuses these qparams: {err}")
        ctx.kernel = f"quantized::{target.__name__}"
        return ctx.gm.graph.call_function(
            target, (ctx.qinputs[order[0]], ctx.qinputs[order[1]], ctx.out_scale,
                     ctx.out_zero_point))
    return lower


def _ends_in_relu(ctx: LowerCtx) -> Union[bool, NoMatch]:
    """Whether the op's fused group is op + ReLU, the one activation quantized::add_relu /
    mul_relu fuse (False for the op alone); any other group (a user's add + sigmoid) is a
    NoMatch naming it, so it stays float rather than lowering as *_relu."""
    from fxquant.fusion import RELU

    if not ctx.group:
        return False
    if len(ctx.group) == 2 and RELU.matches(ctx.group[-1], ctx.modules):
        return True
    names = " + ".join(type(ctx.modules[n.target]).__name__ if n.op == "call_module"
                       else target_name(n.target) for n in ctx.group)
    return NoMatch(f"fused group {names}: no fused kernel here (only add / mul + relu)")


def _broadcast_order(ctx: LowerCtx) -> tuple[int, int]:
    """(0, 1), or (1, 0) when only the second operand has the output's shape: add / mul
    commute, and quantized::add / mul size their output from the first operand (a smaller
    first operand makes torch resize the output, which it deprecates)."""
    from fxquant.meta import qinfo

    shapes = [getattr(qinfo(ctx.qinputs[k]).value, "shape", None) for k in (0, 1)]
    if None in shapes or shapes[0] == shapes[1]:
        return (0, 1)
    try:
        out = torch.broadcast_shapes(tuple(shapes[0]), tuple(shapes[1]))
    except RuntimeError:
        return (0, 1)
    return (1, 0) if tuple(shapes[0]) != out and tuple(shapes[1]) == out else (0, 1)


def lower_dynamic(ctx: LowerCtx) -> Lowered:
    """A float module becomes its dynamic (or weight-only) counterpart: weights quantized now
    with the qconfig's weight observer, activations measured by the kernel at run time."""
    from fxquant.meta import qinfo

    mod = ctx.module
    qcls = _DYNAMIC_MODULES.get(type(mod))
    if qcls is None:
        return NoMatch(f"no dynamic module for {type(mod).__name__}")
    spec = qinfo(ctx.node).weight_spec
    dtype = spec.dtype if spec is not None else torch.qint8
    try:
        qmod = qcls.from_float(mod, spec.observer if spec is not None else None, dtype=dtype)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        return NoMatch(f"{qcls.__name__} cannot take this module: {e}")
    ctx.set_module(qmod)
    ctx.kernel = _DYNAMIC_KERNELS.get((type(mod), dtype), f"{qcls.__module__}.{qcls.__name__}")
    return ctx.gm.graph.call_module(ctx.node.target, tuple(ctx.node.args), dict(ctx.node.kwargs))


_DYNAMIC_MODULES: dict[type, type] = {
    nn.Linear: dyn.Linear, fused.LinearReLU: dyn.LinearReLU, nn.LSTM: dyn.LSTM, nn.GRU: dyn.GRU,
    nn.LSTMCell: dyn.LSTMCell, nn.GRUCell: dyn.GRUCell, nn.RNNCell: dyn.RNNCell,
    nn.Embedding: emb.Embedding, nn.EmbeddingBag: emb.EmbeddingBag,
}
_DYNAMIC_KERNELS: dict[tuple[type, Any], str] = {
    **{(cls, dtype): f"quantized::linear{relu}_dynamic{fp16}"
       for cls, relu in ((nn.Linear, ""), (fused.LinearReLU, "_relu"))
       for dtype, fp16 in ((torch.qint8, ""), (torch.float16, "_fp16"))},
    **{(cls, dtype): f"torch.quantized_{cls.__name__.lower()} ({what})"
       for cls in (nn.LSTM, nn.GRU)
       for dtype, what in ((torch.qint8, "int8 dynamic"), (torch.float16, "fp16 weights"))},
    **{(cls, dtype): f"quantized::{kind}_{bits}"
       for cls, kind in ((nn.Embedding, "embedding"), (nn.EmbeddingBag, "embedding_bag"))
       for dtype, bits in ((torch.quint8, "byte"), (torch.quint4x2, "4bit"))},
}


# ---------------------------------------------------------------- checks
def _weight_qscheme(qconfig: Any) -> Any:
    if qconfig is None or qconfig.weight is None:
        return None
    return getattr(qconfig.weight(), "qscheme", None)


def check_transpose(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
                    ) -> Union[bool, NoMatch]:
    if _weight_qscheme(qconfig) in _PER_CHANNEL:
        return NoMatch("quantized::conv_transpose takes per-tensor weights only; the qconfig asks "
                       "for per-channel (use a per-tensor weight observer for ConvTranspose, as "
                       "get_default_qconfig_mapping does)")
    return True


def _float_tensor_args(node: fx.Node) -> list[fx.Node]:
    from fxquant.meta import qinfo

    return [a for a in node.args[:2] if isinstance(a, fx.Node)
            and qinfo(a).value is not None and qinfo(a).value.is_float_tensor]


def check_tensor_scalar(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
                        ) -> Union[bool, NoMatch]:
    if len(_float_tensor_args(node)) != 1 or len(node.args) != 2:
        return NoMatch("not the tensor-scalar form")
    if isinstance(node.args[1], fx.Node) or not isinstance(node.args[1], (int, float)):
        return NoMatch("the scalar is not a Python number known when tracing")
    return True


def check_two_tensors(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
                      ) -> Union[bool, NoMatch]:
    from fxquant.meta import qinfo

    tensors = _float_tensor_args(node)
    if len(tensors) != 2:
        return NoMatch("tensor-scalar form: no quantized kernel with own output qparams here")
    shapes = [qinfo(a).value.shape for a in tensors]
    if None in shapes or shapes[0] == shapes[1]:
        return True
    try:
        torch.broadcast_shapes(tuple(shapes[0]), tuple(shapes[1]))
    except RuntimeError:
        return NoMatch(f"operands of shapes {tuple(shapes[0])} and {tuple(shapes[1])} do not "
                       f"broadcast")
    # quantized::add / mul broadcast like torch.add / mul (squeeze-excite gating, layer
    # scale: (N,C,1,1) x (N,C,H,W) within half a step of float on x86, fbgemm, onednn and
    # qnnpack, torch 2.13); lowering's numeric check runs each such kernel on the recorded
    # shapes and keeps it float, with the reason, where it is wrong
    return True


# ---------------------------------------------------------------- the table
_QUANTIZED_WEIGHTED: dict[tuple[Any, type], type] = {}


def _weighted_table() -> None:
    for d in (1, 2, 3):
        conv = getattr(nn, f"Conv{d}d")
        _QUANTIZED_WEIGHTED[(None, conv)] = getattr(q, f"Conv{d}d")
        _QUANTIZED_WEIGHTED[(getattr(fused, f"ConvReLU{d}d"), conv)] = getattr(q, f"ConvReLU{d}d")
        convt = getattr(nn, f"ConvTranspose{d}d")
        _QUANTIZED_WEIGHTED[(None, convt)] = getattr(q, f"ConvTranspose{d}d")
    _QUANTIZED_WEIGHTED[(None, nn.Linear)] = q.Linear
    _QUANTIZED_WEIGHTED[(fused.LinearReLU, nn.Linear)] = q.LinearReLU


_weighted_table()
_CLAMPED = (fused.ConvClamp1d, fused.ConvClamp2d, fused.ConvClamp3d, fused.LinearClamp)
_RELU_OF = {fused.ConvClamp1d: fused.ConvReLU1d, fused.ConvClamp2d: fused.ConvReLU2d,
            fused.ConvClamp3d: fused.ConvReLU3d, fused.LinearClamp: fused.LinearReLU}

# Pooling in its function form: normalize rewrites nn.MaxPool2d / nn.AvgPool2d /
# nn.AdaptiveAvgPool2d ... into these (fxquant.ops), keeping the module's path and class.
SHARED_FUNCTIONS = (F.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.flatten)
# Ops that move or pick values without changing them: they run on the quantized tensor and
# keep its scale/zero_point. Canonical spellings only (fxquant.ops): normalize rewrites
# x.reshape / x.permute / torch.swapaxes / nn.Flatten / nn.PixelShuffle / nn.Unflatten ... into
# these; the methods listed have no torch function.
RESHAPE_FAMILY = ("contiguous", "expand", "expand_as", "repeat", "detach",
                  torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                  torch.narrow, torch.flip, torch.t, torch.movedim, operator.getitem,
                  F.pixel_shuffle, F.pixel_unshuffle, torch.unflatten)
VIEW_FAMILY = ("view", "view_as")  # lowered as reshape: quantized convs return channels-last
TUPLE_FAMILY = (torch.chunk, torch.split, torch.unbind, torch.tensor_split)
MATMUL = (torch.matmul,)  # a @ b, x.matmul, torch.bmm are normalized to it


def native_rules(clamp_needs_contiguous: bool = False) -> tuple[Rule, ...]:
    """``clamp_needs_contiguous``: the engine's clamp kernels mishandle channels-last input
    (both clamp rules, this table's and activations', then make their input contiguous)."""
    rules = [
        Rule("linear", Op(nn.Linear), WEIGHTED, "quantized::linear", lower_weighted),
        Rule("linear_relu", Op(fused.LinearReLU), WEIGHTED, "quantized::linear_relu",
             lower_weighted),
        Rule("linear_bn", Op(fused.LinearBn1d), WEIGHTED, "quantized::linear",
             lower_weighted, notes="QAT: BatchNorm folded into the weights at convert"),
        Rule("linear_clamp", Op(fused.LinearClamp), WEIGHTED, "quantized::linear(_relu)",
             lower_weighted, notes="ReLU6/Hardtanh/clamp bound folded into the output qparams"),
    ]
    for d in (1, 2, 3):
        rules += [
            Rule(f"conv{d}d", Op(getattr(nn, f"Conv{d}d")), WEIGHTED, f"quantized::conv{d}d",
                 lower_weighted),
            Rule(f"conv{d}d_relu", Op(getattr(fused, f"ConvReLU{d}d")), WEIGHTED,
                 f"quantized::conv{d}d_relu", lower_weighted),
            Rule(f"conv{d}d_bn", Op(getattr(fused, f"ConvBn{d}d")), WEIGHTED,
                 f"quantized::conv{d}d", lower_weighted,
                 notes="QAT: BatchNorm folded into the weights at convert"),
            Rule(f"conv{d}d_bn_relu", Op(getattr(fused, f"ConvBnReLU{d}d")), WEIGHTED,
                 f"quantized::conv{d}d_relu", lower_weighted,
                 notes="QAT: BatchNorm folded into the weights at convert"),
            Rule(f"conv{d}d_clamp", Op(getattr(fused, f"ConvClamp{d}d")), WEIGHTED,
                 f"quantized::conv{d}d(_relu)", lower_weighted,
                 notes="ReLU6/Hardtanh/clamp bound folded into the output qparams"),
            Rule(f"conv_transpose{d}d", Op(getattr(nn, f"ConvTranspose{d}d")), WEIGHTED,
                 f"quantized::conv_transpose{d}d", lower_weighted, check=check_transpose),
        ]
    for d in (2, 3):
        rules += [
            Rule(f"batch_norm{d}d", Op(getattr(nn, f"BatchNorm{d}d")), OWN,
                 f"quantized::batch_norm{d}d", lower_batch_norm),
            Rule(f"bn{d}d_relu", Op(getattr(fused, f"BNReLU{d}d")), OWN,
                 f"quantized::batch_norm{d}d_relu", lower_batch_norm),
        ]
    rules += [
        Rule("add", Op(torch.add), OWN, "quantized::add",
             lower_binary(torch.ops.quantized.add, torch.ops.quantized.add_relu),
             inputs="tensors", check=check_two_tensors),
        Rule("mul", Op(torch.mul), OWN, "quantized::mul",
             lower_binary(torch.ops.quantized.mul, torch.ops.quantized.mul_relu),
             inputs="tensors", check=check_two_tensors),
        Rule("add_scalar", Op(torch.add), SHARED, "quantized::add_scalar",
             lower_scalar(torch.ops.quantized.add_scalar), check=check_tensor_scalar,
             notes="output qparams derived by the kernel from the input's"),
        Rule("mul_scalar", Op(torch.mul), SHARED, "quantized::mul_scalar",
             lower_scalar(torch.ops.quantized.mul_scalar), check=check_tensor_scalar,
             notes="output qparams derived by the kernel from the input's"),
        Rule("cat", Op(torch.cat, torch.stack), SHARED_ALL, "cat of quantized tensors",
             lower_shared_list, inputs="tensors",
             notes="inputs and output share one observer: no data goes through float"),
        Rule("matmul", Op(*MATMUL), OWN, "quantized::matmul", lower_matmul, inputs="tensors"),
        Rule("reshape_family", Op(*RESHAPE_FAMILY), SHARED, "same op on the quantized tensor",
             lower_same_op),
        Rule("view", Op(*VIEW_FAMILY), SHARED, "reshape on the quantized tensor",
             lower_view_as_reshape),
        Rule("mean", Op(torch.mean), SHARED, "mean on the quantized tensor", lower_mean,
             notes="keeps the input's scale/zero_point"),
        Rule("tuple_family", Op(*TUPLE_FAMILY), SHARED, "same op on the quantized tensor",
             None, notes="outputs a tuple; each item shares the input's qparams",
             multi_output=True),
        Rule("shared_function", Op(*SHARED_FUNCTIONS), SHARED, "same op on the quantized tensor",
             lower_same_op),
        Rule("clamp_family", Op(*CLAMP_FAMILY), SHARED, "same op on the quantized tensor",
             lower_same_op_contiguous if clamp_needs_contiguous else lower_same_op),
    ]
    rules = [_alt_engine_fallback(r) for r in rules]
    # never picked by annotate (its op check declines): the root of a group that convert's
    # fuse_sums formed names it
    rules.append(Rule("conv2d_add", Op(torch.add, F.relu, check=_never), OWN,
                      "onednn::qconv2d_pointwise.binary (conv + sum)", lower_conv_add,
                      notes="convert_fx(..., fuse_sums=True): conv + residual add (+ ReLU), "
                            "rounded once"))
    rules.append(Rule("conv2d_act", Op(F.silu, F.hardswish, check=_never), OWN,
                      "onednn::qconv2d_pointwise (conv + SiLU / hardswish)", lower_conv_act,
                      notes="convert_fx(..., fuse_activations=True): conv + SiLU / hardswish, "
                            "rounded once"))
    rules += activation_rules(clamp_needs_contiguous)
    rules += dynamic_rules()
    return tuple(rules)


def _alt_engine_fallback(rule: Rule) -> Rule:
    """A weighted kernel that fails lowering's numeric check is retried with its weights
    packed for another engine, in order: onednn, exact with full-range activations where the
    CPU has VNNI / AMX and the fastest there (its weights run under the x86 / fbgemm engine),
    then qnnpack, which accumulates in int32 on every CPU. What fails: fbgemm / onednn add
    int16 pair sums on full-range activations without VNNI; fbgemm's depthwise convs (the x86
    engine's kernel for more than 100 groups) do so even on AVX512_VNNI (up to 74 steps off,
    torch 2.13: MobileNetV2's depthwise convs under the 8-bit VNNI default), and its transposed
    conv with kernel 2, stride 2 is wrong on any CPU. Each alternative passes the same check
    or is refused. Not 3-d convs: qnnpack's ConvTranspose3d is wrong, and a qnnpack-packed
    Conv3d cannot be unpacked (state_dict, TorchScript save fail: "QNNPACK only supports
    conv2d_unpack"). Lowering tries an alternative engine only where this torch build has it
    and it is not the current one."""
    if rule.lower is not lower_weighted or "3d" in rule.name or rule.alt_engines:
        return rule
    return replace(rule, alt_engines=(ONEDNN, QNNPACK))


def dynamic_rules() -> list[Rule]:
    """Dynamic (weights int8/fp16 ahead of time, activations at run time) and weight-only
    (embeddings) rules: the same for every native backend."""
    return [
        Rule("dynamic_linear", Op(nn.Linear), DYNAMIC, "quantized::linear_dynamic", lower_dynamic),
        Rule("dynamic_linear_relu", Op(fused.LinearReLU), DYNAMIC,
             "quantized::linear_relu_dynamic", lower_dynamic),
        Rule("dynamic_lstm", Op(nn.LSTM), DYNAMIC, "torch.quantized_lstm", lower_dynamic),
        Rule("dynamic_gru", Op(nn.GRU), DYNAMIC, "torch.quantized_gru", lower_dynamic),
        Rule("dynamic_lstm_cell", Op(nn.LSTMCell), DYNAMIC, "quantized lstm cell",
             lower_dynamic),
        Rule("dynamic_gru_cell", Op(nn.GRUCell), DYNAMIC, "quantized gru cell", lower_dynamic),
        Rule("dynamic_rnn_cell", Op(nn.RNNCell), DYNAMIC, "quantized rnn cell", lower_dynamic),
        Rule("embedding", Op(nn.Embedding), WEIGHT_ONLY, "quantized::embedding_byte / 4bit",
             lower_dynamic),
        Rule("embedding_bag", Op(nn.EmbeddingBag), WEIGHT_ONLY,
             "quantized::embedding_bag_byte / 4bit", lower_dynamic),
    ]

