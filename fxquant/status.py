"""What each node ended up as, read from its decision record: the graph's :class:`Stage`, a
node's :class:`Status`, the tensor it produces and the reason that explains it. The report, the
visualizer, the networkx export and compare all read nodes through these functions, so none of
them depends on another (this module only reads records, never writes them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx
import torch.nn as nn

from fxquant.meta import QNodeInfo, qinfo_or_none
from fxquant.patterns import target_name
from fxquant.records import Action, QKind, Role, Stage, Status

_ROLE_STATUS = {Role.OBSERVER: Status.OBSERVER, Role.QUANTIZE: Status.QUANTIZE,
                Role.DEQUANTIZE: Status.DEQUANTIZE}
_KIND_STATUS = {QKind.DYNAMIC: Status.DYNAMIC, QKind.WEIGHT_ONLY: Status.WEIGHT_ONLY}
# the decisions whose reason explains a node, most telling first
_EXPLAINING = (Action.KEEP_FLOAT, Action.KEEP_REFERENCE, Action.LOWER, Action.QUANTIZE,
               Action.SHARE_QPARAMS, Action.FIXED_QPARAMS, Action.DYNAMIC, Action.WEIGHT_ONLY,
               Action.OBSERVE, Action.SHARE_OBSERVER, Action.QUANTIZE_INPUTS, Action.DEQUANTIZE)


@dataclass(frozen=True)
class TensorOut:
    """What flows out of a node: dtype name, and scale / zero_point when quantized."""

    dtype: str
    scale: Optional[float] = None
    zero_point: Optional[int] = None
    shape: Optional[tuple[int, ...]] = None

    def label(self) -> str:
        if self.scale is None:
            return self.dtype
        return f"{self.dtype} s={self.scale:.4g} zp={self.zero_point}"


def info_of(node: fx.Node) -> QNodeInfo:
    """The node's record, or an empty one (never stored: readers only read)."""
    return qinfo_or_none(node) or QNodeInfo()


def graph_stage(gm: fx.GraphModule) -> Stage:
    """PREPARED (observers, or annotations only), REFERENCE (q/dq around float ops),
    CONVERTED (backend kernels) or FLOAT (traced/fused, nothing to quantize)."""
    roles, kernel, rule = set(), False, False
    for node in gm.graph.nodes:
        info = qinfo_or_none(node)
        if info is None:
            continue
        roles.add(info.role)
        kernel |= bool(info.kernel)
        rule |= info.rule is not None
    if Role.OBSERVER in roles:
        return Stage.PREPARED
    if kernel:
        return Stage.CONVERTED
    if roles & {Role.QUANTIZE, Role.DEQUANTIZE}:
        return Stage.REFERENCE
    return Stage.PREPARED if rule else Stage.FLOAT


def op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """What the node runs, as a short name (module class, ``.method()``, function)."""
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(str(node.target))).__name__
        except AttributeError:
            return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return target_name(node.target)
    return node.op


def _kind(info: QNodeInfo, actions: set[Any]) -> Optional[Status]:
    kind = getattr(info, "qkind", None)
    if kind in _KIND_STATUS:
        return _KIND_STATUS[kind]
    for k, status in _KIND_STATUS.items():
        if k in actions:
            return status
    return None


def status_of(info: QNodeInfo, stage: Optional[str] = None) -> Status:
    """Classify a node from its record. ``stage`` (:func:`graph_stage`) tells a reference op
    of a converted graph from an op a prepared graph will quantize; without it the last
    decision decides."""
    if info.role in _ROLE_STATUS:
        return _ROLE_STATUS[info.role]
    actions = {d.action for d in info.decisions}
    kind = _kind(info, actions)
    if info.kernel:
        return kind or Status.INT8
    if Action.KEEP_FLOAT in actions:
        return Status.FLOAT
    if Action.KEEP_REFERENCE in actions:
        return Status.REFERENCE
    if kind is not None:
        return kind
    if info.rule is not None:
        if stage is not None:
            return Status.PLANNED if stage == Stage.PREPARED else Status.REFERENCE
        last = info.last()
        return Status.PLANNED if last is None or last.pass_name != "convert" else Status.REFERENCE
    return Status.FLOAT


def dtype_name(dtype: Any) -> str:
    """``torch.quint8`` -> ``"quint8"``; ``"?"`` when unknown."""
    return str(dtype).replace("torch.", "") if dtype is not None else "?"


def tensor_out(node: fx.Node, stage: Optional[str] = None) -> TensorOut:
    """The dtype (and qparams when quantized) of what ``node`` produces, from its record."""
    info = info_of(node)
    value = info.value
    shape = value.shape if value is not None else None
    qp = info.qparams or {}
    quantized_out = info.role == Role.QUANTIZE or (
        info.kernel and status_of(info, stage) == Status.INT8 and "scale" in qp)
    if quantized_out and "scale" in qp:
        return TensorOut(dtype_name(qp.get("dtype")), float(qp["scale"]),
                         int(qp["zero_point"]), shape)
    if info.role == Role.DEQUANTIZE:
        return TensorOut("float32", shape=shape)
    if value is None:
        return TensorOut("?")
    if value.kind == "tensor":
        return TensorOut(dtype_name(value.dtype), shape=shape)
    if value.kind == "tensors":
        return TensorOut(f"{value.python_type}[{dtype_name(value.dtype)}]")
    return TensorOut(value.python_type or "?")


def reason_of(info: QNodeInfo) -> str:
    """The reason that explains what the node became (its last telling decision)."""
    for action in _EXPLAINING:
        d = info.last(action)
        if d is not None:
            return d.reason
    last = info.last()
    return last.reason if last else ""


def core_module(module: nn.Module) -> nn.Module:
    """The conv/linear inside a fused container (or the module itself)."""
    if hasattr(module, "in_channels") or hasattr(module, "in_features"):
        return module
    if isinstance(module, nn.Sequential) and len(module):
        return core_module(module[0])
    return module
