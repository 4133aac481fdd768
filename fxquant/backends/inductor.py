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
1.1-1.4x, depthwise 3x3 / 5x5 1.3-1.9x the fp32 time), so MobileNetV3 / EfficientNet-B0 run at
1.1-1.2x fp32 eager there; the native ``quantized::`` path (fbgemm) is the faster int8 path on
such CPUs.

Compiles need a C++ compiler (``g++``); :func:`inductor_available` says whether this machine can.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.errors import FxQuantError


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


def inductor_model(model: nn.Module, fuse_post_ops: bool = True) -> nn.Module:
    """A copy of the int-representation ``model`` whose graph-level activation q/dq calls are
    ``quantized_decomposed`` ops with the scale / zero point as Python numbers (read from the
    QParams buffers): Inductor's int8 conv/linear lowerings assert float qparams, and
    freezing would make them constants anyway. Weight dequantizes (inside the int8-weight
    modules) go through the registered decompositions. ``fuse_post_ops``: also
    :func:`drop_requantize_before_post_ops`, so that activations fuse into the int8 convs
    (False keeps every rounding of the native model)."""
    import copy

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
        return isinstance(m, IntWeighted) and m.kind == "conv"

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
    integer-representation model it compiled.

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
                     skip_guards: bool = True, **options: Any) -> nn.Module:
    """``torch.compile`` (Inductor, freezing on) of ``qmodel``'s integer representation;
    compiled here on ``example_inputs`` so that a failure surfaces now, not at the first call.
    ``fuse_post_ops``: see :func:`inductor_model`; ``skip_guards``: see
    :class:`InductorModule`. ``options`` go to ``torch.compile(options=...)`` (Inductor
    config keys) over :data:`DEFAULT_OPTIONS`."""
    _require_inductor()
    register_inductor_decompositions()
    model = inductor_model(int_representation(qmodel), fuse_post_ops).eval()
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


def package(qmodel: nn.Module, example_inputs: tuple, path: str, fuse_post_ops: bool = True
            ) -> str:
    """AOTInductor: export ``qmodel``'s integer representation and compile it into a ``.pt2``
    package at ``path`` (returned); run it with :func:`load_package`. The package holds
    compiled C++ and constants, no pickled Python."""
    _require_inductor()
    register_inductor_decompositions()
    if not str(path).endswith(".pt2"):
        raise FxQuantError(f"AOTInductor packages end in .pt2, got '{path}'",
                           hint="pass a path like 'model.pt2'")
    model = inductor_model(int_representation(qmodel), fuse_post_ops).eval()
    with torch.no_grad():
        ep = torch.export.export(model, tuple(example_inputs))
        return torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                        inductor_configs={"freezing": True})


def load_package(path: str) -> Any:
    """Load a ``.pt2`` written by :func:`package`; call the result like the model."""
    import torch._inductor

    return torch._inductor.aoti_load_package(str(path))
