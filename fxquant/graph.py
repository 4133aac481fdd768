"""networkx export of a GraphModule and its decision records, for users' own analyses.

    g = fxquant.to_networkx(quantized)
    float_ops = [n for n, d in g.nodes(data=True) if d["status"] == "float"]
    g.nodes["fc"]["record"]["decisions"][-1]["reason"]

Every value is a plain Python type (str, int, float, bool, None, list, dict): the graph can be
written with ``json.dumps(nx.node_link_data(g))`` or pickled without torch.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx

from fxquant.meta import Decision, QNodeInfo, QSpec, SharedSpec, ValueInfo
from fxquant.patterns import target_name
from fxquant.status import graph_stage, info_of, op_label, status_of, tensor_out


def _plain(x: Any) -> Any:
    """A JSON-able rendering of a value from a record (enum words as plain str)."""
    if x is None or isinstance(x, (bool, int, float)):
        return x
    if isinstance(x, str):
        return str(x)
    if isinstance(x, (torch.dtype, torch.qscheme)):
        return str(x).replace("torch.", "")
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 16 else f"Tensor{list(x.shape)}"
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, type):
        return f"{x.__module__}.{x.__qualname__}"
    return getattr(x, "__qualname__", None) or str(x)


def _spec(spec: Any) -> Optional[dict[str, Any]]:
    if spec is None:
        return None
    if isinstance(spec, SharedSpec):
        return {"shared_with_input": spec.input_index}
    if isinstance(spec, QSpec):
        return {"dtype": _plain(spec.dtype), "qscheme": _plain(spec.qscheme),
                "is_dynamic": spec.is_dynamic, "fixed": _plain(spec.fixed),
                "observer": _plain(spec.observer)}
    return {"value": str(spec)}


def _value(value: Optional[ValueInfo]) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    return {"kind": value.kind, "dtype": _plain(value.dtype), "shape": _plain(value.shape),
            "python_type": value.python_type}


def _decision(d: Decision) -> dict[str, Any]:
    return {"pass": d.pass_name, "action": str(d.action), "reason": d.reason,
            "detail": _plain(dict(d.detail))}


def record_dict(info: QNodeInfo) -> dict[str, Any]:
    """The decision record as plain dicts / lists / strings."""
    out: dict[str, Any] = {}
    for f in fields(info):
        v = getattr(info, f.name)
        if f.name in ("output_spec", "weight_spec"):
            out[f.name] = _spec(v)
        elif f.name == "input_specs":
            out[f.name] = {str(k): _spec(s) for k, s in v.items()}
        elif f.name == "value":
            out[f.name] = _value(v)
        elif f.name == "decisions":
            out[f.name] = [_decision(d) for d in v]
        elif f.name == "qconfig":
            out[f.name] = None if v is None else str(v)
        else:
            out[f.name] = _plain(v)
    return out


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph with one node per fx node (keyed by its name) and an edge per data
    dependency. Node attributes: ``op``, ``target``, ``label``, ``status``, ``module_path``,
    ``role``, ``debug_handle``, ``kernel`` and ``record`` (the whole record,
    :func:`record_dict`). Edge attributes: ``dtype``, ``scale``, ``zero_point`` (quantized
    edges) and ``slots`` (which arguments of the user read it). Graph attribute ``stage``."""
    stage = graph_stage(gm)
    g = nx.DiGraph(name=type(gm).__name__, stage=str(stage))
    for node in gm.graph.nodes:
        info = info_of(node)
        g.add_node(node.name, op=node.op, target=target_name(node.target)
                   if node.op == "call_function" else str(node.target),
                   label=op_label(gm, node),
                   status=str(status_of(info, stage)) if node.op.startswith("call_") else node.op,
                   module_path=info.module_path, role=str(info.role),
                   debug_handle=info.debug_handle, kernel=info.kernel,
                   record=record_dict(info))
    for node in gm.graph.nodes:
        for slot, arg in _inputs(node):
            if g.has_edge(arg.name, node.name):
                g.edges[arg.name, node.name]["slots"].append(slot)
                continue
            out = tensor_out(arg, stage)
            g.add_edge(arg.name, node.name, dtype=out.dtype, scale=out.scale,
                       zero_point=out.zero_point, slots=[slot])
    return g


def _inputs(node: fx.Node) -> list[tuple[str, fx.Node]]:
    out: list[tuple[str, fx.Node]] = []

    def walk(slot: str, a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append((slot, a))
        elif isinstance(a, (tuple, list)):
            for i, x in enumerate(a):
                walk(f"{slot}[{i}]", x)
        elif isinstance(a, dict):
            for k, x in a.items():
                walk(f"{slot}[{k}]", x)

    for i, a in enumerate(node.args):
        walk(str(i), a)
    for k, a in node.kwargs.items():
        walk(k, a)
    return out
