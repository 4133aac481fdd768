"""The quantization report: one row per op of a prepared, reference or converted model, built
only from the decisions the passes recorded on the nodes."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.fx as fx

from fxquant.meta import QNodeInfo, qinfo_or_none
from fxquant.patterns import target_name

# What a node ended up as, for the report and the visualizer.
INT8 = "int8"
DYNAMIC = "dynamic"
WEIGHT_ONLY = "weight_only"
FLOAT = "float"
REFERENCE = "reference"
OBSERVER = "observer"
QUANTIZE = "quantize"
DEQUANTIZE = "dequantize"
PLANNED = "to_quantize"  # prepared model: annotated for quantization, not converted yet


@dataclass
class ReportRow:
    node: str
    module_path: str
    op: str
    status: str
    reason: str
    qconfig_rule: str = ""
    kernel: str = ""
    qparams: str = ""
    source: str = ""
    debug_handle: Optional[int] = None
    decisions: list[str] = field(default_factory=list)


def op_label(gm: fx.GraphModule, node: fx.Node) -> str:
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


def status_of(info: QNodeInfo) -> str:
    """Classify a node from its record."""
    if info.role in ("observer", "quantize", "dequantize"):
        return {"observer": OBSERVER, "quantize": QUANTIZE, "dequantize": DEQUANTIZE}[info.role]
    last = info.last()
    actions = {d.action for d in info.decisions}
    if info.kernel:
        if "dynamic" in actions:
            return DYNAMIC
        if "weight_only" in actions:
            return WEIGHT_ONLY
        return INT8
    if "keep_float" in actions:
        return FLOAT
    if "keep_reference" in actions:
        return REFERENCE
    if info.rule is not None:
        return PLANNED if last is None or last.pass_name != "convert" else REFERENCE
    return FLOAT


def _qparams_text(info: QNodeInfo) -> str:
    qp = info.qparams
    if not qp:
        return ""
    dtype = str(qp.get("dtype", "")).replace("torch.", "")
    return f"{dtype} s={qp['scale']:.4g} zp={qp['zero_point']}"


def _reason(info: QNodeInfo) -> str:
    for action in ("keep_float", "keep_reference", "lower", "quantize", "share_qparams",
                   "fixed_qparams", "dynamic", "weight_only", "observe", "share_observer",
                   "quantize_inputs", "dequantize"):
        d = info.last(action)
        if d is not None:
            return d.reason
    last = info.last()
    return last.reason if last else ""


def rows(gm: fx.GraphModule, include_qdq: bool = False) -> list[ReportRow]:
    out = []
    for node in gm.graph.nodes:
        info = qinfo_or_none(node)
        if info is None or not node.op.startswith("call_"):
            continue
        status = status_of(info)
        if not include_qdq and status in (QUANTIZE, DEQUANTIZE):
            continue
        out.append(ReportRow(
            node=node.name, module_path=info.module_path, op=op_label(gm, node), status=status,
            reason=_reason(info), qconfig_rule=info.qconfig_reason or "",
            kernel=info.kernel or "", qparams=_qparams_text(info), source=info.source or "",
            debug_handle=info.debug_handle, decisions=[str(d) for d in info.decisions]))
    return out


def summary(gm: fx.GraphModule) -> dict[str, Any]:
    rs = rows(gm, include_qdq=True)
    counts = Counter(r.status for r in rs)
    float_reasons = Counter(r.reason for r in rs if r.status == FLOAT)
    return {"counts": dict(counts), "float_reasons": dict(float_reasons)}


def _table(headers: list[str], body: list[list[str]], widths: list[int]) -> list[str]:
    def fmt(cells: list[str]) -> str:
        return "  ".join((c if len(c) <= w else c[: w - 1] + "…").ljust(w)
                         for c, w in zip(cells, widths)).rstrip()
    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in body]
    return lines


def text_report(gm: fx.GraphModule, width: int = 60) -> str:
    """A terminal table: one row per op, then how many ops run int8 / float and why."""
    rs = rows(gm)
    body = [[r.module_path or "(root)", r.op, r.status, r.kernel or r.reason, r.qparams]
            for r in rs if r.status != OBSERVER]
    lines = _table(["module", "op", "status", "kernel / reason", "output qparams"], body,
                   [24, 20, 10, width, 28])
    s = summary(gm)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s["counts"].items()))
    lines += ["", f"ops: {counts}"]
    for reason, n in sorted(s["float_reasons"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  float x{n}: {reason}")
    return "\n".join(lines)
