"""propagate_qconfig: each op node gets its QConfig from the QConfigMapping, with the rule
that chose it as the reason ("module_name 'head' → None", "object_type nn.Linear", "global")."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch.fx as fx

from fxquant.meta import qinfo, record
from fxquant.pipeline import PassContext, PassResult
from fxquant.records import Action, QConfigRule, rule_of


@dataclass(frozen=True)
class PropagateQConfig:
    name: ClassVar[str] = "propagate_qconfig"
    requires: ClassVar[frozenset[str]] = frozenset({"fused"})
    provides: ClassVar[frozenset[str]] = frozenset({"qconfig"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        mapping = ctx.options.require_mapping(self.name)
        modules = dict(gm.named_modules())
        order: Counter[tuple[str, Any]] = Counter()
        stats: Counter[str] = Counter()
        for node in gm.graph.nodes:
            if not node.op.startswith("call_"):
                continue
            info = qinfo(node)
            index: Optional[int] = None
            if node.op != "call_module":
                # counted over the op as written (x + y and torch.add are different types)
                key = (info.module_path, info.original if info.original is not None
                       else node.target)
                index = order[key]
                order[key] += 1
            qconfig, reason = _resolve(mapping, node, modules, index)
            info.qconfig, info.qconfig_reason, info.has_qconfig = qconfig, reason, True
            described = describe_qconfig(qconfig)
            # a rule that leaves the op float says so itself ("module_name 'head' → None")
            text = reason if qconfig is None and rule_of(reason) is not None \
                else f"{reason} → {described}{_range_note(mapping, qconfig)}"
            record(node, self.name, Action.ASSIGN_QCONFIG, text)
            stats["float" if qconfig is None else "quantizable"] += 1
        stats.update(_attention_defaults(gm, mapping, modules, ctx))
        return PassResult(gm, False, dict(stats))


def _attention_defaults(gm: fx.GraphModule, mapping: Any, modules: dict, ctx: PassContext
                        ) -> dict[str, int]:
    """Mask path and softmax of attention blocks float (:mod:`fxquant.attention`), where the
    node's rule is the one the backend's default mapping would pick too."""
    from fxquant.attention import apply_attention_defaults

    reference = _default_mapping(mapping, bool(ctx.options.is_qat))

    def is_default(node: fx.Node) -> bool:
        info = qinfo(node)
        if rule_of(info.qconfig_reason) is QConfigRule.GLOBAL:
            return True
        if reference is None or rule_of(info.qconfig_reason) is not QConfigRule.OBJECT_TYPE:
            return False
        from fxquant.qconfig import qconfig_equals

        qconfig, reason = _resolve(reference, node, modules, None)
        return reason == info.qconfig_reason and qconfig_equals(qconfig, info.qconfig)

    return apply_attention_defaults(gm, modules, is_default)


def _default_mapping(mapping: Any, is_qat: bool) -> Any:
    """The default (QAT) mapping of ``mapping.backend`` (the default backend's for hand-made
    mappings)."""
    from fxquant.backends.names import DEFAULT_BACKEND
    from fxquant.backends.registry import known_backends
    from fxquant.fake_quantize import get_default_qat_qconfig_mapping
    from fxquant.qconfig import get_default_qconfig_mapping

    backend = getattr(mapping, "backend", None)
    backend = backend if backend in known_backends() else DEFAULT_BACKEND
    try:
        make = get_default_qat_qconfig_mapping if is_qat else get_default_qconfig_mapping
        return make(backend)
    except Exception:  # noqa: BLE001 - no reference: only global rules count as defaults
        return None


def _range_note(mapping: Any, qconfig: Any) -> str:
    """Why the default activations are 8-bit or 7-bit on this CPU, on the nodes that use them
    (``mapping.activation_range``, set by the default mappings; README "CPU requirements"), and
    why the default dynamic weights are per-channel (``mapping.dynamic_weights``)."""
    weights = getattr(mapping, "dynamic_weights", None)
    if weights and qconfig is not None:
        return f" [{weights}]"
    chosen = getattr(mapping, "activation_range", None)
    glob = getattr(mapping, "global_qconfig", None)
    if chosen is None or qconfig is None or glob is None or qconfig.activation is not glob.activation:
        return ""
    return f" [{chosen.reason}]"


def _object_types(node: fx.Node, modules: dict) -> list[Any]:
    """The op as the user wrote it first (nn.ReLU, operator.add ...), then its canonical form."""
    info = qinfo(node)
    types = [info.original] if info.original is not None else []
    current = type(modules[node.target]) if node.op == "call_module" else node.target
    if current not in types:
        types.append(current)
    return types


def _scope_type(node: fx.Node) -> Optional[type]:
    """Class of the module whose forward runs a function/method call (None at top level, and
    for a stateless module normalize rewrote into its function: that is a module call)."""
    if node.op == "call_module" or isinstance(qinfo(node).original, type):
        return None
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    last = list(stack.values())[-1]
    return last[1] if isinstance(last, tuple) and isinstance(last[1], type) else None


def _resolve(mapping: Any, node: fx.Node, modules: dict, index: Optional[int]) -> tuple[Any, str]:
    path = qinfo(node).module_path
    scope = _scope_type(node)
    results = [mapping.resolve(path, t, index if t is qinfo(node).original else None,
                               scope_type=scope)
               for t in _object_types(node, modules)]
    for qconfig, reason in results:
        if rule_of(reason) in (QConfigRule.ORDER, QConfigRule.OBJECT_TYPE):
            return qconfig, reason
    return results[0]


def describe_qconfig(qconfig: Any) -> str:
    if qconfig is None:
        return "None (leave float)"
    act = _describe_factory(getattr(qconfig, "activation", None))
    weight = _describe_factory(getattr(qconfig, "weight", None))
    return f"QConfig(activation={act}, weight={weight})"


def _describe_factory(factory: Any) -> str:
    if factory is None:
        return "None"
    try:
        obs = factory()
    except Exception:  # noqa: BLE001 - description only
        return repr(factory)
    parts = [str(getattr(obs, "dtype", "")).replace("torch.", "")]
    qscheme = getattr(obs, "qscheme", None)
    if qscheme is not None:
        parts.append(str(qscheme).replace("torch.", ""))
    if getattr(obs, "reduce_range", False):
        parts.append("reduce_range")
    return f"{type(obs).__name__}({', '.join(p for p in parts if p)})"
