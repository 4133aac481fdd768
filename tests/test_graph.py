"""fxquant.to_networkx: a DiGraph with the decision record (plain data) on each node."""
from __future__ import annotations

import functools
import json

import networkx as nx
import torch

import fxquant
from fxquant.meta import qinfo
from tests.models import WithFloatHead, build, calibration_batches

SHAPE = (2, 3, 8, 8)


@functools.lru_cache(maxsize=None)
def _prepared():
    model = build(WithFloatHead)
    mapping = fxquant.get_default_qconfig_mapping("x86")
    mapping.set_module_name("head", None)
    prepared = fxquant.prepare_fx(model, mapping, (torch.randn(*SHAPE),), backend="x86")
    for batch in calibration_batches(SHAPE, n=2):
        prepared(batch)
    return prepared


def test_converted_graph_nodes_edges_and_records():
    gm = fxquant.convert_fx(_prepared())
    g = fxquant.to_networkx(gm)
    assert isinstance(g, nx.DiGraph) and g.graph["stage"] == "converted"
    assert list(g.nodes) == [n.name for n in gm.graph.nodes]
    assert list(nx.topological_sort(g))[0] == "x"
    stem = g.nodes["stem"]
    assert (stem["op"], stem["target"], stem["label"], stem["status"], stem["kernel"]) == \
        ("call_module", "stem", "ConvReLU2d", "int8", "quantized::conv2d_relu")
    rec = stem["record"]
    assert rec["module_path"] == "stem" and rec["fused_from"] == ["stem", "relu"]
    assert rec["value"] == {"kind": "tensor", "dtype": "float32", "shape": [2, 8, 8, 8],
                            "python_type": "Tensor"}
    assert rec["qparams"]["dtype"] == "quint8" and rec["weight_spec"]["dtype"] == "qint8"
    assert [d["pass"] for d in rec["decisions"]][-1] == "lower_to_backend"
    assert rec["decisions"][-1] == {"pass": "lower_to_backend", "action": "lower",
                                    "reason": "runs on quantized::conv2d_relu",
                                    "detail": rec["decisions"][-1]["detail"]}
    node = next(n for n in gm.graph.nodes if n.name == "stem")
    edge = g.edges["stem", "block_conv1"]
    assert edge["dtype"] == "quint8" and edge["scale"] == qinfo(node).qparams["scale"]
    assert edge["zero_point"] == qinfo(node).qparams["zero_point"] and edge["slots"] == ["0"]
    assert g.edges["dequantize_4", "flatten"]["dtype"] == "float32"
    assert g.nodes["head_1"]["status"] == "float"
    assert "module_name 'head'" in g.nodes["head_1"]["record"]["qconfig_reason"]


def test_prepared_graph_and_json_round_trip():
    g = fxquant.to_networkx(_prepared())
    assert g.graph["stage"] == "prepared"
    observers = [n for n, d in g.nodes(data=True) if d["status"] == "observer"]
    assert len(observers) == 5
    add = next(d for n, d in g.nodes(data=True) if d["label"] == "torch.add")
    assert add["record"]["group"] is not None and add["status"] == "to_quantize"
    assert {"0", "1"} <= {s for _, _, d in g.in_edges(next(
        n for n, d in g.nodes(data=True) if d["label"] == "torch.add"), data=True)
        for s in d["slots"]}
    text = json.dumps(nx.node_link_data(g, edges="links"))
    back = nx.node_link_graph(json.loads(text), edges="links")
    assert back.nodes["stem_1"]["record"] == g.nodes["stem_1"]["record"]
    assert back.nodes["stem_1"]["record"]["input_specs"]["0"]["dtype"] == "quint8"
