"""The tracer: torch.fx symbolic trace with leaf-module rules, stack traces and debug handles.

When fx cannot trace a model, :class:`TraceFailed` says where: the submodule whose forward was
running (the tracer's innermost module call), the user's source line (the innermost frame of
the traceback outside torch and fxquant), the cause in words, and the fix that applies there
(``concrete_args`` / ``torch.fx.wrap`` for the root forward, ``leaf_names`` for a submodule,
``torch.fx.wrap('fn')`` for a helper function). :mod:`fxquant.fallback` uses the same facts to
retry with that submodule as a leaf.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import linecache
import os
import sysconfig
import traceback
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.errors import FxQuantError
from fxquant.meta import module_path_of, qinfo, source_line


@dataclass(frozen=True)
class TraceConfig:
    """Which modules the tracer keeps as opaque calls (leaves) instead of tracing through.

    ``leaf_classes`` / ``leaf_names``: user modules kept as one call (their forward may do
    anything, e.g. data-dependent control flow). Such calls stay float unless a backend rule
    knows the class. ``leaf_names`` are paths from the user's root; ``prefix`` is the path of
    the module being traced when it is a submodule traced on its own (fallback).
    """

    leaf_classes: tuple[type, ...] = ()
    leaf_names: tuple[str, ...] = ()
    concrete_args: Optional[dict[str, Any]] = None
    prefix: str = ""


def join_path(prefix: str, name: str) -> str:
    """``prefix.name`` without stray dots ("" is the root)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


class QuantTracer(fx.Tracer):
    def __init__(self, config: Optional[TraceConfig] = None) -> None:
        super().__init__()
        self.config = config or TraceConfig()  # no config: re-tracing generated code on load
        self.record_stack_traces = True
        self.failed_module: Optional[str] = None  # innermost module call an exception left

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        full = join_path(self.config.prefix, module_qualified_name)
        if isinstance(m, self.config.leaf_classes) or full in self.config.leaf_names:
            return True
        from fxquant.nn import is_fxquant_leaf

        if is_fxquant_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost call sees the exception first
                try:
                    self.failed_module = self.path_of_module(m)
                except NameError:  # a module created inside forward: blame its caller
                    pass
            raise


def is_leaf_type(m: nn.Module) -> bool:
    """A module fx never traces into (torch.nn's own modules, fxquant's modules)."""
    return QuantTracer().is_leaf_module(m, "")


def trace(model: nn.Module, config: Optional[TraceConfig] = None, *, copy_model: bool = True) -> fx.GraphModule:
    """Symbolically trace a deep copy of ``model`` (the user's object is never modified).

    Every node gets a record with its module path, the op as written, its source line and a
    debug handle (an integer that survives rewriting, for matching float and quantized nodes).
    Raises :class:`TraceFailed` when fx cannot trace it.
    """
    config = config or TraceConfig()
    root = copy.deepcopy(model) if copy_model else model
    tracer = QuantTracer(config)
    try:
        graph = tracer.trace(root, concrete_args=config.concrete_args)
    except Exception as e:  # noqa: BLE001 - re-raised with where, why and the fix
        raise trace_failure(e, tracer, root) from e
    _name_placeholders(graph, root)
    name = type(root).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = root.training
    annotate_trace_meta(gm, config.prefix)
    gm.recompile()
    return gm


def _forward_arg_names(root: nn.Module) -> list[str]:
    """forward's parameters as fx makes placeholders of them: named ones, ``*args``, ``**kw``."""
    code = inspect.unwrap(type(root).forward).__code__
    names = list(code.co_varnames[1:code.co_argcount + code.co_kwonlyargcount])
    rest = iter(code.co_varnames[code.co_argcount + code.co_kwonlyargcount:])
    if code.co_flags & inspect.CO_VARARGS:
        names.append("*" + next(rest))
    if code.co_flags & inspect.CO_VARKEYWORDS:
        names.append("**" + next(rest))
    return names


def _name_placeholders(graph: fx.Graph, root: nn.Module) -> None:
    """fx renames a placeholder fixed by ``concrete_args`` (``mask`` → ``mask_1``), and the
    generated forward then rejects ``mask=`` as a keyword: give each its parameter's name."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    try:
        names = _forward_arg_names(root)
    except (AttributeError, TypeError):  # forward is not a plain Python function
        return
    if len(names) == len(placeholders):
        for node, name in zip(placeholders, names):
            node.target = name


def annotate_trace_meta(gm: fx.GraphModule, prefix: str = "") -> None:
    """Create the record of every node: module path, original op, source line, debug handle.
    ``prefix``: the path of ``gm``'s root in the user's model (a submodule traced on its own)."""
    modules = dict(gm.named_modules())
    handle = 0
    for node in gm.graph.nodes:
        # Type annotations are not used by fxquant, and string ones (``from __future__ import
        # annotations`` in the user's file) break both torch.jit.script and pickling of the
        # generated code.
        node.type = None
        info = qinfo(node)
        info.module_path = join_path(prefix, module_path_of(node))
        info.source = source_line(node)
        if node.op == "call_module":
            info.original = type(modules[node.target])
        elif node.op in ("call_function", "call_method"):
            info.original = node.target
        if node.op.startswith("call_"):
            handle += 1
            info.debug_handle = handle


# ------------------------------------------------------------------ why a trace failed
@dataclass(frozen=True)
class FailureSite:
    """Where fx gave up: the module whose forward was running and the user's statement.

    ``scope``: "root" (the traced module's own forward), "submodule" (the forward of the
    submodule at ``module_path``), or "helper" (a function that forward called).
    """

    module_path: str
    module_type: str
    scope: str
    file: str = ""
    line: int = 0
    function: str = ""  # the Python function the statement is in
    code: str = ""
    wrappable: bool = False  # a module-level function: torch.fx.wrap('name') applies

    @property
    def location(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line}" if self.file else ""

    @property
    def source(self) -> str:
        return f"{self.location} in {self.function}: {self.code}" if self.file else ""


class TraceFailed(FxQuantError):
    """torch.fx could not trace a model: names the submodule, the source line, the cause and
    the fix that applies where the failing statement is."""

    def __init__(self, site: FailureSite, cause: str) -> None:
        self.site, self.cause = site, cause
        super().__init__(f"torch.fx could not trace {_where(site)}: {cause}", hint=_fix(site))
        self.module_path, self.source = site.module_path, site.source
        self.args = (self._format(),)


def trace_failure(e: BaseException, tracer: QuantTracer, root: nn.Module) -> TraceFailed:
    """The :class:`TraceFailed` for exception ``e`` raised while ``tracer`` traced ``root``."""
    failed = tracer.failed_module
    module = root if failed is None else root.get_submodule(failed)
    frames = _user_frames(e.__traceback__)
    path = join_path(tracer.config.prefix, failed or "")
    kind = "root" if failed is None else "submodule"
    if not frames:
        return TraceFailed(FailureSite(path, type(module).__name__, kind), describe_cause(e))
    file, line = frames[-1][0].f_code.co_filename, frames[-1][1]
    # a comprehension, generator expression or lambda belongs to the function around it
    owner = next((f for f, _ in reversed(frames) if not f.f_code.co_name.startswith("<")),
                 frames[-1][0])
    code = owner.f_code
    if not _is_method(owner):
        kind = "helper"
    fn = owner.f_globals.get(code.co_name)
    site = FailureSite(path, type(module).__name__, kind, file, line, code.co_name,
                       linecache.getline(file, line).strip(),
                       isinstance(fn, types.FunctionType) and fn.__code__ is code)
    return TraceFailed(site, describe_cause(e))


def _is_method(frame: types.FrameType) -> bool:
    """The frame runs a method of a module (its first argument, ``self`` by convention)."""
    code = frame.f_code
    return code.co_argcount > 0 and isinstance(frame.f_locals.get(code.co_varnames[0]), nn.Module)


def describe_cause(e: BaseException) -> str:
    """What went wrong, in words, followed by fx's own message (first line)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    original = f"{type(e).__name__}: {text.split('. ')[0][:160]}"
    if "cannot be iterated" in text:
        what = "iteration over a traced value (a for loop, tuple unpacking, zip(*...) or **kwargs)"
    elif "control flow" in text:
        what = "data-dependent control flow (a traced value decides an if/while/bool())"
    elif "slice indices" in text or "interpreted as an integer" in text or "__index__" in text:
        what = "a traced value used as a Python int (shape-dependent slicing, range())"
    else:
        return original
    return f"{what} ({original})"


_LIBRARY_DIRS: list[str] = []


def _library_dirs() -> list[str]:
    if not _LIBRARY_DIRS:  # torch's, fxquant's and the passes' folders (found, not imported)
        for name in ("torch", "fxquant", "fxquant.passes"):
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.origin is not None, name
            _LIBRARY_DIRS.append(os.path.dirname(os.path.abspath(spec.origin)) + os.sep)
    return _LIBRARY_DIRS


def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):  # fx's generated code, frozen modules
        return False
    path = os.path.abspath(filename)
    stdlib = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
    if path.startswith(stdlib) and "site-packages" not in path:
        return False
    return not any(path.startswith(d) for d in _library_dirs())


def _user_frames(tb: Any) -> list[tuple[types.FrameType, int]]:
    """The traceback's frames in the user's code (not torch, fxquant or the standard library),
    outermost first."""
    return [(f, line) for f, line in traceback.walk_tb(tb) if _is_user_file(f.f_code.co_filename)]


def _where(site: FailureSite) -> str:
    if site.scope == "submodule" or (site.scope == "helper" and site.module_path):
        owner = f"submodule '{site.module_path}' ({site.module_type})"
    elif site.module_path:  # a submodule traced on its own (fallback)
        owner = f"the forward of '{site.module_path}' ({site.module_type})"
    else:
        owner = f"the forward of the root module {site.module_type}"
    if site.scope == "helper":
        return f"function {site.function}() called in {owner}"
    return owner


_EAGER = ("with fallback on (the default) fxquant runs this forward eagerly and quantizes each "
          "submodule on its own")


def _fix(site: FailureSite) -> str:
    path = site.module_path
    leaf = (f"keep '{path}' as one opaque call: leaf_names=['{path}'] (or leaf_modules="
            f"[{site.module_type}]); with fallback on (the default) fxquant does this itself and "
            f"quantizes the traceable submodules inside it on their own")
    if site.scope == "helper" and site.wrappable:
        other = leaf if path else f"pass concrete_args for the arguments it depends on; {_EAGER}"
        return (f"register the function so fx records it as one call: torch.fx.wrap("
                f"'{site.function}') at the top level of {os.path.basename(site.file)} (it then "
                f"runs float); or {other}")
    if site.scope != "root" and path:
        return leaf
    return (f"the statement is in the root forward ({site.module_type}), so no submodule leaf "
            f"can help: pass concrete_args={{name: value}} for the arguments that steer it, or move "
            f"the untraceable code into a module-level function registered with torch.fx.wrap"
            f"('fn'); {_EAGER}")


class _ValueRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        qinfo(n).value = value_info(out)
        return out


def value_info(out: Any) -> "ValueInfo":
    from fxquant.meta import ValueInfo

    if isinstance(out, torch.Tensor):
        return ValueInfo("tensor", out.dtype, tuple(out.shape), "Tensor")
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return ValueInfo("tensors", out[0].dtype, None, type(out).__name__,
                         items=tuple(tuple(o.shape) for o in out))
    return ValueInfo("other", None, None, type(out).__name__)


def record_values(gm: fx.GraphModule, example_inputs: Optional[tuple[Any, ...]]) -> bool:
    """Run the traced model once on ``example_inputs`` (eval mode, no grad) and record on each
    node what it produced, so that shapes, integer tensors and Python values are never quantized.
    Returns False when no example inputs were given."""
    if example_inputs is None:
        return False
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    states = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _ValueRecorder(gm).run(*example_inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        from fxquant.validate import example_inputs_rejected  # names the node and the shapes
        raise example_inputs_rejected(gm, example_inputs, e) from e
    finally:
        for m, t in states.items():
            m.training = t
    return True
