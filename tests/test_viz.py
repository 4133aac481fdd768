"""fxquant.visualize: SVG of prepared, reference and converted models; colors, labels, edge
qparams, fused clusters, tooltips, collapsing, formats. Rendered with Graphviz's dot."""
from __future__ import annotations

import copy
import functools
import xml.etree.ElementTree as ET

import pytest
import torch

import fxquant
from fxquant.meta import qinfo
from fxquant.report import STATUS_COLORS
from fxquant.viz import render_svg, to_dot, visualize
from tests.models import TinyResNet, WithFloatHead, build, calibration_batches

SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}"
SHAPE = (2, 3, 8, 8)


@functools.lru_cache(maxsize=None)
def _prepared(factory, skip: tuple[str, ...] = ("head",)):
    torch.manual_seed(0)
    model = build(factory)
    mapping = fxquant.get_default_qconfig_mapping("x86")
    for name in skip:
        mapping.set_module_name(name, None)
    prepared = fxquant.prepare_fx(model, mapping, (torch.randn(*SHAPE),), backend="x86")
    for batch in calibration_batches(SHAPE, n=2):
        prepared(batch)
    return prepared


def _converted(factory, skip=("head",)):
    return fxquant.convert_fx(_prepared(factory, skip))


def _nodes(svg: str) -> dict[str, dict]:
    """title -> fills, texts and tooltip of each drawn node (and each edge, keyed a->b)."""
    root = ET.fromstring(svg)
    out = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") not in ("node", "edge", "cluster"):
            continue
        title = g.find(f"{SVG}title").text
        fills = [e.get("fill") for e in g.iter() if e.get("fill") not in (None, "none")]
        texts = [t.text for t in g.iter(f"{SVG}text")]
        tips = [a.get(f"{XLINK}title") for a in g.iter(f"{SVG}a") if a.get(f"{XLINK}title")]
        out[title.replace("&#45;&gt;", "->")] = {"fills": fills, "texts": texts,
                                                 "tooltip": tips[0] if tips else "",
                                                 "class": g.get("class")}
    return out


def test_prepared_model_colors_labels_and_tooltips():
    nodes = _nodes(render_svg(_prepared(WithFloatHead)))
    stem = nodes["stem_1"]
    assert STATUS_COLORS["to_quantize"] in stem["fills"]
    assert stem["texts"][:2] == ["stem", "ConvReLU2d"]
    assert stem["texts"][2] == "to_quantize: conv2d_relu"
    assert "[fuse] fuse: Conv2d + ReLU → ConvReLU2d" in stem["tooltip"]
    assert "source: models.py:" in stem["tooltip"] and "qconfig: global" in stem["tooltip"]
    head = nodes["head_1"]
    assert STATUS_COLORS["float"] in head["fills"] and head["texts"][1] == "Linear"
    assert "keep_float: qconfig is None (module_name 'head'" in head["tooltip"]
    observers = [v for k, v in nodes.items()
                 if k.startswith("activation_post_process") and v["class"] == "node"]
    assert len(observers) == 5
    assert all(STATUS_COLORS["observer"] in o["fills"] and o["texts"][0] == "observer"
               for o in observers)
    assert {"int8", "float32"} & set(nodes["x->activation_post_process_0"]["texts"]) == {"float32"}


def test_prepared_model_fused_groups_are_clusters_and_legend_lists_statuses():
    nodes = _nodes(render_svg(_prepared(WithFloatHead)))
    clusters = [v["texts"][0] for v in nodes.values() if v["class"] == "cluster"]
    assert "fused: stem + relu" in clusters
    assert "fused: block.conv1 + block.bn1 + block:relu_1" in clusters
    assert any(c.startswith("fused: add_") for c in clusters)  # the add-relu group
    legend = nodes["legend"]
    assert "kept float" in legend["texts"] and "observer / fake-quant" in legend["texts"]
    assert STATUS_COLORS["observer"] in legend["fills"]
    assert STATUS_COLORS["int8"] not in legend["fills"]  # only statuses the graph has


def test_converted_model_int8_nodes_and_edge_qparams():
    gm = _converted(WithFloatHead)
    nodes = _nodes(render_svg(gm))
    for name, kernel in (("stem", "quantized::conv2d_relu"), ("block_conv2", "quantized::conv2d"),
                         ("add_relu", "quantized::add_relu")):
        assert STATUS_COLORS["int8"] in nodes[name]["fills"], name
        assert nodes[name]["texts"][-1] == f"int8: {kernel}"
        assert f"kernel: {kernel}" in nodes[name]["tooltip"]
    assert STATUS_COLORS["float"] in nodes["head_1"]["fills"]
    assert STATUS_COLORS["quantize"] in nodes["quantize_per_tensor"]["fills"]
    assert STATUS_COLORS["dequantize"] in nodes["dequantize_4"]["fills"]
    stem = next(n for n in gm.graph.nodes if n.name == "stem")
    qp = qinfo(stem).qparams
    edge = nodes["stem->block_conv1"]
    assert edge["texts"] == ["quint8", f"s={qp['scale']:.4g} zp={qp['zero_point']}"]
    assert nodes["dequantize_4->flatten"]["texts"] == ["float32"]
    assert "[lower_to_backend] lower: runs on quantized::conv2d_relu" in nodes["stem"]["tooltip"]


def test_reference_model_ops_are_reference_between_qdq():
    nodes = _nodes(render_svg(fxquant.convert_to_reference_fx(_prepared(WithFloatHead))))
    assert STATUS_COLORS["reference"] in nodes["stem_1"]["fills"]
    assert nodes["stem_1"]["texts"][-1] == "reference: conv2d_relu"
    q = [v for k, v in nodes.items()
         if k.startswith("quantize_per_tensor") and v["class"] == "node"]
    assert len(q) == 5 and all(v["texts"][0] == "quantize" for v in q)


def test_collapse_by_module_path():
    gm = _converted(TinyResNet)
    nodes = _nodes(render_svg(gm, collapse_depth=1))
    assert "layer1_conv1" not in nodes and "add_relu" not in nodes
    box = nodes["[layer1]"]
    assert box["texts"] == ["layer1", "3 ops", "3 int8"]
    assert STATUS_COLORS["int8"] in box["fills"]
    assert "layer1_conv1: ConvReLU2d [int8] quantized::conv2d_relu" in box["tooltip"]
    assert "[layer1]->[layer2]" in nodes and "fc_1" in nodes  # single-op modules stay boxes
    full = _nodes(render_svg(gm))
    assert len([v for v in nodes.values() if v["class"] == "node"]) < \
        len([v for v in full.values() if v["class"] == "node"])


def test_collapsed_box_with_mixed_decisions_is_striped():
    gm = _converted(TinyResNet, skip=("layer1.conv2",))
    box = _nodes(render_svg(gm, collapse_depth=1))["[layer1]"]
    assert box["texts"] == ["layer1", "3 ops", "2 int8, 1 float"]
    assert STATUS_COLORS["int8"] in box["fills"] and STATUS_COLORS["float"] in box["fills"]


def test_hide_observers_draws_through_them():
    nodes = _nodes(render_svg(_prepared(WithFloatHead), show_observers=False))
    assert not any(k.startswith("activation_post_process") for k in nodes)
    assert "x->stem_1" in nodes and "relu_2->flatten" in nodes


def test_formats(tmp_path):
    gm = _converted(TinyResNet)
    png = visualize(gm, tmp_path / "g.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    dot = open(visualize(gm, tmp_path / "g.dot"), encoding="utf-8").read()
    assert dot.startswith("digraph") and "quantized::conv2d_relu" in dot
    svg = open(visualize(gm, tmp_path / "g.any", format="svg"), encoding="utf-8").read()
    assert ET.fromstring(svg[svg.index("<svg"):]).tag == f"{SVG}svg"
    with pytest.raises(ValueError, match="format must be one of"):
        visualize(gm, tmp_path / "g.jpg")
    with pytest.raises(ValueError, match="collapse_depth"):
        to_dot(gm, collapse_depth=0)


def test_visualize_only_reads_the_records():
    gm = _converted(WithFloatHead)
    before = [copy.copy(qinfo(n).decisions) for n in gm.graph.nodes]
    render_svg(gm, collapse_depth=1)
    render_svg(gm)
    assert [qinfo(n).decisions for n in gm.graph.nodes] == before


def test_labels_survive_dot_special_characters():
    gm = _converted(TinyResNet)
    node = next(n for n in gm.graph.nodes if n.name == "fc_1")
    info = qinfo(node).copy()
    info.source = 'odd.py:1 in f: y = "<b>" + "\\n" + {x|y}'
    node.meta["fxquant"] = info
    nodes = _nodes(render_svg(gm))
    assert 'y = "<b>" + "\\n" + {x|y}' in nodes["fc_1"]["tooltip"]
