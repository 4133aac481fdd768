"""annotate: the policy. For every op node, from its qconfig and the backend's table, decide
which inputs are quantized (and how), whether a weight is quantized, and how the output's
qparams are chosen: own, shared with the input, or fixed. Nodes that cannot be quantized keep
a ``keep_float`` decision that says why.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.fx as fx

from fxquant.aliasing import AliasInfo
from fxquant.backends.base import (DYNAMIC, FIXED, OWN, SHARED, SHARED_ALL, WEIGHT_ONLY, WEIGHTED,
                                   Backend, Rule)
from fxquant.meta import QNodeInfo, QSpec, SharedSpec, qinfo, record
from fxquant.patterns import target_name
from fxquant.pipeline import PassContext, PassResult
from fxquant.records import TUPLE_ITEM_RULE, Action, QKind
from fxquant.slots import node_inputs

from fxquant.backends.reference_ops import FIXED_QPARAMS_DTYPE, STATIC_ACTIVATION_DTYPES

_STATIC_ACT = STATIC_ACTIVATION_DTYPES


@dataclass(frozen=True)
class Annotate:
    name: ClassVar[str] = "annotate"
    requires: ClassVar[frozenset[str]] = frozenset({"qconfig"})
    provides: ClassVar[frozenset[str]] = frozenset({"annotated"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        backend = ctx.options.backend
        modules = dict(gm.named_modules())
        stats: Counter[str] = Counter()
        groups: dict[int, Optional[str]] = {}  # group id -> rule of its interior, None if float
        fallback = _input_fallback(ctx.options.qconfig_mapping, bool(ctx.options.is_qat))
        aliases = AliasInfo.of(gm)
        for node in gm.graph.nodes:
            if not node.op.startswith("call_"):
                continue
            mutation = aliases.must_stay_as_written(node)
            if mutation is not None:
                _mark_group(qinfo(node), groups, None)
                stats[_keep_as_written(node, mutation, node in aliases.views)] += 1
            else:
                stats[_annotate_node(node, backend, modules, groups, fallback)] += 1
        at_risk = _warn_saturation(gm, backend)
        if at_risk:
            stats["saturation_risk"] = at_risk
        return PassResult(gm, False, dict(stats))


def _warn_saturation(gm: fx.GraphModule, backend: Backend) -> int:
    """Warn (once per graph, naming the nodes) where a weighted kernel gets activations wider
    than this CPU's kernels add up exactly: a user who forced 8-bit activations on an x86 CPU
    without VNNI. Convert's numeric kernel check then catches the saturating kernel; the
    warning says so, so that nothing is silent. Returns how many nodes are at risk."""
    import warnings

    from fxquant.backends.cpu import saturation_risk
    from fxquant.errors import SaturationWarning, node_location

    risky: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        info = qinfo(node)
        if info.qkind != QKind.STATIC or info.rule is None or not info.input_specs \
                or backend.rule_named(info.rule).qparams != WEIGHTED:
            continue
        obs = next(iter(info.input_specs.values())).observer()
        why = saturation_risk(backend.name, getattr(obs, "quant_min", 0), getattr(obs, "quant_max", 0))
        if why is not None:
            record(node, Annotate.name, Action.SATURATION_RISK, why)
            risky.append((node, why))
    if risky:
        where = "; ".join(f"{n.name} (module {node_location(n)[0] or '<root>'}"
                          f"{', ' + node_location(n)[1] if node_location(n)[1] else ''})"
                          for n, _ in risky[:5]) + (f" and {len(risky) - 5} more" if len(risky) > 5 else "")
        warnings.warn(f"{risky[0][1]}. Nodes: {where}. convert_fx checks every kernel on random "
                      f"inputs from this range: a saturating one is replaced by one with weights "
                      f"packed for qnnpack (exact, slower), or the op stays float; the decisions "
                      f"say which. Fix: 7-bit activations (the default here: "
                      f"get_default_qconfig_mapping({backend.name!r}) without reduce_range=False, "
                      f"or an observer with reduce_range=True).", SaturationWarning,
                      stacklevel=_user_stacklevel())
    return len(risky)


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside fxquant (the user's prepare call)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(root)
                                 and "/tests/" not in frame.f_code.co_filename
                                 or "/torch/" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _input_fallback(mapping: Any, is_qat: bool) -> QSpec:
    """How to quantize the *input* of a fixed-qparams op (sigmoid, tanh, softmax) when nothing
    upstream is observed: the mapping's global activation, never the op's own fixed range
    (which would clip an input to [0, 1] or [-1, 1])."""
    glob = getattr(mapping, "global_qconfig", None)
    if glob is not None and glob.activation is not None and not _is_fixed(glob.activation):
        return spec_of(glob.activation)
    if is_qat:
        from fxquant.fake_quantize import default_fake_quant

        return spec_of(default_fake_quant)
    from fxquant.observers import default_observer

    return spec_of(default_observer)


def _is_reuse_input(qconfig: Any) -> bool:
    from fxquant.qconfig import is_reuse_input_qconfig

    return is_reuse_input_qconfig(qconfig)


def _producer_quantized(arg: fx.Node) -> bool:
    src = qinfo(arg)
    return src.qkind == QKind.STATIC and (src.output_spec is not None
                                          or src.rule == TUPLE_ITEM_RULE)


def _apply_reuse_input(node: fx.Node, info: QNodeInfo, rule: Rule, inputs: list,
                       groups: dict[int, Optional[str]]) -> str:
    """The reuse-input qconfig (reshape & co in the default mapping): the output reuses the
    input's observer when the input is quantized, and the op stays float when it is not."""
    key, arg = inputs[0]
    if rule.qparams not in (SHARED,) or not _producer_quantized(arg):
        _mark_group(info, groups, None)
        why = "its input is float" if rule.qparams == SHARED else "the op has no shared form"
        return _keep_float(node, f"reuse-input qconfig ({info.qconfig_reason}) and {why}: "
                                 f"nothing to reuse")
    info.input_specs = {}
    info.rule, info.qkind = rule.name, QKind.STATIC
    info.output_spec = SharedSpec(key)
    record(node, Annotate.name, Action.SHARE_QPARAMS,
           "reuse-input qconfig: runs on the quantized input as is and reuses its observer",
           rule=rule.name, kernel=rule.kernel)
    return "quantized"


def _is_fixed(factory: Any) -> bool:
    from fxquant.observers import factory_parts

    cls, _ = factory_parts(factory)
    return "FixedQParams" in cls.__name__


def spec_of(factory: Any) -> QSpec:
    obs = factory()
    return QSpec(dtype=obs.dtype, observer=factory, qscheme=getattr(obs, "qscheme", None),
                 is_dynamic=bool(getattr(obs, "is_dynamic", False)))


def _keep_float(node: fx.Node, reason: str) -> str:
    record(node, Annotate.name, Action.KEEP_FLOAT, reason)
    return "kept_float"


def _keep_as_written(node: fx.Node, mutation: fx.Node, view: bool) -> str:
    """A view or an in-place write in an alias class whose mutation another node reads: it
    runs on the float tensor it aliases, so that every reader sees the mutation as in eager
    mode (a quantize/dequantize pair here would be a copy the mutation never reaches)."""
    what = "a view of" if view else "writes in place to"
    return _keep_float(node, f"{what} a tensor that {mutation.name} mutates in place and other "
                             f"ops read after: runs on the float tensor as written, so that "
                             f"they see the mutation")


def _op_name(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return target_name(node.target)


def _annotate_node(node: fx.Node, backend: Backend, modules: dict,
                   groups: dict[int, Optional[str]], fallback: QSpec) -> str:
    info = qinfo(node)
    qconfig = info.qconfig
    if info.group is not None and not info.group_root and info.group in groups:
        return _keep_float(node, "interior of a fused group whose first op stays float")
    if qconfig is None:
        _mark_group(info, groups, None)
        return _keep_float(node, f"qconfig is None ({info.qconfig_reason})")
    act = spec_of(qconfig.activation)
    kind = qconfig_kind(qconfig, act)
    if kind in (DYNAMIC, WEIGHT_ONLY):
        _mark_group(info, groups, None)
        return _annotate_weights_only(node, info, backend, modules, kind)
    if _is_item_of_quantized_tuple(node):
        return _annotate_tuple_item(node, info)
    if info.value is not None and info.value.kind == "tensors":
        rule, _ = backend.rule_for(node, modules, qconfig)
        if rule is None or not rule.multi_output:
            _mark_group(info, groups, None)
            return _keep_float(node, f"produces a {info.value.python_type} of tensors; no "
                                     f"quantized kernel for {_op_name(node, modules)}")
    elif info.value is not None and info.value.kind != "tensor":
        _mark_group(info, groups, None)
        return _keep_float(node, f"produces {info.value.python_type}, not a tensor; not quantized")
    if info.value is not None and info.value.kind == "tensor" and not info.value.is_float_tensor:
        _mark_group(info, groups, None)
        return _keep_float(node, f"produces a {info.value.dtype} tensor; only float tensors are "
                                 f"quantized")
    if kind is None:
        _mark_group(info, groups, None)
        return _keep_float(node, f"activation {str(act.dtype).replace('torch.', '')}: no kernel "
                                 f"family for this qconfig on {backend.name} (static int8, "
                                 f"dynamic and weight-only are supported)")
    if info.group is not None and info.group_root and groups.get(info.group):
        return _annotate_group_root(node, info, act, groups[info.group])
    rule, declined = backend.rule_for(node, modules, qconfig)
    if rule is None:
        _mark_group(info, groups, None)
        return _keep_float(node, declined or f"no quantized kernel for {_op_name(node, modules)} "
                                             f"on {backend.name}")
    return _apply_rule(node, info, rule, act, qconfig, groups, fallback)


def qconfig_kind(qconfig: Any, act: QSpec) -> Optional[QKind]:
    """"static" (int8 activations observed ahead), "dynamic" (activations quantized at run
    time), "weight_only" (float activations, quantized weights: embeddings) or None."""
    if act.is_dynamic:
        return QKind.DYNAMIC
    if act.dtype in _STATIC_ACT:
        return QKind.STATIC
    if qconfig.weight is not None and act.dtype == torch.float32:
        weight = spec_of(qconfig.weight)
        if weight.qscheme == torch.per_channel_affine_float_qparams:
            return QKind.WEIGHT_ONLY
    return None


def _annotate_weights_only(node: fx.Node, info: QNodeInfo, backend: Backend, modules: dict,
                           kind: QKind) -> str:
    """Dynamic and weight-only ops: only the weight is quantized ahead of time; no activation
    observers."""
    rule, declined = backend.rule_for(node, modules, info.qconfig, kind=kind)
    if rule is None:
        what = "dynamic" if kind == DYNAMIC else "weight-only"
        return _keep_float(node, declined or f"no {what} kernel for {_op_name(node, modules)} on "
                                             f"{backend.name}")
    info.weight_spec = spec_of(info.qconfig.weight)
    info.rule, info.qkind = rule.name, kind
    w = info.weight_spec
    scheme = f" {str(w.qscheme).replace('torch.', '')}" if w.qscheme is not None else ""
    runtime = ("activations quantized at run time" if kind == DYNAMIC
               else "activations stay float")
    dtype = str(w.dtype).replace('torch.', '')
    record(node, Annotate.name, Action(kind.value),
           f"{rule.kernel}: weight {dtype}{scheme}, {runtime}", rule=rule.name, kernel=rule.kernel)
    return str(kind)


def _is_item_of_quantized_tuple(node: fx.Node) -> bool:
    import operator

    if not (node.op == "call_function" and node.target is operator.getitem and node.args
            and isinstance(node.args[0], fx.Node)):
        return False
    src = qinfo(node.args[0])
    return src.rule is not None and src.value is not None and src.value.kind == "tensors" \
        and bool(src.input_specs)


def _annotate_tuple_item(node: fx.Node, info: QNodeInfo) -> str:
    info.rule, info.qkind = TUPLE_ITEM_RULE, QKind.STATIC
    info.output_spec = SharedSpec(0)
    record(node, Annotate.name, Action.SHARE_QPARAMS, "item of a quantized tuple: shares the "
                                                      "qparams of the tuple's input")
    return "quantized"


def _mark_group(info: QNodeInfo, groups: dict[int, Optional[str]], rule: Optional[str]) -> None:
    if info.group is not None and not info.group_root:
        groups[info.group] = rule


def _annotate_group_root(node: fx.Node, info: QNodeInfo, act: QSpec, rule_name: str) -> str:
    info.rule, info.qkind = rule_name, QKind.STATIC
    info.output_spec = act
    record(node, Annotate.name, Action.QUANTIZE, f"output of the fused {rule_name} group: own "
           f"qparams ({str(act.dtype).replace('torch.', '')})")
    return "quantized"


def _float_tensor_inputs(node: fx.Node, mode: str) -> list[tuple[Any, fx.Node]]:
    out = []
    for key, arg in node_inputs(node, mode):
        if not isinstance(arg, fx.Node):
            continue
        value = qinfo(arg).value
        if value is None or value.is_float_tensor:
            out.append((key, arg))
    return out


def _apply_rule(node: fx.Node, info: QNodeInfo, rule: Rule, act: QSpec, qconfig: Any,
                groups: dict[int, Optional[str]], fallback: QSpec) -> str:
    inputs = _float_tensor_inputs(node, rule.inputs)
    if not inputs:
        _mark_group(info, groups, None)
        return _keep_float(node, "no float tensor input to quantize")
    if rule.qparams == WEIGHTED:
        if qconfig.weight is None:
            _mark_group(info, groups, None)
            return _keep_float(node, "qconfig has no weight observer for a weighted op")
        info.weight_spec = spec_of(qconfig.weight)
    in_spec = act
    if _is_fixed(act.observer):
        in_spec = fallback
    if _is_reuse_input(qconfig):
        return _apply_reuse_input(node, info, rule, inputs, groups)
    info.input_specs = {key: in_spec for key, _ in inputs}
    info.rule, info.qkind = rule.name, QKind.STATIC
    interior = info.group is not None and not info.group_root
    info.output_spec = None if interior or rule.multi_output else _output_spec(rule, act)
    if rule.qparams == SHARED_ALL:
        info.output_spec = SharedSpec(inputs[0][0], all_inputs=True)
    _mark_group(info, groups, rule.name)
    record(node, Annotate.name, _action(rule, interior), _reason(rule, info, interior),
           rule=rule.name, kernel=rule.kernel)
    return "quantized"


def _output_spec(rule: Rule, act: QSpec) -> Any:
    if rule.qparams == SHARED:
        return SharedSpec(0)
    if rule.qparams == FIXED and rule.fixed is not None:
        from fxquant.observers import FixedQParamsObserver

        scale, zp = rule.fixed
        factory = FixedQParamsObserver.with_args(scale=scale, zero_point=zp)
        return QSpec(FIXED_QPARAMS_DTYPE, factory, torch.per_tensor_affine, fixed=rule.fixed)
    return act


def _action(rule: Rule, interior: bool) -> Action:
    if interior:
        return Action.QUANTIZE_INPUTS
    return {SHARED: Action.SHARE_QPARAMS, SHARED_ALL: Action.SHARE_QPARAMS,
            FIXED: Action.FIXED_QPARAMS}.get(rule.qparams, Action.QUANTIZE)


def _reason(rule: Rule, info: QNodeInfo, interior: bool) -> str:
    dt = str(next(iter(info.input_specs.values())).dtype).replace("torch.", "")
    if interior:
        return f"{rule.kernel} with the op after it; inputs {dt}"
    if rule.qparams == SHARED:
        return f"runs on the {dt} input as is; output shares the input's scale/zero_point"
    if rule.qparams == SHARED_ALL:
        return (f"{rule.kernel}: every input and the output share one observer, so the "
                f"op only copies {dt} data")
    if rule.qparams == FIXED:
        return f"{rule.kernel}; output qparams fixed at scale={rule.fixed[0]}, zp={rule.fixed[1]}"
    weight = ""
    if info.weight_spec is not None:
        weight = (f", weight {str(info.weight_spec.dtype).replace('torch.', '')} "
                  f"{str(info.weight_spec.qscheme).replace('torch.', '')}")
    return f"{rule.kernel}: input {dt}{weight}, own output qparams"
