"""fxquant's public extension API: one import for everything a user needs to add a fusion
pattern, a lowering rule, a backend composed from an existing one, a pass in the pipeline,
keep-float marks, and to ask why a pattern or rule did not match a node.

Nothing here moves code: the names are re-exported from where they live, so the library's
own tables and the user's extensions are the same kind of object (see docs/extending.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch.fx as fx
import torch.nn as nn

from fxquant.backends.base import (DYNAMIC, FIXED, OWN, SHARED, SHARED_ALL, WEIGHT_ONLY,
                                   WEIGHTED, Backend, LowerCtx, Rule)
from fxquant.backends.engine import engine as quantized_engine
from fxquant.backends.engine import supported_engines
from fxquant.backends.native import lower_same_op, lower_weighted
from fxquant.backends.reference_ops import is_dequantize, is_quantize
from fxquant.backends.registry import (get_backend, register_backend, registered_backends,
                                       unregister_backend)
from fxquant.errors import FxQuantError
from fxquant.meta import qinfo
from fxquant.options import QuantOptions
from fxquant.fusion import GroupFusion, ModuleFusion, default_group_fusions, default_module_fusions
from fxquant.patterns import Chain, Match, NoMatch, Op
from fxquant.pipeline import Pass, PassContext, PassResult
from fxquant.records import MatchFailure
from fxquant.passes import convert_pipeline, prepare_pipeline

__all__ = [
    "Backend", "Rule", "LowerCtx", "Op", "Chain", "Match", "NoMatch", "ModuleFusion",
    "GroupFusion", "WEIGHTED", "OWN", "SHARED", "SHARED_ALL", "FIXED", "DYNAMIC", "WEIGHT_ONLY",
    "register_backend", "unregister_backend", "get_backend", "registered_backends",
    "compose_backend", "default_module_fusions", "default_group_fusions", "with_fusions",
    "insert_before", "insert_after", "keep_float", "explain_match", "MatchExplanation",
    "input_qparams", "tensor_qparams", "example_shape", "lower_weighted", "lower_same_op", "is_dequantize",
    "is_quantize", "quantized_engine", "supported_engines", "Pass", "PassContext", "PassResult",
    "prepare_pipeline", "convert_pipeline", "QuantOptions", "qinfo",
]


def compose_backend(base: Union[str, Backend], *rules: Rule, name: str,
                    description: str = "") -> Backend:
    """A new backend: ``base``'s engine and rules, with ``rules`` tried first. Not registered:
    pass it to :func:`register_backend` (and :func:`unregister_backend` when done)."""
    parent = get_backend(base)
    composed = parent.extended(*rules, name=name)
    return replace(composed, description=description or f"{parent.name} + {len(rules)} user rule(s)")


def _names(pipeline: Sequence[Pass]) -> list[str]:
    return [p.name for p in pipeline]


def _index(pipeline: Sequence[Pass], name: str) -> int:
    names = _names(pipeline)
    if name not in names:
        raise FxQuantError(f"no pass named '{name}' in the pipeline",
                           hint=f"the pipeline's passes are {names}")
    return names.index(name)


def insert_before(pipeline: Sequence[Pass], name: str, pass_: Pass) -> tuple[Pass, ...]:
    """The pipeline with ``pass_`` inserted before the (first) pass named ``name``."""
    i = _index(pipeline, name)
    return tuple(pipeline[:i]) + (pass_,) + tuple(pipeline[i:])


def insert_after(pipeline: Sequence[Pass], name: str, pass_: Pass) -> tuple[Pass, ...]:
    """The pipeline with ``pass_`` inserted after the (first) pass named ``name``."""
    i = _index(pipeline, name) + 1
    return tuple(pipeline[:i]) + (pass_,) + tuple(pipeline[i:])


def with_fusions(pipeline: Sequence[Pass], module_fusions: Iterable[ModuleFusion] = (),
                 group_fusions: Iterable[GroupFusion] = ()) -> tuple[Pass, ...]:
    """The pipeline whose ``fuse`` pass also tries the given fusions (before the defaults).
    Fusions are per pipeline, not global, so two models can use different tables."""
    i = _index(pipeline, "fuse")
    fuse: Any = pipeline[i]
    new = replace(fuse, module_fusions=tuple(module_fusions) + tuple(fuse.module_fusions),
                  group_fusions=tuple(group_fusions) + tuple(fuse.group_fusions))
    return tuple(pipeline[:i]) + (new,) + tuple(pipeline[i + 1:])


def keep_float(mapping: Any, *what: Union[str, type, Any]) -> Any:
    """Mark module paths (str) or module classes / functions as float: their qconfig becomes
    None, which annotate records as the reason they stay float. Returns ``mapping``."""
    for item in what:
        if isinstance(item, str):
            mapping.set_module_name(item, None)
        else:
            mapping.set_object_type(item, None)
    return mapping


@dataclass(frozen=True)
class MatchExplanation:
    """Whether a pattern / rule matched one candidate node, and why not (``kind``: the
    :class:`~fxquant.records.MatchFailure`, None when it matched)."""

    node: str
    matched: bool
    reason: str
    kind: Optional[MatchFailure] = None

    def __str__(self) -> str:
        return f"{self.node}: {'matches' if self.matched else 'no match: ' + self.reason}"


Explainable = Union[Op, Chain, Rule, ModuleFusion, GroupFusion, Backend]


def explain_match(graph_or_gm: Union[fx.Graph, fx.GraphModule], pattern: Explainable,
                  node: Optional[Union[fx.Node, str]] = None, *, qconfig: Any = None,
                  modules: Optional[Mapping[str, nn.Module]] = None) -> list[MatchExplanation]:
    """For each candidate node (every call node, or only ``node``), whether ``pattern``
    matches and, if not, the matcher's own reason (the same NoMatch the passes record).
    A Rule or Backend is asked through ``accepts`` / ``rule_for`` with ``qconfig``."""
    graph = graph_or_gm.graph if isinstance(graph_or_gm, fx.GraphModule) else graph_or_gm
    if modules is None:
        owner = graph_or_gm if isinstance(graph_or_gm, fx.GraphModule) else graph.owning_module
        modules = dict(owner.named_modules()) if owner is not None else {}
    candidates = [n for n in graph.nodes if n.op.startswith("call_")]
    if node is not None:
        wanted = node if isinstance(node, str) else node.name
        candidates = [n for n in candidates if n.name == wanted]
        if not candidates:
            raise FxQuantError(f"no call node named '{wanted}' in the graph")
    return [_explain_one(n, pattern, modules, qconfig) for n in candidates]


def _explain_one(node: fx.Node, pattern: Explainable, modules: Mapping[str, nn.Module],
                 qconfig: Any) -> MatchExplanation:
    if isinstance(pattern, (ModuleFusion, GroupFusion)):
        pattern = pattern.pattern
    if isinstance(pattern, Chain):
        result: Any = pattern.match(node, modules)
    elif isinstance(pattern, Rule):
        result = pattern.accepts(node, modules, qconfig)
    elif isinstance(pattern, Backend):
        rule, declined = pattern.rule_for(node, modules, qconfig)
        if rule is not None:
            result = True
        elif declined:
            result = NoMatch(MatchFailure.DECLINED, declined, node.name)
        else:
            result = NoMatch(MatchFailure.NO_RULE, f"no rule of {pattern.name} is for {node.name}",
                             node.name)
    elif isinstance(pattern, Op):
        result = pattern.matches(node, modules)
    else:
        raise FxQuantError(f"explain_match cannot explain a {type(pattern).__name__}",
                           hint="pass an Op, Chain, Rule, ModuleFusion, GroupFusion or Backend")
    if result:
        return MatchExplanation(node.name, True, "")
    if isinstance(result, NoMatch):
        return MatchExplanation(node.name, False, result.reason, result.kind)
    return MatchExplanation(node.name, False, "declined (no reason given)", MatchFailure.DECLINED)


def input_qparams(ctx: LowerCtx, key: Any = 0) -> Optional[tuple[float, int, Any]]:
    """(scale, zero_point, dtype) of the quantized tensor feeding input ``key`` of a lowering,
    or None when only a kernel knows them at run time (a lowering should then decline)."""
    return tensor_qparams(ctx.qinputs[key])


def tensor_qparams(node: fx.Node) -> Optional[tuple[float, int, Any]]:
    """(scale, zero_point, dtype) of the quantized tensor ``node`` produces (a quantize node,
    or a kernel lowered earlier), or None when only a kernel knows them at run time. For a
    fused group's other operand: ``tensor_qparams(dequantize_node.args[0])``."""
    from fxquant.backends.reference_ops import is_quantize, quantize_qparams
    from fxquant.meta import qinfo

    if is_quantize(node):
        return quantize_qparams(node)
    known = qinfo(node).qparams
    return (known["scale"], known["zero_point"], known["dtype"]) if known else None


def example_shape(node: Any) -> Optional[tuple[int, ...]]:
    """The shape of the tensor ``node`` produced when prepare ran the example inputs (a
    quantize / dequantize node: its tensor's), or None when unknown or not one tensor. A
    lowering checks with it what its kernel needs (same-shaped operands, no broadcasting)."""
    from fxquant.meta import qinfo_or_none

    if not isinstance(node, fx.Node):
        return None
    info = qinfo_or_none(node)
    value = info.value if info is not None else None
    if value is None or value.kind != "tensor" or value.shape is None:
        return None
    return tuple(value.shape)
