"""``fxquant.compile(qmodel, example_inputs, backend="inductor")`` and AOTInductor packaging.

Inductor compiles the *integer representation* (``convert_fx(..., representation="int")``,
:mod:`fxquant.backends.integer`): plain uint8/int8 tensors and fxquant's q/dq ops. A native
converted model (quantized dtypes, ``quantized::`` kernels with prepacked weights) cannot be
frozen by Inductor, so it is refused with the fix; a prepared (calibrated) model is converted to
the int representation here.

Inductor has lowerings and int8 fusion patterns for torch's ``quantized_decomposed`` ops, not
for fxquant's. Importing Inductor registers ``quantized_decomposed`` (torch does that itself);
:func:`register_inductor_decompositions` then adds decompositions of the three ``fxquant::``
ops into their ``quantized_decomposed`` twins (same schemas, same math) to Inductor's table, so
``torch.compile`` and AOTInductor see the spelling they know. Freezing is on (weights become
constants; Inductor keeps ``dequantize_per_channel`` of int8 weights unfolded so its quantized
conv/linear patterns can match), under ``torch.no_grad()``.

What makes it fast (MobileNetV3 / EfficientNet-B0 / MobileNetV2 at batch 1, 1 thread):

* every conv / linear becomes one onednn int8 kernel (Inductor's x86 quantization passes match
  ``dequantize_per_tensor -> conv -> quantize_per_tensor`` with ``dequantize_per_channel``
  int8 weights). Its activation (hardswish, SiLU, ReLU) is fused into that kernel as a
  post-op only when it reads the conv's float output, so :func:`drop_requantize_before_post_ops`
  removes the conv output's quantize / dequantize pair there (the native kernels have no such
  post-ops and round in between);
* ops with no int8 kernel (squeeze-excite's pool, sigmoid / hardsigmoid gate and broadcasting
  mul, standalone activations) run as fused C++ loops that read and write uint8;
* the wrapper that calls the kernels is C++ (``cpp_wrapper``, :data:`DEFAULT_OPTIONS`), and
  :class:`InductorModule` skips Dynamo's per-call guard evaluation for inputs it has already
  seen pass the guards.

Where it is not fast: on CPUs without AVX-512 VNNI, onednn's int8 convs are slower than its fp32
convs (measured with ``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX-512 VNNI Xeon, 1 thread: 1x1 convs
1.1-1.4x, depthwise 3x3 / 5x5 1.3-1.9x the fp32 time), and its int8 linears too. There
``float_convs`` / ``float_linears`` = "auto" (:func:`float_conv_plan`) give those convs and
linears precomputed float weights (:class:`FloatWeighted`; 1x1 convs spelled as linears), so
Inductor runs fp32 mkldnn convs (activations still fused as post-ops) and mkl gemms between
the model's q/dq loops: the reference graph's numerics. Measured under
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` on the VNNI Xeon (224x224, batch 1,
1 thread, time / fp32 eager in the same process, benchmarks/inductor_speed.py --float-convs):
MobileNetV3 1.17x with int8 kernels -> 0.81x, EfficientNet-B0 1.26x -> 0.87x. On the VNNI
machine itself "auto" keeps the int8 kernels (0.52x / 0.57x; fp32 ones would be 0.70x /
0.74x).

Compiles need a C++ compiler (``g++``); :func:`inductor_available` says whether this machine can.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.errors import FxQuantError

log = logging.getLogger(__name__)


class InductorUnavailable(FxQuantError):
    """Inductor cannot compile on this machine (no C++ compiler, or torch without Inductor)."""


def inductor_available() -> Optional[str]:
    """None when Inductor can compile here, else why not."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # pragma: no cover - torch builds without Inductor
        return f"torch._inductor does not import: {e}"
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "no C++ compiler (g++) on PATH: Inductor's CPU backend compiles C++"
    return None


def _require_inductor() -> None:
    why = inductor_available()
    if why is not None:
        raise InductorUnavailable(f"backend='inductor' is not available: {why}",
                                  hint="install a C++ compiler (apt-get install -y g++) or use "
                                       "the int representation eagerly")


@functools.lru_cache(maxsize=None)
def register_inductor_decompositions() -> None:
    """Teach Inductor the fxquant q/dq ops as ``quantized_decomposed`` ops (once)."""
    import torch._inductor.decomposition as idecomp
    import torch._inductor.lowering  # noqa: F401 - registers torch.ops.quantized_decomposed

    import fxquant.backends.integer as integer

    qd = torch.ops.quantized_decomposed

    @idecomp.register_decomposition(integer.QUANTIZE)
    def _q(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
           quant_max: int, dtype: torch.dtype) -> torch.Tensor:
        return qd.quantize_per_tensor.tensor(x, scale.reshape(()), zero_point.reshape(()),
                                             quant_min, quant_max, dtype)

    @idecomp.register_decomposition(integer.DEQUANTIZE)
    def _dq(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
            quant_max: int, dtype: torch.dtype) -> torch.Tensor:
        return qd.dequantize_per_tensor.tensor(q, scale.reshape(()), zero_point.reshape(()),
                                               quant_min, quant_max, dtype)

    @idecomp.register_decomposition(integer.DEQUANTIZE_PER_CHANNEL)
    def _dqc(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
             quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
        return qd.dequantize_per_channel.default(q, scales, zero_points, axis, quant_min,
                                                 quant_max, dtype)


def inductor_model(model: nn.Module, fuse_post_ops: bool = True,
                   float_convs: FloatOption = False, float_linears: FloatOption = False
                   ) -> nn.Module:
    """A copy of the int-representation ``model`` whose graph-level activation q/dq calls are
    ``quantized_decomposed`` ops with the scale / zero point as Python numbers (read from the
    QParams buffers): Inductor's int8 conv/linear lowerings assert float qparams, and
    freezing would make them constants anyway. Weight dequantizes (inside the int8-weight
    modules) go through the registered decompositions. ``fuse_post_ops``: also
    :func:`drop_requantize_before_post_ops`, so that activations fuse into the int8 convs
    (False keeps every rounding of the native model). ``float_convs`` / ``float_linears``:
    whether the convs / linears get float weight constants (:func:`float_conv_plan`,
    :func:`use_float_weights`); the plans are the returned model's ``fxquant_float_convs`` /
    ``fxquant_float_linears`` attributes."""
    import fxquant.backends.integer as integer

    register_inductor_decompositions()
    qd = torch.ops.quantized_decomposed
    spelled = {integer.QUANTIZE: qd.quantize_per_tensor.default,
               integer.DEQUANTIZE: qd.dequantize_per_tensor.default}
    model = copy.deepcopy(model)
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in spelled:
                continue
            x, s, z, *rest = node.args
            if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (s, z)):
                continue
            scale = float(gm.get_buffer(str(s.target)).item())
            zero_point = int(gm.get_buffer(str(z.target)).item())
            node.target = spelled[node.target]
            node.args = (x, scale, zero_point, *rest)
        if fuse_post_ops:
            drop_requantize_before_post_ops(gm)
        gm.graph.eliminate_dead_code()
        gm.recompile()
    _apply_float_plan(model, float_convs, "conv")
    _apply_float_plan(model, float_linears, "linear")
    return model


# Float ops that Inductor's x86 int8 passes fold into a onednn conv as a unary post-op when they
# read the conv's float output directly (torch/_inductor/fx_passes/quantization.py: relu /
# hardtanh / hardswish / swish).
_CONV_UNARY_POST_OPS = frozenset({F.relu, torch.relu, F.relu6, F.hardtanh, F.hardswish, F.silu})


def drop_requantize_before_post_ops(gm: fx.GraphModule) -> int:
    """Remove the quantize -> dequantize pair between an int8-weight conv and the activation
    (ReLU, ReLU6 / hardtanh, hardswish, SiLU) that reads it, so that Inductor fuses the
    activation into the onednn int8 conv (one kernel, uint8 out) instead of running the conv
    with a uint8 output, then a separate dequantize -> activation -> quantize loop.

    Why this is allowed: the activation's own output quantization is kept, so the only rounding
    removed is the conv's (half a conv output step, below one activation output step); the
    outputs stay within one step of the native model (tests/test_inductor_fusion.py). The
    native model rounds there because its kernels have no such post-ops. Only single-use pairs
    are removed (a conv output that other ops read as integers keeps its quantization).

    Residual adds are left alone, though onednn has a ``sum`` post-op: it accumulates into the
    shortcut's uint8 tensor, which the next block reads too, so Inductor copies it first; that
    was no faster than the fused add loop (MobileNetV2 / V3, EfficientNet-B0, 224x224, batch 1)
    and the removed rounding cost agreement with the native model. Returns how many pairs were
    removed."""
    from fxquant.backends.integer import QUANTIZE, DEQUANTIZE, IntWeighted

    qd = torch.ops.quantized_decomposed
    quantizes = {QUANTIZE, qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor}
    dequantizes = {DEQUANTIZE, qd.dequantize_per_tensor.default,
                   qd.dequantize_per_tensor.tensor}

    def is_conv(n: Any) -> bool:
        if not (isinstance(n, fx.Node) and n.op == "call_module"):
            return False
        m = gm.get_submodule(str(n.target))
        return isinstance(m, (IntWeighted, FloatWeighted)) and m.kind == "conv"

    removed = 0
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target not in quantizes or not is_conv(q.args[0]):
            continue
        conv = q.args[0]
        if len(conv.users) != 1 or len(q.users) != 1:
            continue
        dq = next(iter(q.users))
        if dq.op != "call_function" or dq.target not in dequantizes or len(dq.users) != 1:
            continue
        act = next(iter(dq.users))
        if act.op != "call_function" or act.target not in _CONV_UNARY_POST_OPS or \
                not act.args or act.args[0] is not dq:
            continue
        dq.replace_all_uses_with(conv)
        gm.graph.erase_node(dq)
        gm.graph.erase_node(q)
        removed += 1
    return removed


# ------------------------------------------------------------------------ fp32 convs on AVX2
FloatOption = Union[Literal["auto"], bool]
_FLOAT_KINDS = ("conv", "linear")


@dataclass(frozen=True)
class FloatConvPlan:
    """Whether the compiled model runs its ``kind`` ops ("conv" or "linear") in fp32, why, and
    (once applied) which: ``modules`` are the paths whose int8 weight became a float constant."""

    kind: str
    enabled: bool
    reason: str
    modules: tuple[str, ...] = ()


def float_conv_plan(option: FloatOption = "auto", kind: str = "conv") -> FloatConvPlan:
    """Decide whether Inductor runs the ``kind`` ops ("conv" / "linear") in fp32: ``option``
    True / False forces it, "auto" asks the CPU policy.

    Why: Inductor turns ``dequantize -> conv / linear (dequantized int8 weight) -> quantize``
    into one onednn int8 kernel. Without int32 accumulation of uint8 x int8 products (VNNI /
    AMX), onednn's int8 kernels are slower than its fp32 ones (``ONEDNN_MAX_CPU_ISA=AVX2`` on
    an AVX-512 VNNI Xeon, 1 thread, batch 1: 1x1 convs 1.1-1.4x, depthwise 3x3 / 5x5
    1.3-1.9x the fp32 time; MobileNetV3's two head linears ~2x ``addmm``), so "auto" runs
    them in fp32 exactly where :func:`fxquant.backends.cpu.full_range_activations_safe` says
    onednn does not accumulate in int32 (AVX2-only CPUs, AVX-512 without VNNI, or an ISA cap in
    the environment). The decision is per CPU, not measured per layer."""
    name = f"float_{kind}s"
    if kind not in _FLOAT_KINDS:
        raise ValueError(f"kind must be one of {_FLOAT_KINDS}, got {kind!r}")
    if option is True or option is False:
        return FloatConvPlan(kind, option, f"forced {'on' if option else 'off'} "
                                           f"({name}={option})")
    if option != "auto":
        raise FxQuantError(f"{name} must be 'auto', True or False, got {option!r}",
                           hint=f"{name}='auto' decides from the CPU")
    from fxquant.backends.cpu import full_range_activations_safe

    if full_range_activations_safe("onednn"):
        return FloatConvPlan(kind, False, "auto: onednn accumulates uint8 x int8 in int32 on "
                                          f"this CPU (VNNI / AMX): its int8 {kind}s are the "
                                          "fast ones")
    return FloatConvPlan(kind, True, "auto: onednn has no int32 uint8 x int8 accumulation on "
                                     "this CPU (no VNNI, or an ISA cap such as "
                                     f"ONEDNN_MAX_CPU_ISA=AVX2): its int8 {kind}s are slower "
                                     f"than its fp32 {kind}s")


class FloatWeighted(nn.Module):
    """An :class:`~fxquant.backends.integer.IntWeighted` conv or linear with its weight
    dequantized once, ahead of time: ``conv(x, float_weight, bias)`` / ``linear(...)``. The
    float weight is exactly what the int8 weight's dequantize computes per call, so the
    module's outputs equal the int8-weight module's bit for bit in eager mode. What it is for:
    with no ``dequantize_per_channel`` of an int8 weight constant feeding the op, Inductor's
    int8 conv / linear patterns do not match and the op runs as a frozen fp32 (mkldnn / mkl)
    kernel, the activation q/dq around it as elementwise loops.

    ``pointwise`` 2-d convs (1x1 kernel, stride 1, no padding, one group) are spelled as a
    linear over the channels (``linear(x.permute(0, 2, 3, 1), w) .permute(0, 3, 1, 2)``):
    Inductor lowers that to an mkl gemm on its channels-last activations, where it would run
    a channels-last mkldnn 1x1 conv, 2.4x slower with AVX2 kernels (MobileNetV3 224x224,
    batch 1, ``ONEDNN_MAX_CPU_ISA=AVX2``, profiled: 10.7 ms against 4.4 ms for eager's 1x1
    convs; the model 1.06x -> 0.84x of fp32 eager time). The sum order differs from the
    conv's: float rounding only.
    """

    def __init__(self, int_op: nn.Module) -> None:
        super().__init__()
        from fxquant.backends.integer import IntWeighted

        if not (isinstance(int_op, IntWeighted) and int_op.kind in _FLOAT_KINDS):
            raise TypeError(f"FloatWeighted takes an IntWeighted conv or linear, got {int_op!r}")
        with torch.no_grad():
            self.register_buffer("weight", int_op.weight.dequantized().detach().clone())
        self.bias, self.kind, self.float_name = int_op.bias, int_op.kind, int_op.float_name
        if self.kind == "conv":
            self.dims = int_op.dims
            self.stride, self.padding = int_op.stride, int_op.padding
            self.dilation, self.groups = int_op.dilation, int_op.groups
            self.padding_mode, self.pad_twice = int_op.padding_mode, int_op.pad_twice
        self.pointwise = self.kind == "conv" and self.dims == 2 and self.groups == 1 and \
            tuple(self.weight.shape[2:]) == (1, 1) and tuple(self.stride) == (1, 1) and \
            not isinstance(self.padding, str) and tuple(self.padding) == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        if self.pointwise and x.dim() == 4:
            y = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
            return y.permute(0, 3, 1, 2)
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad_twice, mode=self.padding_mode)
            return fn(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return fn(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                  self.groups)

    def _get_name(self) -> str:
        return f"FloatWeight{self.float_name}"


def use_float_weights(model: nn.Module, kind: str = "conv") -> tuple[str, ...]:
    """Replace, in place, every int8-weight ``kind`` op of ``model`` (:class:`IntWeighted` of
    that kind, called by a graph node or inside a fused module such as ConvReLU2d) by a
    :class:`FloatWeighted`; returns their module paths. Transposed convs keep their int8
    weights. The graphs are unchanged: their nodes call the same module paths."""
    from fxquant.backends.integer import IntWeighted

    done: list[str] = []
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, IntWeighted) and child.kind == kind:
                setattr(parent, name, FloatWeighted(child))
                done.append(f"{prefix}.{name}" if prefix else name)
    return tuple(done)


def _apply_float_plan(model: nn.Module, option: FloatOption, kind: str) -> FloatConvPlan:
    plan = float_conv_plan(option, kind)
    if plan.enabled:
        plan = FloatConvPlan(kind, True, plan.reason, use_float_weights(model, kind))
        log.info("fxquant inductor: %d %s(s) run in fp32 (%s): %s", len(plan.modules), kind,
                 plan.reason, ", ".join(plan.modules))
    setattr(model, f"fxquant_float_{kind}s", plan)
    return plan


def int_representation(qmodel: nn.Module) -> nn.Module:
    """``qmodel`` as the integer representation: itself if it is one, converted if it is a
    calibrated prepared model; a native converted model is refused (its quantized weights
    cannot be turned back into the observers convert needs)."""
    from fxquant.api import convert_fx
    from fxquant.backends.integer import QUANTIZED_DTYPES, is_int_representation

    if is_int_representation(qmodel):
        return qmodel
    if _is_prepared(qmodel):
        return convert_fx(qmodel, representation="int")
    quantized = any(t.dtype in QUANTIZED_DTYPES for t in list(qmodel.buffers())) or \
        any(type(m).__module__.startswith("fxquant.nn.quantized") or
            type(m).__module__.startswith("fxquant.nn.dynamic") for m in qmodel.modules())
    what = "a native converted model (quantized dtypes, quantized:: kernels)" if quantized \
        else f"a {type(qmodel).__name__} that fxquant did not convert"
    raise FxQuantError(f"backend='inductor' compiles the integer representation; got {what}",
                       module_path=type(qmodel).__name__,
                       hint="convert with fxquant.convert_fx(prepared, representation='int') "
                            "(or pass the calibrated prepared model itself)")


def _is_prepared(model: nn.Module) -> bool:
    from fxquant.meta import qinfo_or_none
    from fxquant.records import Role

    for m in model.modules():
        graph = getattr(m, "graph", None)
        if graph is not None and any((qinfo_or_none(n) is not None and
                                      qinfo_or_none(n).role == Role.OBSERVER) for n in graph.nodes):
            return True
    return False


@contextlib.contextmanager
def _frozen() -> Iterator[None]:
    import torch._inductor.config as iconfig

    with iconfig.patch(freezing=True), torch.no_grad():
        yield


class InductorModule(nn.Module):
    """What :func:`compile_inductor` returns: calls the compiled model under ``no_grad`` with
    Inductor's freezing on (a recompile for new shapes freezes too). ``original`` is the
    integer-representation model it compiled; ``float_convs`` / ``float_linears`` (each a
    :class:`FloatConvPlan`) say which of its convs / linears run in fp32 and why.

    ``skip_guards``: a call whose inputs have the shapes, strides, dtypes, devices and
    dispatch keys of a call that already ran through Dynamo's full guard check (and with no
    autocast, no torch function / dispatch mode and the default compiler stance, as then) runs
    with Dynamo's guard evaluation skipped (``torch.compiler.set_stance(
    skip_guard_eval_unsafe=True)``). Why: the frozen graph has its weights as constants, so the
    guards Dynamo checks per call (hundreds, on every weight and qparam buffer of the module)
    can only fail on an input change, which the signature check catches; they cost ~5% of a
    MobileNetV3's int8 time at batch 1 (0.28 of 5.4 ms, 112x112). Anything else (kwargs,
    non-tensor or subclass inputs, a new signature) takes the guarded path, which recompiles
    where needed."""

    def __init__(self, original: nn.Module, compiled: Any, skip_guards: bool = True) -> None:
        super().__init__()
        self.original = original
        self.float_convs: Optional[FloatConvPlan] = getattr(original, "fxquant_float_convs", None)
        self.float_linears: Optional[FloatConvPlan] = getattr(original, "fxquant_float_linears",
                                                              None)
        self._compiled = compiled
        self.skip_guards = skip_guards
        self._checked: set[tuple] = set()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sig = _signature(args, kwargs) if self.skip_guards else None
        if sig is not None and sig in self._checked and _plain_state():
            # no recompile can happen here: Inductor's config patch (~30 us) is not needed
            with torch.no_grad(), torch.compiler.set_stance("default",
                                                            skip_guard_eval_unsafe=True):
                return self._compiled(*args)
        with _frozen():
            out = self._compiled(*args, **kwargs)
        if sig is not None and _plain_state():
            self._checked.add(sig)
        return out


def _signature(args: tuple, kwargs: dict) -> Optional[tuple]:
    """What the compiled graph's guards depend on among the inputs, or None when the inputs
    are not plain tensors only."""
    if kwargs or not args:
        return None
    sig = []
    for a in args:
        if type(a) is not torch.Tensor:
            return None
        sig.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad,
                    torch._C._dispatch_keys(a).raw_repr()))  # inference-mode tensors differ
    if len(args) > 1 and len({a.untyped_storage().data_ptr() for a in args}) < len(args):
        return None  # aliased inputs: Dynamo guards on aliasing
    return tuple(sig)


def _plain_state() -> bool:
    """No autocast, no torch function / dispatch mode, the default compiler stance: the global
    state under which a guarded call may vouch for later unguarded ones."""
    from torch._dynamo import eval_frame

    stance = getattr(eval_frame, "_stance", None)
    return (torch._C._len_torch_function_stack() == 0 and
            torch._C._len_torch_dispatch_stack() == 0 and
            not torch.is_autocast_enabled("cpu") and
            (stance is None or (getattr(stance, "stance", "default") == "default" and
                                not getattr(stance, "skip_guard_eval_unsafe", False) and
                                getattr(stance, "backend", None) is None)))


# ``cpp_wrapper``: the compiled graph's wrapper (the code that allocates buffers and calls each
# onednn kernel and fused C++ loop in turn) is C++ instead of Python. A MobileNetV3 at batch 1
# makes ~150 such calls: the Python wrapper was ~18% of its int8 time (measured 5.9 -> 4.8 ms,
# 112x112, 1 thread, AVX-512 VNNI CPU). Pass cpp_wrapper=False to get the Python wrapper back.
DEFAULT_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}


def compile_inductor(qmodel: nn.Module, example_inputs: tuple, *, mode: Optional[str] = None,
                     dynamic: Optional[bool] = None, fuse_post_ops: bool = True,
                     skip_guards: bool = True, float_convs: FloatOption = "auto",
                     float_linears: FloatOption = "auto", **options: Any) -> nn.Module:
    """``torch.compile`` (Inductor, freezing on) of ``qmodel``'s integer representation;
    compiled here on ``example_inputs`` so that a failure surfaces now, not at the first call.
    ``fuse_post_ops``: see :func:`inductor_model`; ``skip_guards``: see
    :class:`InductorModule`; ``float_convs`` / ``float_linears``: "auto" (default) runs the
    convs / linears in fp32 on CPUs where onednn's int8 kernels are the slower ones, True /
    False forces it (:func:`float_conv_plan`; the result's ``float_convs`` / ``float_linears``
    attributes record it). ``options``
    go to ``torch.compile(options=...)`` (Inductor config keys) over :data:`DEFAULT_OPTIONS`."""
    _require_inductor()
    register_inductor_decompositions()
    model = inductor_model(int_representation(qmodel), fuse_post_ops, float_convs,
                           float_linears).eval()
    compiled = torch.compile(model, backend="inductor", mode=mode, dynamic=dynamic,
                             options={**DEFAULT_OPTIONS, **options})
    out = InductorModule(model, compiled, skip_guards)
    out(*example_inputs)
    return out


def export(qmodel: nn.Module, example_inputs: tuple) -> Any:
    """``torch.export.export`` of ``qmodel``'s integer representation (eval mode)."""
    model = int_representation(qmodel).eval()
    with torch.no_grad():
        return torch.export.export(model, tuple(example_inputs))


def package(qmodel: nn.Module, example_inputs: tuple, path: str, fuse_post_ops: bool = True,
            float_convs: FloatOption = "auto", float_linears: FloatOption = "auto") -> str:
    """AOTInductor: export ``qmodel``'s integer representation and compile it into a ``.pt2``
    package at ``path`` (returned); run it with :func:`load_package`. The package holds
    compiled C++ and constants, no pickled Python. ``float_convs`` / ``float_linears`` as in
    :func:`compile_inductor`, decided on the CPU that packages (the package runs its kernels
    wherever it is loaded)."""
    _require_inductor()
    register_inductor_decompositions()
    if not str(path).endswith(".pt2"):
        raise FxQuantError(f"AOTInductor packages end in .pt2, got '{path}'",
                           hint="pass a path like 'model.pt2'")
    model = inductor_model(int_representation(qmodel), fuse_post_ops, float_convs,
                           float_linears).eval()
    with torch.no_grad():
        ep = torch.export.export(model, tuple(example_inputs))
        return torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                        inductor_configs={"freezing": True})


def load_package(path: str) -> Any:
    """Load a ``.pt2`` written by :func:`package`; call the result like the model."""
    import torch._inductor

    return torch._inductor.aoti_load_package(str(path))
