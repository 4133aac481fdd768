"""The quantization report: one row per op of a prepared, reference or converted model, built
only from the decisions the passes recorded on the nodes (this module never writes them).

    rep = fxquant.report(quantized, float_model=model, inputs=batches)   # == report.build(...)
    print(rep.to_text())            # terminal table + summary
    rep.to_markdown()               # the same as a Markdown table
    rep.to_html("report.html")      # one self-contained file with the graph's SVG inside

With ``float_model`` and ``inputs`` every row also gets its numeric error against float
(:func:`fxquant.compare.compare`: both models run side by side, nodes matched by debug handle).
The module itself is callable: ``fxquant.report(gm, ...)`` is :func:`build`.
"""
from __future__ import annotations

import html
import math
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.meta import QNodeInfo, qinfo_or_none
from fxquant.records import STATUS_COLORS, STATUS_DESCRIPTIONS, STATUSES, Role, Stage, Status
from fxquant.status import (TensorOut, core_module, graph_stage, info_of, op_label, reason_of,
                            status_of, tensor_out)

__all__ = ["Report", "ReportRow", "TensorOut", "build", "rows", "summary", "text_report",
           "graph_stage", "status_of", "tensor_out", "info_of", "op_label", "reason_of",
           "macs_of", "core_module", "inline_svg", "STATUSES", "STATUS_COLORS",
           "STATUS_DESCRIPTIONS", "INT8", "DYNAMIC", "WEIGHT_ONLY", "PLANNED", "FLOAT",
           "REFERENCE", "OBSERVER", "QUANTIZE", "DEQUANTIZE"]

# What a node ended up as (:class:`fxquant.records.Status`), under the names this module has
# always exported.
INT8, DYNAMIC, WEIGHT_ONLY = Status.INT8, Status.DYNAMIC, Status.WEIGHT_ONLY
PLANNED, FLOAT, REFERENCE = Status.PLANNED, Status.FLOAT, Status.REFERENCE
OBSERVER, QUANTIZE, DEQUANTIZE = Status.OBSERVER, Status.QUANTIZE, Status.DEQUANTIZE

_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
_CONVT_FUNCTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@dataclass
class ReportRow:
    node: str
    module_path: str
    op: str
    status: Status
    reason: str
    qconfig_rule: str = ""
    kernel: str = ""
    qparams: str = ""
    source: str = ""
    debug_handle: Optional[int] = None
    decisions: list[str] = field(default_factory=list)
    in_dtype: str = ""
    out_dtype: str = ""
    macs: Optional[int] = None
    sqnr_db: Optional[float] = None  # end to end: this op's output vs the float model's
    local_sqnr_db: Optional[float] = None  # of the noise this op adds to what it was given
    max_abs_err: Optional[float] = None


def _first_input(node: fx.Node) -> Optional[fx.Node]:
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            return a
        if isinstance(a, (tuple, list)):
            inner = [x for x in a if isinstance(x, fx.Node)]
            if inner:
                return inner[0]
    return None


# ------------------------------------------------------------------------------------ MACs
def _is_conv_or_linear(info: QNodeInfo) -> bool:
    o = info.original
    if isinstance(o, type):
        return issubclass(o, (nn.modules.conv._ConvNd, nn.Linear))
    return o in _CONV_FUNCTIONS + _CONVT_FUNCTIONS + (F.linear,)


def _value_shape(node: Any) -> Optional[tuple[int, ...]]:
    if not isinstance(node, fx.Node):
        return None
    value = info_of(node).value
    return value.shape if value is not None and value.kind == "tensor" else None


def _prod(xs: Any) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _module_macs(module: nn.Module, in_shape: Optional[tuple], out_shape: tuple) -> Optional[int]:
    m = core_module(module)
    if hasattr(m, "in_features"):
        return _prod(out_shape) * int(m.in_features)
    if not hasattr(m, "in_channels"):
        return None
    groups = int(getattr(m, "groups", 1))
    kernel = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,)
    if "Transpose" in type(m).__name__:
        if in_shape is None:
            return None
        return _prod(in_shape) * (int(m.out_channels) // groups) * _prod(kernel)
    return _prod(out_shape) * (int(m.in_channels) // groups) * _prod(kernel)


def macs_of(gm: fx.GraphModule, node: fx.Node) -> Optional[int]:
    """Multiply-accumulates of a conv / linear node on the example inputs (from the shapes the
    tracer recorded); None for other ops or when shapes are unknown."""
    info = info_of(node)
    out_shape = _value_shape(node)
    if info.role != Role.OP or out_shape is None or not _is_conv_or_linear(info):
        return None
    in_shape = _value_shape(_first_input(node))
    if node.op == "call_module":
        try:
            return _module_macs(gm.get_submodule(str(node.target)), in_shape, out_shape)
        except AttributeError:
            return None
    w = _value_shape(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    if w is None:
        return None
    if info.original in _CONVT_FUNCTIONS:
        return _prod(in_shape or ()) * _prod(w[1:]) if in_shape else None
    return _prod(out_shape) * _prod(w[1:])


# ------------------------------------------------------------------------------------ rows
def _qparams_text(info: QNodeInfo) -> str:
    qp = info.qparams
    if not qp or "scale" not in qp:
        return ""
    dtype = str(qp.get("dtype", "")).replace("torch.", "")
    return f"{dtype} s={qp['scale']:.4g} zp={qp['zero_point']}"


def _row(gm: fx.GraphModule, node: fx.Node, info: QNodeInfo, stage: str) -> ReportRow:
    src = _first_input(node)
    return ReportRow(
        node=node.name, module_path=info.module_path, op=op_label(gm, node),
        status=status_of(info, stage), reason=reason_of(info),
        qconfig_rule=info.qconfig_reason or "", kernel=info.kernel or "",
        qparams=_qparams_text(info), source=info.source or "", debug_handle=info.debug_handle,
        decisions=[str(d) for d in info.decisions],
        in_dtype=tensor_out(src, stage).dtype if src is not None else "",
        out_dtype=tensor_out(node, stage).dtype, macs=macs_of(gm, node))


def rows(gm: fx.GraphModule, include_qdq: bool = False) -> list[ReportRow]:
    """One row per ``call_*`` node that has a record (quantize/dequantize only on request)."""
    stage = graph_stage(gm)
    out = []
    for node in gm.graph.nodes:
        info = qinfo_or_none(node)
        if info is None or not node.op.startswith("call_"):
            continue
        row = _row(gm, node, info, stage)
        if not include_qdq and row.status in (QUANTIZE, DEQUANTIZE):
            continue
        out.append(row)
    return out


_INT8_COMPUTE = (INT8, DYNAMIC)


def summary(gm: fx.GraphModule, rs: Optional[list[ReportRow]] = None) -> dict[str, Any]:
    """Counts per status, why ops stay float, and the conv/linear MACs that run int8."""
    rs = rows(gm, include_qdq=True) if rs is None else rs
    counts = Counter(r.status for r in rs)
    float_reasons = Counter(r.reason for r in rs if r.status == FLOAT)
    macs = [(r.macs, r.status) for r in rs if r.macs]
    total = sum(m for m, _ in macs)
    int8 = sum(m for m, s in macs if s in _INT8_COMPUTE)
    return {"stage": graph_stage(gm), "counts": dict(counts),
            "float_reasons": dict(float_reasons), "macs_total": total, "macs_int8": int8,
            "macs_int8_share": (int8 / total) if total else None}


# ---------------------------------------------------------------------------------- report
def _fmt_db(x: Optional[float]) -> str:
    if x is None:
        return ""
    return "inf" if math.isinf(x) else f"{x:.1f}"


def _fmt_err(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.3g}"


def _fmt_mb(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


def _fmt_macs(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


@dataclass
class Report:
    """The report of one model. ``rows`` exclude quantize/dequantize; ``summary`` counts all."""

    gm: fx.GraphModule
    rows: list[ReportRow]
    summary: dict[str, Any]
    comparison: Any = None  # fxquant.compare.Comparison when built with float model + inputs
    size_float: Optional[int] = None
    size_model: Optional[int] = None
    title: str = "fxquant report"
    # what convert's range check found (fxquant.range_check.RangeFinding), read back from the
    # range_finding decisions
    range_findings: list = field(default_factory=list)

    def op_rows(self) -> list[ReportRow]:
        """The rows a table shows: ops, not observers."""
        return [r for r in self.rows if r.status != OBSERVER]

    @property
    def has_numerics(self) -> bool:
        return self.comparison is not None

    def summary_lines(self, worst: int = 5) -> list[str]:
        s = self.summary
        ranked = sorted(s["counts"].items(), key=lambda kv: -kv[1])
        counts = ", ".join(f"{v} {k}" for k, v in ranked)
        lines = [f"stage: {s['stage']}", f"ops: {counts}"]
        for reason, n in sorted(s["float_reasons"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  float x{n}: {reason}")
        if s["macs_total"]:
            lines.append(f"conv/linear MACs int8: {100 * s['macs_int8_share']:.1f}% "
                         f"({_fmt_macs(s['macs_int8'])} of {_fmt_macs(s['macs_total'])} "
                         f"per example input)")
        if self.size_model is not None:
            size = f"model size: {_fmt_mb(self.size_model)}"
            if self.size_float:
                size = (f"model size: fp32 {_fmt_mb(self.size_float)} -> {_fmt_mb(self.size_model)}"
                        f" ({self.size_model / self.size_float:.2f}x)")
            lines.append(size)
        lines += self._numeric_lines(worst)
        return lines + self._range_lines()

    def _range_lines(self) -> list[str]:
        if not self.range_findings:
            return []
        return [f"Range findings ({len(self.range_findings)}, docs/calibration.md):"] + [
            f"  {f.describe()}" for f in self.range_findings]

    def _numeric_lines(self, worst: int) -> list[str]:
        c = self.comparison
        if c is None:
            return []
        lines = [f"output SQNR: {_fmt_db(c.output_sqnr_db)} dB vs float "
                 f"(max abs error {_fmt_err(c.output_max_abs_err)})",
                 f"worst layers (SQNR of the noise each adds; end-to-end SQNR):"]
        for lc in c.worst(worst):
            lines.append(f"  {lc.name or lc.node:<28} {lc.op:<22} "
                         f"local {_fmt_db(lc.local_sqnr_db):>6} dB   "
                         f"end-to-end {_fmt_db(lc.sqnr_db):>6} dB")
        return lines

    def _cells(self, r: ReportRow) -> list[str]:
        cells = [r.module_path or "(root)", r.op, r.status, r.qconfig_rule,
                 f"{r.in_dtype}->{r.out_dtype}" if r.in_dtype else r.out_dtype,
                 r.kernel or r.reason, r.qparams]
        if self.has_numerics:
            cells += [_fmt_db(r.sqnr_db), _fmt_err(r.max_abs_err)]
        return cells

    def _headers(self) -> list[str]:
        h = ["module", "op", "status", "qconfig rule", "dtypes", "kernel / reason",
             "output qparams"]
        return h + (["SQNR dB", "max err"] if self.has_numerics else [])

    def to_text(self, width: int = 40, worst: int = 5) -> str:
        """A terminal table, one row per op, then the summary (``width``: of the kernel /
        reason column)."""
        widths = [24, 20, 11, 14, 16, width, 23] + ([7, 8] if self.has_numerics else [])
        body = [self._cells(r) for r in self.op_rows()]
        return "\n".join(_table(self._headers(), body, widths) + [""] + self.summary_lines(worst))

    def to_markdown(self, worst: int = 5) -> str:
        def esc(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        head = self._headers()
        lines = [f"# {self.title}", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for r in self.op_rows():
            lines.append("| " + " | ".join(esc(c) for c in self._cells(r)) + " |")
        lines += ["", "```", *self.summary_lines(worst), "```", ""]
        return "\n".join(lines)

    def to_html(self, path: Any = None, *, svg: Optional[str] = None, graph: bool = True,
                collapse_depth: Optional[int] = None) -> str:
        """One self-contained HTML file (inline CSS, the graph as inline SVG, no scripts or
        external references). Written to ``path`` when given; the text is returned."""
        if svg is None and graph:
            svg = _svg_or_note(self.gm, collapse_depth, self.title)
        text = _html_page(self, inline_svg(svg) if svg else "")
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def save(self, path: Any) -> str:
        """Write the report in the format the suffix names (.html, .md, else text)."""
        p = str(path)
        if p.endswith((".html", ".htm")):
            self.to_html(p)
        else:
            text = self.to_markdown() if p.endswith(".md") else self.to_text()
            with open(p, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return p


def _table(headers: list[str], body: list[list[str]], widths: list[int]) -> list[str]:
    def fmt(cells: list[str]) -> str:
        return "  ".join((c if len(c) <= w else c[: w - 1] + "…").ljust(w)
                         for c, w in zip(cells, widths)).rstrip()
    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in body]
    return lines


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:left;vertical-align:top}th{background:#eee}pre{background:#f6f6f6;padding:8px}
.graph{overflow:auto;border:1px solid #ddd;max-height:90vh}.sw{display:inline-block;width:1em;
height:1em;border:1px solid #888;vertical-align:middle;margin-right:4px}"""


def _svg_or_note(gm: fx.GraphModule, collapse_depth: Optional[int], title: str) -> str:
    import graphviz

    from fxquant.viz import render_svg

    try:
        return render_svg(gm, collapse_depth=collapse_depth, title=title)
    except graphviz.ExecutableNotFound:
        return "<p>(graph not drawn: Graphviz's <code>dot</code> is not installed)</p>"


def inline_svg(svg: str) -> str:
    """Graphviz's SVG document as an element for inline HTML: no XML prolog, no DOCTYPE (it
    names an external DTD), no namespace declarations (HTML5 parsing supplies them)."""
    start = svg.find("<svg")
    body = svg[start:] if start >= 0 else svg
    for attr in (' xmlns="http://www.w3.org/2000/svg"',
                 ' xmlns:xlink="http://www.w3.org/1999/xlink"'):
        body = body.replace(attr, "")
    return body


def _html_row(rep: Report, r: ReportRow) -> str:
    color = STATUS_COLORS.get(r.status, "#fff")
    cells = rep._cells(r)
    tip = html.escape("\n".join([r.source] + r.decisions), quote=True)
    tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
    return (f'<tr title="{tip}"><td><span class="sw" style="background:{color}"></span>'
            f"{html.escape(r.node)}</td>{tds}</tr>")


def _html_page(rep: Report, svg: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["node"] + rep._headers())
    body = "\n".join(_html_row(rep, r) for r in rep.op_rows())
    legend = " ".join(f'<span class="sw" style="background:{STATUS_COLORS[s]}"></span>'
                      f"{html.escape(STATUS_DESCRIPTIONS[s])}" for s in STATUSES)
    summary = html.escape("\n".join(rep.summary_lines()))
    graph = f'<h2>Graph</h2><div class="graph">{svg}</div>' if svg else ""
    title = html.escape(rep.title)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}'
            f"</title><style>{_CSS}</style></head><body><h1>{title}</h1>"
            f"<h2>Summary</h2><pre>{summary}</pre><p>{legend}</p>{graph}"
            f"<h2>Ops</h2><table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody>"
            f"</table></body></html>\n")


def _attach_numerics(rs: list[ReportRow], comparison: Any) -> None:
    by_handle = comparison.by_handle()
    for r in rs:
        lc = by_handle.get(r.debug_handle) if r.debug_handle is not None else None
        if lc is not None and r.status not in (OBSERVER, QUANTIZE, DEQUANTIZE):
            r.sqnr_db, r.local_sqnr_db, r.max_abs_err = lc.sqnr_db, lc.local_sqnr_db, lc.max_abs_err


def build(gm: fx.GraphModule, float_model: Optional[nn.Module] = None, inputs: Any = None, *,
          title: str = "fxquant report") -> Report:
    """The report of a prepared, reference or converted GraphModule.

    ``float_model``: the model it was made from (model size before, and with ``inputs``
    per-layer SQNR / max abs error against float). ``inputs``: a tensor, a tuple of forward's
    arguments, or a list of such batches."""
    from fxquant.measure import model_size_bytes

    all_rows = rows(gm, include_qdq=True)
    comparison = None
    if float_model is not None and inputs is not None:
        from fxquant.compare import compare

        comparison = compare(float_model, gm, inputs)
        _attach_numerics(all_rows, comparison)
    stage = graph_stage(gm)
    size_model = model_size_bytes(gm) if stage in (Stage.CONVERTED, Stage.REFERENCE) else None
    size_float = model_size_bytes(float_model) if float_model is not None else None
    from fxquant.range_check import findings_of

    return Report(gm, [r for r in all_rows if r.status not in (QUANTIZE, DEQUANTIZE)],
                  summary(gm, all_rows), comparison, size_float, size_model, title,
                  findings_of(gm))


def text_report(gm: fx.GraphModule, width: int = 40) -> str:
    """A terminal table: one row per op, then how many ops run int8 / float and why."""
    return build(gm).to_text(width)


class _CallableModule(types.ModuleType):
    """``fxquant.report(gm, ...)`` builds a :class:`Report`; ``fxquant.report.rows`` etc. stay."""

    def __call__(self, gm: fx.GraphModule, float_model: Optional[nn.Module] = None,
                 inputs: Any = None, **kwargs: Any) -> Report:
        return build(gm, float_model, inputs, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
