"""Automatic fallback for models that torch.fx cannot trace.

The flow, for the root and then for every module it could not trace:

1. Trace. When fx fails inside a submodule, retry with the smallest failing submodule (the
   innermost module call the exception left) as a leaf, up to ``Flow.max_leaves`` times.
2. When a module's *own* forward fails (control flow in it, or in a helper function it calls),
   keep that module eager: it runs its own Python code, and each of its direct children goes
   through the same flow, recursively ("eager container").
3. Leaves found in step 1 are eager containers too: the traced graph calls them as one float
   op, and their traceable children are quantized on their own.

A child is traced on its own with the arguments its parent really passed: one run of the float
model on ``example_inputs`` with forward pre-hooks captures them (tensors become graph inputs;
Python constants such as ``None`` or ``False`` are fixed with ``concrete_args``, which fx
guards with an assert). A child whose arguments cannot be captured (no example inputs, values
that change between calls, containers of tensors) is not traced; its children are. Modules fx
never traces into (``nn.Linear``, ``nn.Conv2d``, ...) are wrapped in a one-call graph and need
no arguments.

Each prepared piece is an ordinary prepared GraphModule (a "unit", with ``meta["fxquant_path"]``
giving its place in the user's model and the module paths of its nodes written from the user's
root), so the qconfig mapping's module names, the reports and the decisions all read as for a
traced model. What fallback did is kept as :class:`FallbackRecord` s on the returned model
(:func:`fallback_records`) and as decisions on the leaf call nodes.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.errors import FxQuantError
from fxquant.meta import META_KEY, QNodeInfo, qinfo, record
from fxquant.records import Action
from fxquant.options import OPTIONS_KEY  # marks a prepared unit
from fxquant.trace import (FailureSite, TraceConfig, TraceFailed, annotate_trace_meta,
                           is_leaf_type, join_path, trace)

RECORDS_KEY = "fxquant_fallback"  # gm.meta key; attribute of an eager root
PATH_KEY = "fxquant_path"  # gm.meta key: the unit's place in the user's model
_CONSTANT = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class FallbackRecord:
    """One thing fallback decided about one module of the user's model.

    ``action``: "leaf" (traced as one opaque call of its parent's graph), "eager" (its forward
    runs as Python; its children are quantized on their own), "alone" (traced and prepared on
    its own), or "float" (left as it is).
    """

    module_path: str
    module_type: str
    action: str
    reason: str
    location: str = ""  # file:line of the statement fx failed on
    source: str = ""  # file:line in function: code

    def __str__(self) -> str:
        at = f" at {self.location}" if self.location else ""
        return f"{self.module_path or '(root)'} ({self.module_type}) {self.action}: {self.reason}{at}"


@dataclass(frozen=True)
class Flow:
    """What :func:`prepare_model` needs from the entry point that calls it.

    ``prepare(gm, values, config, path)`` records ``values`` (the unit's example inputs, or
    None) on the traced ``gm`` and runs the prepare pipeline; ``mapping`` resolves whether a
    leaf-type module (``nn.Linear`` ...) is quantized at all.
    """

    config: TraceConfig
    prepare: Callable[[fx.GraphModule, Optional[tuple], TraceConfig, str], fx.GraphModule]
    mapping: Any = None
    fallback: bool = True
    max_leaves: int = 64


# ------------------------------------------------------------------------ captured calls
@dataclass
class Call:
    """The arguments one module's forward got while the float model ran on example_inputs.
    ``problem``: why they cannot serve to trace it on its own ("" when they can)."""

    arguments: dict[str, Any]
    params: dict[str, inspect.Parameter]
    problem: str = ""


def capture_calls(model: nn.Module, example_inputs: tuple[Any, ...]) -> dict[str, Call]:
    """Run a copy of ``model`` (eval mode, no grad) once on ``example_inputs`` and return the
    arguments of each module's first call by module path, checked against later calls."""
    model = copy.deepcopy(model).eval()
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
        modules[id(m)] = m
    calls: dict[str, Call] = {}

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = _bind(m, args, kwargs)
        for path in paths[id(m)]:
            calls[path] = call if path not in calls else _merge(calls[path], call)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules.values()
               if type(m).forward is not nn.Module.forward]
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        raise FxQuantError(f"the float model failed on example_inputs: {type(e).__name__}: {e}",
                           hint="pass example_inputs that the float model accepts: a tuple of "
                                "positional arguments to forward") from e
    finally:
        for h in handles:
            h.remove()
    return calls


def _bind(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    try:
        sig = inspect.signature(m.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        return Call({}, {}, f"its arguments do not match forward's signature ({e})")
    bound.apply_defaults()
    params = dict(sig.parameters)
    return Call(dict(bound.arguments), params, _argument_problem(bound.arguments, params))


def _argument_problem(arguments: dict[str, Any], params: dict[str, inspect.Parameter]) -> str:
    for name, value in arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD and value:
            return f"it gets keyword arguments through **{name} ({', '.join(value)})"
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if not all(isinstance(v, torch.Tensor) for v in value):
                return f"it gets non-tensor values through *{name}"
        elif kind is not inspect.Parameter.VAR_KEYWORD \
                and not isinstance(value, (torch.Tensor, *_CONSTANT)):
            return f"argument '{name}' is a {type(value).__name__}, not a tensor or a constant"
    return ""


def _merge(first: Call, later: Call) -> Call:
    """``first``, with a problem when ``later`` passed a different constant (or tensor-ness)."""
    if first.problem or later.problem:
        return first if first.problem else replace(first, problem=later.problem)
    for name, a in first.arguments.items():
        b = later.arguments.get(name)
        tensors = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
        if tensors == (True, True):
            continue
        if type(a) is not type(b) or (not any(tensors) and a != b):
            return replace(first, problem=f"argument '{name}' changes between calls "
                                          f"({_short(a)}, then {_short(b)})")
    return first


def _short(value: Any) -> str:
    return "a tensor" if isinstance(value, torch.Tensor) else repr(value)[:40]


def _constants(call: Call) -> dict[str, Any]:
    """The Python constants of a captured call, to fix with ``concrete_args``."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {name: value for name, value in call.arguments.items()
            if call.params[name].kind not in variadic and isinstance(value, _CONSTANT)}


def _values(gm: fx.GraphModule, call: Optional[Call]) -> Optional[tuple[Any, ...]]:
    """The captured arguments in the order of ``gm``'s placeholders (for record_values)."""
    if call is None or call.problem:
        return None
    values: list[Any] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or str(node.target).startswith("**"):
            continue
        name = str(node.target)
        if name.startswith("*"):
            values.extend(call.arguments.get(name[1:], ()))
        elif name in call.arguments:
            values.append(call.arguments[name])
        else:
            return None
    return tuple(values)


# ------------------------------------------------------------------------ one-call graphs
def one_call_graph(m: nn.Module, name: str, prefix: str) -> Optional[fx.GraphModule]:
    """A graph that calls ``m`` (a module fx never traces into, e.g. nn.Linear) once with
    forward's parameters as its inputs; ``m`` keeps its attribute ``name`` and its module path
    ``prefix.name``. None when forward takes ``*args`` / ``**kwargs``."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    graph = fx.Graph()
    args: list[fx.Node] = []
    kwargs: dict[str, fx.Node] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return None
        node = graph.placeholder(p.name, default_value=p.default)
        if p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = node
        else:
            args.append(node)
    graph.output(graph.call_module(name, tuple(args), kwargs))
    holder = nn.Module()
    holder.add_module(name, m)
    gm = fx.GraphModule(holder, graph, type(m).__name__)
    gm.training = m.training
    annotate_trace_meta(gm, prefix)
    return gm


# ------------------------------------------------------------------------ the builder
class _Builder:
    """Prepares a deep copy of the user's model piece by piece (see the module docstring)."""

    def __init__(self, flow: Flow, model: nn.Module, example: Optional[tuple[Any, ...]]) -> None:
        self.flow, self.model, self.example = flow, model, example
        self.flags = {p: m.training for p, m in model.named_modules(remove_duplicate=False)}
        self.records: list[FallbackRecord] = []
        self._calls: Optional[dict[str, Call]] = None

    @property
    def calls(self) -> Optional[dict[str, Call]]:
        """Captured arguments by module path (None without example inputs); one float run."""
        if self._calls is None and self.example is not None:
            self._calls = capture_calls(self.model, self.example)
        return self._calls

    def note(self, m: nn.Module, path: str, action: str, reason: str,
             site: Optional[FailureSite] = None) -> None:
        self.records.append(FallbackRecord(path, type(m).__name__, action, reason,
                                           site.location if site else "",
                                           site.source if site else ""))

    def root(self, m: nn.Module) -> nn.Module:
        try:
            gm, failures, config = self.trace(m, "", self.flow.config)
        except TraceFailed as f:
            if not self.flow.fallback:
                raise
            return self.eager(m, "", f.cause, f.site)
        return self.finish(gm, "", self.example, failures, config)

    def module(self, m: nn.Module, path: str) -> nn.Module:
        """The prepared replacement of child ``m`` of an eager module (or ``m`` itself)."""
        if type(m).forward is nn.Module.forward:  # ModuleList, ModuleDict: no call of its own
            self.children(m, path)
            return m
        config = self.flow.config
        if isinstance(m, config.leaf_classes) or path in config.leaf_names:
            return m  # the user asked for it to stay one float call
        if is_leaf_type(m):
            return self.leaf_type(m, path)
        return self.alone(m, path)

    def children(self, m: nn.Module, path: str) -> None:
        for name, child in list(m.named_children()):
            full = join_path(path, name)
            if full not in self.flags:  # not the user's: e.g. an observer a pass put there
                continue
            new = self.module(child, full)
            if new is not child:
                setattr(m, name, new)

    def eager(self, m: nn.Module, path: str, reason: str,
              site: Optional[FailureSite] = None) -> nn.Module:
        self.note(m, path, "eager", f"forward runs eagerly, submodules quantized on their own: "
                                    f"{reason}", site)
        self.children(m, path)
        return m

    def alone(self, m: nn.Module, path: str) -> nn.Module:
        """Trace and prepare submodule ``m`` on its own, with the arguments it was called with."""
        calls = self.calls
        if calls is None:
            return self.eager(m, path, "a submodule is traced on its own only with the "
                                       "arguments it gets, and no example_inputs were given")
        call = calls.get(path)
        if call is None:
            return self.uncalled(m, path)
        if call.problem:
            return self.eager(m, path, call.problem)
        config = replace(self.flow.config, prefix=path, concrete_args=_constants(call))
        try:
            gm, failures, config = self.trace(m, path, config)
        except TraceFailed as f:
            return self.eager(m, path, f.cause, f.site)
        try:
            unit = self.finish(gm, path, _values(gm, call), failures, config)
        except FxQuantError as e:  # e.g. a pass refuses this piece: it runs as written
            return self.eager(m, path, f"preparing it on its own failed: {e.raw_message}")
        self.note(m, path, "alone", "traced and prepared on its own")
        return unit

    def leaf_type(self, m: nn.Module, path: str) -> nn.Module:
        """A module fx never traces into: quantized through a one-call graph when it has
        weights and the qconfig mapping gives it a qconfig."""
        if next(m.parameters(), None) is None:
            return m  # nothing of its own to quantize: it runs float between its neighbours
        mapping = self.flow.mapping
        if mapping is not None and mapping.resolve(path, type(m))[0] is None:
            return m
        calls = self.calls
        call = calls.get(path) if calls is not None else None
        if calls is not None and call is None:
            return self.uncalled(m, path)
        prefix, _, name = path.rpartition(".")
        gm = one_call_graph(m, name, prefix)
        if gm is None:
            self.note(m, path, "float", "forward takes *args/**kwargs: no one-call graph")
            return m
        config = replace(self.flow.config, prefix=prefix, concrete_args=None)
        try:
            unit = self.flow.prepare(gm, _values(gm, call), config, path)
        except FxQuantError as e:  # e.g. a pass refuses this module: it runs as written
            self.note(m, path, "float", f"preparing it on its own failed: {e.raw_message}")
            return m
        self.settle(unit, prefix, path)
        return unit

    def uncalled(self, m: nn.Module, path: str) -> nn.Module:
        parent = path.rpartition(".")[0]
        calls = self.calls or {}
        if parent == "" or parent in calls:  # say it once, at the top of an uncalled subtree
            self.note(m, path, "float", "not called while the model ran on example_inputs, so "
                                        "its arguments are unknown")
        self.children(m, path)
        return m

    def trace(self, m: nn.Module, path: str, config: TraceConfig
              ) -> tuple[fx.GraphModule, list[TraceFailed], TraceConfig]:
        """Trace ``m``, retrying with each failing submodule as a leaf; raises TraceFailed when
        ``m``'s own forward fails (or fallback is off)."""
        failures: list[TraceFailed] = []
        while True:
            try:
                return trace(m, config), failures, config
            except TraceFailed as f:
                leaf = f.site.module_path
                if not self.flow.fallback or leaf == path or leaf in config.leaf_names \
                        or len(failures) >= self.flow.max_leaves:
                    raise
                failures.append(f)
                config = replace(config, leaf_names=(*config.leaf_names, leaf))

    def finish(self, gm: fx.GraphModule, path: str, values: Optional[tuple[Any, ...]],
               failures: list[TraceFailed], config: TraceConfig) -> fx.GraphModule:
        """Prepare a traced unit; then quantize the children of its fallback leaves."""
        leaves = {f.site.module_path: f for f in failures}
        for node in _leaf_nodes(gm, leaves):
            f = leaves[qinfo(node).module_path]
            record(node, "trace", Action.LEAF, f"{f.cause} at {f.site.location or '?'}")
        for f in failures:
            module = gm.get_submodule(f.site.module_path[len(path):].lstrip("."))
            self.note(module, f.site.module_path, "leaf", f.cause, f.site)
        unit = self.flow.prepare(gm, values, config, path)
        self.settle(unit, path, path)
        done: set[int] = set()
        for node in _leaf_nodes(unit, leaves):
            leaf = unit.get_submodule(str(node.target))
            if id(leaf) not in done:
                done.add(id(leaf))
                self.children(leaf, qinfo(node).module_path)
            inner = [name for name, c in leaf.named_modules() if is_unit(c)]
            record(node, "fallback", Action.QUANTIZE_CHILDREN,
                   f"quantized on their own: {', '.join(inner)}" if inner
                   else "no submodule of it could be quantized on its own")
        return unit

    def settle(self, unit: fx.GraphModule, prefix: str, path: str) -> None:
        """Mark the unit and give every module in it the train/eval flag the user's had."""
        unit.meta[PATH_KEY] = path
        unit.train(self.flags.get(path, unit.training))
        for name, sub in unit.named_modules():
            full = join_path(prefix, name)
            if name and full in self.flags:
                sub.training = self.flags[full]


def _leaf_nodes(gm: fx.GraphModule, leaves: dict[str, Any]) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and qinfo(n).module_path in leaves]


# ------------------------------------------------------------------------ public helpers
def prepare_model(model: nn.Module, example_inputs: Optional[tuple[Any, ...]],
                  flow: Flow) -> nn.Module:
    """Prepare a deep copy of ``model`` with fallback (see the module docstring). Returns a
    prepared GraphModule when the root traces (perhaps with leaves), else a copy of the user's
    root whose children are prepared pieces. The user's model is not modified."""
    builder = _Builder(flow, model, example_inputs)
    out = builder.root(copy.deepcopy(model))
    set_records(out, builder.records)
    return out


def is_unit(m: Any) -> bool:
    """A GraphModule prepared (or converted) by fxquant."""
    return isinstance(m, fx.GraphModule) and OPTIONS_KEY in m.meta


def is_prepared(model: Any) -> bool:
    """Prepared by fxquant: a unit, or an eager root that fallback produced."""
    return is_unit(model) or (isinstance(model, nn.Module) and RECORDS_KEY in vars(model))


def set_records(model: nn.Module, records: list[FallbackRecord]) -> None:
    if isinstance(model, fx.GraphModule):
        model.meta[RECORDS_KEY] = list(records)
    else:
        vars(model)[RECORDS_KEY] = list(records)


def fallback_records(model: nn.Module) -> list[FallbackRecord]:
    """What fallback decided while preparing ``model`` (prepared or converted): one
    :class:`FallbackRecord` per leaf, eager module, module prepared on its own, or module left
    float. Empty when the model traced as it is."""
    if isinstance(model, fx.GraphModule):
        return list(model.meta.get(RECORDS_KEY, ()))
    return list(vars(model).get(RECORDS_KEY, ()))


def units(model: nn.Module) -> Iterator[tuple[str, fx.GraphModule]]:
    """(module path in the user's model, GraphModule) of every prepared or converted piece of
    ``model``, outermost first; a model that traced whole is one unit at path ""."""
    for _, m in model.named_modules():
        if is_unit(m):
            yield m.meta.get(PATH_KEY, ""), m


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy in which every GraphModule's nodes have their own decision records
    (deepcopy of a GraphModule shares ``node.meta`` values)."""
    new = copy.deepcopy(model)
    for m in new.modules():
        if isinstance(m, fx.GraphModule):
            for node in m.graph.nodes:
                if isinstance(node.meta.get(META_KEY), QNodeInfo):
                    node.meta[META_KEY] = node.meta[META_KEY].copy()
    return new


def convert_tree(model: nn.Module, convert_unit: Callable[[fx.GraphModule], nn.Module]
                 ) -> nn.Module:
    """Replace every prepared unit in ``model`` (in place; innermost first) by
    ``convert_unit(unit)``; returns the converted ``model`` (itself, unless it is a unit)."""
    for name, child in list(model.named_children()):
        new = convert_tree(child, convert_unit)
        if new is not child:
            setattr(model, name, new)
    return convert_unit(model) if is_unit(model) else model
