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

Compiles need a C++ compiler (``g++``); :func:`inductor_available` says whether this machine can.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

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


def inductor_model(model: nn.Module) -> nn.Module:
    """A copy of the int-representation ``model`` whose graph-level activation q/dq calls are
    ``quantized_decomposed`` ops with the scale / zero point as Python numbers (read from the
    QParams buffers): Inductor's int8 conv/linear lowerings assert float qparams, and
    freezing would make them constants anyway. Weight dequantizes (inside the int8-weight
    modules) go through the registered decompositions."""
    import copy

    import torch.fx as fx

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
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return model


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
    integer-representation model it compiled."""

    def __init__(self, original: nn.Module, compiled: Any) -> None:
        super().__init__()
        self.original = original
        self._compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _frozen():
            return self._compiled(*args, **kwargs)


def compile_inductor(qmodel: nn.Module, example_inputs: tuple, *, mode: Optional[str] = None,
                     dynamic: Optional[bool] = None, **options: Any) -> nn.Module:
    """``torch.compile`` (Inductor, freezing on) of ``qmodel``'s integer representation;
    compiled here on ``example_inputs`` so that a failure surfaces now, not at the first call.
    ``options`` go to ``torch.compile(options=...)`` (Inductor config keys)."""
    _require_inductor()
    register_inductor_decompositions()
    model = inductor_model(int_representation(qmodel)).eval()
    compiled = torch.compile(model, backend="inductor", mode=mode, dynamic=dynamic,
                             options=options or None)
    out = InductorModule(model, compiled)
    out(*example_inputs)
    return out


def export(qmodel: nn.Module, example_inputs: tuple) -> Any:
    """``torch.export.export`` of ``qmodel``'s integer representation (eval mode)."""
    model = int_representation(qmodel).eval()
    with torch.no_grad():
        return torch.export.export(model, tuple(example_inputs))


def package(qmodel: nn.Module, example_inputs: tuple, path: str) -> str:
    """AOTInductor: export ``qmodel``'s integer representation and compile it into a ``.pt2``
    package at ``path`` (returned); run it with :func:`load_package`. The package holds
    compiled C++ and constants, no pickled Python."""
    _require_inductor()
    register_inductor_decompositions()
    if not str(path).endswith(".pt2"):
        raise FxQuantError(f"AOTInductor packages end in .pt2, got '{path}'",
                           hint="pass a path like 'model.pt2'")
    model = inductor_model(int_representation(qmodel)).eval()
    with torch.no_grad():
        ep = torch.export.export(model, tuple(example_inputs))
        return torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                        inductor_configs={"freezing": True})


def load_package(path: str) -> Any:
    """Load a ``.pt2`` written by :func:`package`; call the result like the model."""
    import torch._inductor

    return torch._inductor.aoti_load_package(str(path))
