"""The tracer: torch.fx symbolic trace with leaf-module rules, stack traces and debug handles."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

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
    knows the class.
    """

    leaf_classes: tuple[type, ...] = ()
    leaf_names: tuple[str, ...] = ()
    concrete_args: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)


class QuantTracer(fx.Tracer):
    def __init__(self, config: Optional[TraceConfig] = None) -> None:
        super().__init__()
        self.config = config or TraceConfig()  # no config: re-tracing generated code on load
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.config.leaf_classes) or module_qualified_name in self.config.leaf_names:
            return True
        from fxquant.nn import is_fxquant_leaf

        if is_fxquant_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, config: Optional[TraceConfig] = None, *, copy_model: bool = True) -> fx.GraphModule:
    """Symbolically trace a deep copy of ``model`` (the user's object is never modified).

    Every node gets a record with its module path, the op as written, its source line and a
    debug handle (an integer that survives rewriting, for matching float and quantized nodes).
    """
    config = config or TraceConfig()
    root = copy.deepcopy(model) if copy_model else model
    tracer = QuantTracer(config)
    try:
        graph = tracer.trace(root, concrete_args=config.concrete_args)
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        raise FxQuantError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}",
            hint="mark the module with data-dependent control flow as a leaf "
                 "(prepare_fx(..., leaf_modules=[MyBlock]) or leaf_names=['path.to.block']), "
                 "or pass concrete_args for the arguments that steer control flow") from e
    name = type(root).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = root.training
    annotate_trace_meta(gm)
    gm.recompile()
    return gm


def annotate_trace_meta(gm: fx.GraphModule) -> None:
    """Create the record of every node: module path, original op, source line, debug handle."""
    modules = dict(gm.named_modules())
    handle = 0
    for node in gm.graph.nodes:
        # Type annotations are not used by fxquant, and string ones (``from __future__ import
        # annotations`` in the user's file) break both torch.jit.script and pickling of the
        # generated code.
        node.type = None
        info = qinfo(node)
        info.module_path = module_path_of(node)
        info.source = source_line(node)
        if node.op == "call_module":
            info.original = type(modules[node.target])
        elif node.op in ("call_function", "call_method"):
            info.original = node.target
        if node.op.startswith("call_"):
            handle += 1
            info.debug_handle = handle


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
        raise FxQuantError(f"the traced model failed on example_inputs: {type(e).__name__}: {e}",
                           hint="pass example_inputs that the float model accepts: a tuple of "
                                "positional arguments to forward") from e
    finally:
        for m, t in states.items():
            m.training = t
    return True
