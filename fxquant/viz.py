"""Draw a prepared, reference or converted model's graph from the decisions on its nodes.

    fxquant.visualize(quantized, "model.svg")                    # svg (default), png or dot
    fxquant.visualize(big_model, "model.svg", collapse_depth=2)  # one box per module path prefix

One box per op, filled by what it became (int8, dynamic, weight-only, kept float, reference,
observer, quantize / dequantize: :data:`fxquant.records.STATUS_COLORS`), edges labeled with the
dtype that flows and, once converted, its scale / zero_point; fused groups are dashed clusters;
every box's tooltip holds its decisions, the qconfig rule, the kernel and the source line. The
drawing only reads the records (``node.meta["fxquant"]``). Rendering uses Graphviz's ``dot``.
"""
from __future__ import annotations

import html
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import graphviz
import torch.fx as fx

from fxquant.patterns import target_name
from fxquant.records import STATUS_COLORS, STATUS_DESCRIPTIONS, STATUSES, Role, Status
from fxquant.status import graph_stage, info_of, op_label, reason_of, status_of, tensor_out

FORMATS = ("svg", "png", "dot")
IO_COLOR = "#ffffff"
_LABEL_WIDTH = 38
_ROLE_SHAPES = {Status.OBSERVER: "ellipse", Status.QUANTIZE: "cds", Status.DEQUANTIZE: "cds"}
_NOT_OPS = (Status.OBSERVER, Status.QUANTIZE, Status.DEQUANTIZE)  # drawn as role shapes


def _q(text: str) -> graphviz.quoting.NoHtml:
    """A DOT string value: backslashes kept literal, never parsed as an HTML label."""
    return graphviz.nohtml(text.replace("\\", "\\\\"))


def _lines(*lines: str) -> graphviz.quoting.NoHtml:
    """Lines joined with DOT's newline escape (each line's own backslashes kept literal)."""
    return graphviz.nohtml("\\n".join(s.replace("\\", "\\\\") for s in lines))


def _short(text: str, width: int = _LABEL_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _status(node: fx.Node, stage: str) -> Optional[str]:
    """Status of a call_* node; None for inputs, outputs and attributes."""
    if not node.op.startswith("call_"):
        return None
    return status_of(info_of(node), stage)


def _node_label(gm: fx.GraphModule, node: fx.Node, stage: str) -> graphviz.quoting.NoHtml:
    info = info_of(node)
    status = _status(node, stage)
    if status is None:
        what = {"placeholder": "input", "output": "output", "get_attr": "attr"}[node.op]
        return _lines(f"{what}: {node.name}")
    if status in _NOT_OPS:
        what = op_label(gm, node) if status == Status.OBSERVER else tensor_out(node, stage).label()
        return _lines(status, _short(what) if status != Status.DEQUANTIZE else "")
    detail = info.kernel or (info.rule if status in (Status.PLANNED, Status.REFERENCE) else None) \
        or reason_of(info)
    return _lines(_short(info.module_path or node.name), _short(op_label(gm, node)),
                  _short(f"{status}: {detail}" if detail else status))


def tooltip(gm: fx.GraphModule, node: fx.Node, stage: str) -> str:
    """Everything the record says about the node, one fact per line."""
    info = info_of(node)
    out = tensor_out(node, stage)
    target = target_name(node.target) if node.op == "call_function" else node.target
    lines = [f"{node.name}: {op_label(gm, node)} ({node.op} {target})",
             f"status: {_status(node, stage) or node.op}"]
    facts = (("module", info.module_path), ("source", info.source),
             ("qconfig", info.qconfig_reason), ("rule", info.rule), ("kernel", info.kernel),
             ("output", out.label() + (f" shape {list(out.shape)}" if out.shape else "")),
             ("fused from", " + ".join(info.fused_from)),
             ("debug handle", None if info.debug_handle is None else str(info.debug_handle)))
    lines += [f"{k}: {v}" for k, v in facts if v]
    if info.decisions:
        lines.append("decisions:")
        lines += [f"  {d}" for d in info.decisions]
    return "\n".join(lines)


# -------------------------------------------------------------------------------- layout
@dataclass
class _View:
    """Which box each node is drawn in, after hiding and collapsing."""

    gm: fx.GraphModule
    stage: str
    box: dict[fx.Node, str] = field(default_factory=dict)  # node -> box id
    members: dict[str, list[fx.Node]] = field(default_factory=lambda: defaultdict(list))


def _collapse_key(node: fx.Node, depth: Optional[int]) -> Optional[str]:
    if depth is None or not node.op.startswith("call_"):
        return None
    parts = [p for p in info_of(node).module_path.split(".") if p]
    return ".".join(parts[:depth]) if len(parts) >= depth else None


def _view(gm: fx.GraphModule, collapse_depth: Optional[int], show_observers: bool) -> _View:
    if collapse_depth is not None and collapse_depth < 1:
        raise ValueError(f"collapse_depth must be >= 1 (module path components kept), "
                         f"got {collapse_depth}")
    view = _View(gm, graph_stage(gm))
    nodes = [n for n in gm.graph.nodes
             if show_observers or _status(n, view.stage) != Status.OBSERVER]
    keys = {n: _collapse_key(n, collapse_depth) for n in nodes}
    sizes = Counter(k for n, k in keys.items() if k is not None and info_of(n).role == Role.OP)
    for node in nodes:
        key = keys[node]
        box = f"[{key}]" if key is not None and sizes[key] > 1 else node.name
        view.box[node] = box
        view.members[box].append(node)
    return view


def _visible_sources(view: _View, node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` that are drawn, looking through hidden nodes."""
    out, stack, seen = [], list(node.all_input_nodes), set()
    while stack:
        a = stack.pop(0)
        if a in seen:
            continue
        seen.add(a)
        if a in view.box:
            out.append(a)
        else:
            stack.extend(a.all_input_nodes)
    return out


def _edge_label(node: fx.Node, stage: str) -> graphviz.quoting.NoHtml:
    out = tensor_out(node, stage)
    if out.scale is None:
        return _q(out.dtype)
    return _lines(out.dtype, f"s={out.scale:.4g} zp={out.zero_point}")


def _add_edges(dot: graphviz.Digraph, view: _View) -> None:
    drawn: set[tuple[str, str]] = set()
    for node, box in view.box.items():
        for src in _visible_sources(view, node):
            pair = (view.box[src], box)
            if pair[0] == pair[1] or pair in drawn:
                continue
            drawn.add(pair)
            dot.edge(pair[0], pair[1], label=_edge_label(src, view.stage))


# -------------------------------------------------------------------------------- boxes
def _op_attrs(gm: fx.GraphModule, node: fx.Node, stage: str) -> dict[str, Any]:
    status = _status(node, stage)
    attrs = {"label": _node_label(gm, node, stage),
             "tooltip": _lines(*tooltip(gm, node, stage).split("\n"))}
    if status is None:
        attrs.update(shape="oval", fillcolor=IO_COLOR)
    else:
        attrs.update(fillcolor=STATUS_COLORS[status], shape=_ROLE_SHAPES.get(status, "box"))
    if status in _NOT_OPS:
        attrs.update(fontsize="8", height="0.3")
    return attrs


def _collapsed_attrs(gm: fx.GraphModule, box: str, nodes: list[fx.Node], stage: str
                     ) -> dict[str, Any]:
    statuses = Counter(_status(n, stage) for n in nodes)
    ops = {s: c for s, c in statuses.items() if s is not None and s not in _NOT_OPS}
    shown = ops or {s: c for s, c in statuses.items() if s is not None}
    total = sum(shown.values()) or 1
    ranked = sorted(shown.items(), key=lambda kv: (-kv[1], STATUSES.index(kv[0])))
    counts = ", ".join(f"{c} {s}" for s, c in ranked)
    fill = STATUS_COLORS[ranked[0][0]] if ranked else STATUS_COLORS[Status.FLOAT]
    style = "filled,bold"
    if len(ranked) > 1:  # stripes in proportion to the ops of each status
        fill = ":".join(f"{STATUS_COLORS[s]};{c / total:.3f}" for s, c in ranked)
        style = "striped,bold"
    tip = [f"module {box[1:-1]}: {len(nodes)} nodes ({counts})"]
    tip += [f"  {n.name}: {op_label(gm, n)} [{_status(n, stage)}] "
            f"{info_of(n).kernel or reason_of(info_of(n))}" for n in nodes]
    n_ops = sum(ops.values())
    return {"label": _lines(box[1:-1], f"{n_ops} op{'s' if n_ops != 1 else ''}", _short(counts)),
            "fillcolor": fill, "style": style, "shape": "box3d" if len(ranked) <= 1 else "box",
            "tooltip": _lines(*tip)}


def _fusion_key(node: fx.Node) -> Optional[tuple[str, str]]:
    info = info_of(node)
    if info.role != Role.OP:
        return None
    if info.group is not None:
        return ("group", str(info.group))
    if len(info.fused_from) > 1:
        return ("fused", node.name)
    return None


def _add_boxes(dot: graphviz.Digraph, view: _View) -> None:
    clusters: dict[tuple[str, str], list[fx.Node]] = defaultdict(list)
    for box, nodes in view.members.items():
        if box.startswith("["):
            dot.node(box, **_collapsed_attrs(view.gm, box, nodes, view.stage))
            continue
        node = nodes[0]
        key = _fusion_key(node)
        if key is not None:
            clusters[key].append(node)
        else:
            dot.node(box, **_op_attrs(view.gm, node, view.stage))
    for i, (key, nodes) in enumerate(clusters.items()):
        members = info_of(nodes[-1]).fused_from or tuple(n.name for n in nodes)
        with dot.subgraph(name=f"cluster_fused_{i}") as sub:
            sub.attr(label=_q(_short("fused: " + " + ".join(members), 60)), style="dashed,rounded",
                     color="#555555", fontsize="9", tooltip=_q(" + ".join(members)))
            for n in nodes:
                sub.node(view.box[n], **_op_attrs(view.gm, n, view.stage))


def _add_legend(dot: graphviz.Digraph, view: _View) -> None:
    """One table node: a swatch and a description per status drawn in this graph."""
    present = {_status(n, view.stage) for n in view.box} - {None}
    statuses = [s for s in STATUSES if s in present]
    if not statuses:
        return
    cells = "".join(f'<TR><TD BGCOLOR="{STATUS_COLORS[s]}" WIDTH="18"> </TD>'
                    f'<TD ALIGN="LEFT">{html.escape(STATUS_DESCRIPTIONS[s])}</TD></TR>'
                    for s in statuses)
    label = (f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="2" CELLPADDING="3">'
             f'<TR><TD COLSPAN="2"><B>legend</B></TD></TR>{cells}</TABLE>>')
    dot.node("legend", label=label, shape="plaintext", style="", fontsize="9",
             tooltip=_q("what the colors mean"))


def to_dot(gm: fx.GraphModule, collapse_depth: Optional[int] = None, *,
           title: Optional[str] = None, legend: bool = True, show_observers: bool = True,
           rankdir: str = "TB") -> graphviz.Digraph:
    """The graph as a ``graphviz.Digraph`` (render it yourself, or use :func:`visualize`)."""
    view = _view(gm, collapse_depth, show_observers)
    dot = graphviz.Digraph(name=type(gm).__name__)
    dot.attr(rankdir=rankdir, fontname="Helvetica", labelloc="t",
             label=_q(title or f"{type(gm).__name__} ({view.stage})"), tooltip=_q(view.stage))
    dot.attr("node", style="rounded,filled", fontname="Helvetica", fontsize="10",
             color="#444444")
    dot.attr("edge", fontname="Helvetica", fontsize="8", color="#555555")
    _add_boxes(dot, view)
    _add_edges(dot, view)
    if legend:
        _add_legend(dot, view)
    return dot


def render_svg(gm: fx.GraphModule, collapse_depth: Optional[int] = None, **kwargs: Any) -> str:
    """The drawing as SVG text (for embedding, e.g. in the HTML report)."""
    return to_dot(gm, collapse_depth, **kwargs).pipe(format="svg").decode("utf-8")


def visualize(gm: fx.GraphModule, path: Any, format: Optional[str] = None,
              collapse_depth: Optional[int] = None, *, title: Optional[str] = None,
              legend: bool = True, show_observers: bool = True, rankdir: str = "TB") -> str:
    """Draw ``gm`` (prepared, reference or converted) to ``path`` and return the path.

    ``format``: "svg", "png" or "dot" (default: the path's suffix, else svg).
    ``collapse_depth``: draw every op whose module path is deeper than this many components
    as one box per path prefix (``2``: ``layer1.0``), for large models.
    ``show_observers=False`` hides observer nodes (edges go through them)."""
    path = os.fspath(path)
    fmt = format or os.path.splitext(path)[1].lstrip(".").lower() or "svg"
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    dot = to_dot(gm, collapse_depth, title=title, legend=legend, show_observers=show_observers,
                 rankdir=rankdir)
    data = dot.source.encode("utf-8") if fmt == "dot" else dot.pipe(format=fmt)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path
