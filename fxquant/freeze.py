"""``fxquant.freeze(qmodel, example_inputs)``: a converted model as a frozen TorchScript module.

Why: a converted GraphModule runs its ``forward`` as Python, one interpreter dispatch per node;
on a MobileNetV2-sized int8 model that dispatch is about a quarter of the time. A frozen
TorchScript module runs the same ``quantized::*`` kernels from C++, with the packed weights and
qparams inlined as constants, and saves as a TorchScript archive (no pickled Python code).

How:

1. compile: ``torch.jit.script`` (keeps shapes and control flow general), falling back to
   ``torch.jit.trace`` on the example inputs where scripting fails (``method="auto"``);
2. ``torch.jit.freeze(..., optimize_numerics=False)``: the numeric rewrites (conv-bn / conv-add
   folding of float islands) would change float rounding, and a float island that feeds a
   quantize can then move an int8 value by one step;
3. check: the frozen module must give *identical* outputs (``torch.equal``) to ``qmodel`` on the
   example inputs and on check inputs (by default: a fresh random draw of the same shapes and,
   where ``qmodel`` accepts it, one with dimension 0 one larger, which catches a trace that baked
   a shape); it must call no Python (``prim::PythonOp``);
4. ``optimize=True`` also runs ``torch.jit.optimize_for_inference`` and keeps it only when the
   outputs stay identical (otherwise a :class:`FreezeWarning` says it was dropped).

A model that cannot be frozen raises :class:`FreezeError` naming the module (path, node, source
line) and the reason; the TorchScript message is kept in ``error.details``.

Saving: ``torch.jit.save(frozen, path)`` / ``torch.jit.load(path)``. torch re-packs every
weight at load under the engine current then (``torch.backends.quantized.engine``), so load
under the model's backend engine; a model whose modules were packed for different engines (a
kernel check chose qnnpack packing where the backend's kernel saturates) cannot come back
identical from a TorchScript file, and ``freeze`` warns naming those modules.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from fxquant.errors import ExampleInputsError, FxQuantError, FxQuantWarning, ModelModeError
from fxquant.options import options_of

__all__ = ["freeze", "FreezeError", "FreezeWarning"]

_METHODS = ("auto", "script", "trace")


class FreezeError(FxQuantError):
    """The model cannot be frozen into TorchScript (or the frozen module would compute something
    else). ``details`` holds the TorchScript message(s) in full."""

    def __init__(self, message: str, node: Optional[fx.Node] = None, hint: str = "", *,
                 module_path: str = "", details: str = "") -> None:
        super().__init__(message, node, hint=hint, module_path=module_path)
        self.details = details


class FreezeWarning(FxQuantWarning):
    """Freezing worked, with a caveat (an optimization dropped, a save/load that re-packs)."""


@dataclass
class _Failure:
    """Why one compile method did not give a usable frozen module."""

    method: str
    reason: str
    node: Optional[fx.Node] = None
    module_path: str = ""
    details: str = ""
    on_check_input: bool = False  # right on the example inputs, wrong on a check input


# ------------------------------------------------------------------------------ public API

def freeze(qmodel: nn.Module, example_inputs: Any, *, method: str = "auto",
           check_inputs: Optional[Sequence[Any]] = None,
           optimize: bool = False) -> torch.jit.ScriptModule:
    """A frozen TorchScript module computing exactly what ``qmodel`` computes.

    ``qmodel``: what ``convert_fx`` / ``quantize_dynamic_fx`` returned, in eval mode.
    ``example_inputs``: a tuple of positional inputs (a lone tensor is accepted).
    ``method``: "auto" (script, else trace), "script" or "trace".
    ``check_inputs``: input tuples to compare on besides ``example_inputs``; None draws them
    (see the module docstring); ``()`` checks the example inputs only (a fixed-shape model).
    ``optimize``: also try ``torch.jit.optimize_for_inference`` (kept only if outputs agree).
    """
    inputs = _check_args(qmodel, example_inputs, method)
    with _model_engine(qmodel), torch.no_grad():
        cases = _expected_outputs(qmodel, inputs, check_inputs)
        failures = []
        for m in (("script", "trace") if method == "auto" else (method,)):
            frozen, failure = _try_method(qmodel, inputs, m, cases)
            if failure is None:
                frozen = _maybe_optimize(frozen, cases) if optimize else frozen
                _warn_mixed_engines(qmodel)
                return frozen
            failures.append(failure)
    raise _error(qmodel, failures)


# ------------------------------------------------------------------------------ arguments

def _check_args(qmodel: Any, example_inputs: Any, method: str) -> tuple[Any, ...]:
    if not isinstance(qmodel, nn.Module):
        raise FreezeError(f"fxquant.freeze expects a torch.nn.Module, got {type(qmodel).__name__}",
                          hint="pass the model fxquant.convert_fx or quantize_dynamic_fx returned")
    if method not in _METHODS:
        raise FreezeError(f"fxquant.freeze: unknown method {method!r}",
                          hint=f"use one of {list(_METHODS)}")
    from fxquant.fallback import is_prepared, units

    converted = [u for _, u in units(qmodel) if "convert" in u.meta.get("fxquant_timings", {})]
    if is_prepared(qmodel) and not converted:
        raise FreezeError(f"{type(qmodel).__name__} is prepared, not converted",
                          hint="calibrate it and freeze what fxquant.convert_fx returns")
    if qmodel.training:
        raise ModelModeError("fxquant.freeze needs a model in eval mode (TorchScript freezing "
                             "inlines eval-mode attributes)", hint="call qmodel.eval() first")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ExampleInputsError(
            f"example_inputs must be a tuple of the model's positional inputs, got "
            f"{type(example_inputs).__name__}", hint="pass (x,) for a single input")
    return tuple(example_inputs)


@contextlib.contextmanager
def _model_engine(qmodel: nn.Module) -> Iterator[None]:
    """Run under the converted model's backend engine (non-packed kernels such as
    ``quantized::add`` follow the global engine); the current one where it names none."""
    from fxquant.backends.engine import engine, supported_engines
    from fxquant.fallback import units

    names = {getattr(options_of(u), "backend_name", None) for _, u in units(qmodel)}
    names = {n for n in names if n in supported_engines()}
    if len(names) != 1:
        yield
        return
    with engine(names.pop()):
        yield


# ------------------------------------------------------------------------------ check inputs

def _redraw(x: Any, g: torch.Generator, grow: bool) -> Any:
    """A fresh random value like ``x`` (same dtype and range), dimension 0 one larger if
    ``grow``; non-tensors are kept."""
    if not isinstance(x, torch.Tensor) or (x.dim() == 0 and grow):
        return x
    shape = list(x.shape)
    if grow:
        shape[0] += 1
    if x.is_floating_point():
        std = float(x.float().std()) if x.numel() > 1 else 1.0
        out = torch.randn(shape, generator=g) * (std or 1.0) + float(x.float().mean())
        return out.to(x.dtype)
    if x.dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if x.is_complex() or x.is_quantized or x.numel() == 0:
        return x
    lo, hi = int(x.min()), int(x.max())
    return torch.randint(lo, hi + 1, shape, generator=g).to(x.dtype)


def _default_check_inputs(inputs: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    g = torch.Generator().manual_seed(0)
    same = tuple(_redraw(x, g, False) for x in inputs)
    grown = tuple(_redraw(x, g, True) for x in inputs)
    return [same, grown]


def _expected_outputs(qmodel: nn.Module, inputs: tuple[Any, ...],
                      check_inputs: Optional[Sequence[Any]]) -> list[tuple[tuple, Any]]:
    """(inputs, qmodel's outputs) for the example and every check input qmodel runs on. Drawn
    check inputs that qmodel itself rejects (a fixed batch size) are skipped; given ones not."""
    try:
        cases = [(inputs, qmodel(*inputs))]
    except Exception as e:  # noqa: BLE001 - any failure of the user's model
        raise ExampleInputsError(f"qmodel fails on example_inputs ({_shapes(inputs)}): "
                                 f"{type(e).__name__}: {_first_line(e)}",
                                 hint="pass inputs the converted model runs on") from None
    drawn = check_inputs is None
    for extra in (_default_check_inputs(inputs) if drawn else check_inputs):
        extra = (extra,) if isinstance(extra, torch.Tensor) else tuple(extra)
        try:
            cases.append((extra, qmodel(*extra)))
        except Exception as e:  # noqa: BLE001 - any failure of the user's model
            if not drawn:
                raise ExampleInputsError(f"qmodel fails on a check input: {type(e).__name__}: "
                                         f"{_first_line(e)}") from None
    return cases


def _mismatch(frozen: Any, cases: list[tuple[tuple, Any]]) -> tuple[int, str]:
    """(-1, '') when ``frozen`` gives outputs identical to the expected ones, else the index of
    the first case that differs (0: the example inputs) and what differs."""
    for i, (inp, want) in enumerate(cases):
        where = "the example inputs" if i == 0 else f"check input {i} ({_shapes(inp)})"
        try:
            got = frozen(*inp)
        except Exception as e:  # noqa: BLE001 - the frozen module fails where qmodel ran
            return i, f"on {where} the frozen module raises {type(e).__name__}: {_first_line(e)}"
        diff = _compare(want, got)
        if diff:
            return i, f"on {where} {diff}"
    return -1, ""


def _compare(want: Any, got: Any) -> str:
    want_leaves, want_spec = pytree.tree_flatten(want)
    got_leaves, _ = pytree.tree_flatten(got)
    if len(want_leaves) != len(got_leaves):
        return f"the output structure differs ({want_spec} vs {len(got_leaves)} leaves)"
    for i, (a, b) in enumerate(zip(want_leaves, got_leaves)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"output {i} is a {type(b).__name__}, expected {type(a).__name__}"
        if not isinstance(a, torch.Tensor):
            if a != b:
                return f"output {i} is {b!r}, expected {a!r}"
            continue
        if a.dtype != b.dtype or a.shape != b.shape:
            return (f"output {i} is {b.dtype}{list(b.shape)}, expected {a.dtype}{list(a.shape)}")
        if not torch.equal(a, b):  # quantized: same qparams and integer values
            a, b = (a.dequantize(), b.dequantize()) if a.is_quantized else (a, b)
            d = (a.double() - b.double()).abs()
            return (f"output {i} differs on {int((d > 0).sum())} of {a.numel()} elements "
                    f"(max {float(d.max()):.3g})")
    return ""


def _shapes(inputs: tuple[Any, ...]) -> str:
    return ", ".join(str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                     for x in inputs)


# ------------------------------------------------------------------------------ compile + freeze

def _compile(qmodel: nn.Module, inputs: tuple[Any, ...], method: str) -> torch.jit.ScriptModule:
    if method == "script":
        with warnings.catch_warnings():  # about attributes set in __init__; harmless here
            warnings.filterwarnings("ignore", message=".*instance-level annotations",
                                    category=UserWarning)
            return torch.jit.script(qmodel)
    return torch.jit.trace(qmodel, inputs, check_trace=False)


def _try_method(qmodel: nn.Module, inputs: tuple[Any, ...], method: str,
                cases: list[tuple[tuple, Any]]) -> tuple[Any, Optional[_Failure]]:
    """(frozen module, None) or (None, why not)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            compiled = _compile(qmodel, inputs, method)
        except Exception as e:  # noqa: BLE001 - TorchScript raises many types; diagnosed below
            return None, _compile_error(qmodel, inputs, method, e)
    traced_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    for w in caught:
        if w not in traced_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        frozen = torch.jit.freeze(compiled.eval(), optimize_numerics=False)
    except Exception as e:  # noqa: BLE001 - e.g. a scripted list of packed RNN cell params
        return None, _compile_error(qmodel, inputs, method, e)
    python_op = _python_call(frozen)
    if python_op:
        return None, _diagnose(qmodel, inputs, method, python_op, str(frozen.graph))
    case, diff = _mismatch(frozen, cases)
    if diff:
        note = (f"; the trace warned: {traced_warnings[0].message} "
                f"({traced_warnings[0].filename}:{traced_warnings[0].lineno})"
                if traced_warnings else "")
        return None, _Failure(method, f"the frozen module computes something else: {diff}{note}",
                              on_check_input=case > 0)
    if traced_warnings:  # passed the checks, but a value the trace baked may differ elsewhere
        w = traced_warnings[0]
        warnings.warn(f"fxquant.freeze: the trace read a Python value from a tensor "
                      f"({w.filename}:{w.lineno}: {w.message}); the frozen module matched on "
                      f"{len(cases)} inputs but runs the example's branch / shape on every "
                      f"input", FreezeWarning, stacklevel=4)
    return frozen, None


def _python_call(frozen: torch.jit.ScriptModule) -> str:
    """A reason when the frozen graph calls back into Python (it would not save or load)."""
    for node in frozen.graph.nodes():
        if node.kind() == "prim::PythonOp":
            scope = f" (scope {node.scopeName()})" if node.scopeName() else ""
            return (f"it calls the Python function {node.pyname()!r}{scope}, which a "
                    f"TorchScript archive cannot hold")
    return ""


def _maybe_optimize(frozen: Any, cases: list[tuple[tuple, Any]]) -> Any:
    try:
        optimized = torch.jit.optimize_for_inference(frozen)
        _, diff = _mismatch(optimized, cases)
    except Exception as e:  # noqa: BLE001
        diff = f"it raised {type(e).__name__}: {_first_line(e)}"
    if not diff:
        return optimized
    warnings.warn(f"fxquant.freeze: optimize_for_inference dropped, it changes the outputs: "
                  f"{diff}", FreezeWarning, stacklevel=3)
    return frozen


# ------------------------------------------------------------------------------ diagnosis

def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _called_modules(qmodel: nn.Module) -> list[tuple[str, nn.Module, Optional[fx.Node]]]:
    """(path, module, node) of every module the converted graphs call, in graph order; the
    direct children of an eager root that is not a graph."""
    from fxquant.fallback import units

    out = []
    for path, unit in units(qmodel):
        prefix = f"{path}." if path else ""
        for node in unit.graph.nodes:
            if node.op == "call_module":
                out.append((prefix + str(node.target), unit.get_submodule(node.target), node))
    if not out:
        out = [(name, child, None) for name, child in qmodel.named_children()]
    return out


def _captured_args(qmodel: nn.Module, inputs: tuple[Any, ...],
                   modules: list[tuple[str, nn.Module, Optional[fx.Node]]]) -> dict[int, tuple]:
    """The positional inputs each module gets when ``qmodel`` runs on ``inputs`` (first call)."""
    seen: dict[int, tuple] = {}
    handles = []
    for _, mod, _ in modules:
        def hook(m: nn.Module, args: tuple, key: int = id(mod)) -> None:
            seen.setdefault(key, args)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        qmodel(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _diagnose(qmodel: nn.Module, inputs: tuple[Any, ...], method: str,
              reason: str, details: str = "") -> _Failure:
    """The first called module that fails alone as the whole model did (compile, freeze, or
    a Python call left in its graph): the culprit; else the graph's own code (``reason``)."""
    modules = _called_modules(qmodel)
    args = _captured_args(qmodel, inputs, modules) if method == "trace" else {}
    for path, mod, node in modules:
        if method == "trace" and id(mod) not in args:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frozen = torch.jit.freeze(_compile(mod, args.get(id(mod), ()), method).eval(),
                                          optimize_numerics=False)
            python_op = _python_call(frozen)
            if python_op:
                return _Failure(method, f"{type(mod).__name__}: {python_op}", node, path,
                                details=str(frozen.graph))
        except Exception as e:  # noqa: BLE001
            done = "scripted" if method == "script" else "traced"
            why = f"{type(mod).__name__} cannot be {done} and frozen: {_first_line(e)}"
            if method == "script" and hasattr(mod, "_cell_params"):
                why += (" (torch.jit.freeze cannot inline a scripted list of packed RNN "
                        "cell params; method='trace' can, and 'auto' falls back to it)")
            return _Failure(method, why, node, path, details=str(e))
    return _Failure(method, reason, details=details)


def _compile_error(qmodel: nn.Module, inputs: tuple[Any, ...], method: str,
                   error: BaseException) -> _Failure:
    return _diagnose(qmodel, inputs, method,
                     f"torch.jit.{method} + freeze failed: {_first_line(error)}", str(error))


def _error(qmodel: nn.Module, failures: list[_Failure]) -> FreezeError:
    main = next((f for f in failures if f.module_path), failures[-1])
    tried = "; ".join(f"{f.method}: {f.reason}" + (f" (module {f.module_path})"
                                                    if f.module_path else "")
                      for f in failures)
    hint = ("keep the named module out of the converted graph's code path, make it scriptable "
            "(torch.jit.script) or traceable, or run the converted GraphModule unfrozen")
    if any(f.on_check_input for f in failures):
        hint += ("; if the model only ever sees the example shapes, pass check_inputs=() "
                 "to freeze it for those shapes")
    details = "\n\n".join(f"[{f.method}] {f.details}" for f in failures if f.details)
    return FreezeError(f"fxquant.freeze: {type(qmodel).__name__} cannot be frozen ({tried})",
                       main.node, hint, module_path=main.module_path, details=details)


# ------------------------------------------------------------------------------ engines

def _packed_engines(qmodel: nn.Module) -> dict[str, str]:
    """Module path → the engine its weights are packed for (quantized and dynamic modules)."""
    out = {}
    for path, mod in qmodel.named_modules():
        eng = getattr(mod, "packed_engine", None)  # fxquant.nn.quantized
        if eng is None and callable(getattr(mod, "repack", None)):
            eng = getattr(mod, "engine", None)  # fxquant.nn.dynamic
        if isinstance(eng, str) and eng:
            out[path] = eng
    return out


def _warn_mixed_engines(qmodel: nn.Module) -> None:
    """torch.jit.load re-packs every weight under one engine: say which modules will not come
    back as they are when the model's weights are packed for more than one."""
    from fxquant.backends.engine import current_engine

    packed = _packed_engines(qmodel)
    others = {p: e for p, e in packed.items() if e != current_engine()}
    if not others:
        return
    listed = ", ".join(f"{p} ({e})" for p, e in list(others.items())[:6])
    more = f" and {len(others) - 6} more" if len(others) > 6 else ""
    warnings.warn(
        f"fxquant.freeze: the frozen module runs as qmodel does, but {listed}{more} are packed "
        f"for another engine than {current_engine()!r}; torch.jit.load re-packs every weight "
        f"under the engine current at load time, so a saved copy runs those on that engine's "
        f"kernels (outputs may differ)", FreezeWarning, stacklevel=3)
