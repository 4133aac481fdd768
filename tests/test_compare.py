"""fxquant.compare: per-layer numerics against float matched by debug handle; an injected qparams
fault is named first; weights; skip_layers and the re-run."""
from __future__ import annotations

import functools
import pytest
import torch
import torch.fx as fx

import fxquant
from fxquant.compare import Comparison, batches_of, compare, skip_layers, skip_worst
from fxquant.meta import qinfo
from tests.models import TinyResNet, WithFloatHead, build, calibration_batches

SHAPE = (2, 3, 8, 8)


@functools.lru_cache(maxsize=None)
def _models(factory=TinyResNet):
    torch.manual_seed(0)
    model = build(factory)
    mapping = fxquant.get_default_qconfig_mapping("x86")
    if hasattr(model, "head"):  # WithFloatHead: its head stays float
        mapping.set_module_name("head", None)
    prepared = fxquant.prepare_fx(model, mapping, (torch.randn(*SHAPE),), backend="x86")
    for batch in calibration_batches(SHAPE, n=3):
        prepared(batch)
    return model, mapping, prepared


def _inputs():
    return calibration_batches(SHAPE, n=2, seed=11)


def test_every_op_is_matched_and_close_to_float():
    model, _, prepared = _models()
    result = compare(model, fxquant.convert_fx(prepared), _inputs())
    assert isinstance(result, Comparison) and result.unmatched == []
    names = [lc.name for lc in result.layers]
    assert names == ["stem.0", "layer1.conv1", "layer1.conv2", "layer1", "layer2.conv1",
                     "layer2.conv2", "layer2", "pool", "flatten_1", "fc"]
    assert all(lc.status == "int8" and 20 < lc.sqnr_db < 60 for lc in result.layers)
    assert result.layer("stem.0").input_sqnr_db > 30  # the quantized input
    assert 25 < result.output_sqnr_db < 60
    shared = result.layer("pool")  # shares its input's qparams: adds (next to) no noise
    assert shared.local_sqnr_db > result.layer("stem.0").local_sqnr_db
    assert result.layer("fc").shape == (2, 10)


def test_injected_fault_in_a_module_scale_is_named_first():
    model, _, prepared = _models()
    quantized = fxquant.convert_fx(prepared)
    clean = compare(model, quantized, _inputs())
    quantized.get_submodule("layer1.conv1").scale *= 0.2  # saturates its output
    faulty = compare(model, quantized, _inputs())
    assert faulty.worst_layers()[0] == "layer1.conv1"
    bad = faulty.layer("layer1.conv1")
    assert bad.local_sqnr_db < clean.layer("layer1.conv1").local_sqnr_db - 10
    assert bad.local_sqnr_db < min(lc.local_sqnr_db for lc in faulty.layers if lc is not bad) - 10
    # the layers after it pass the error on: low end-to-end SQNR, but not named first
    assert faulty.layer("layer1.conv2").sqnr_db < clean.layer("layer1.conv2").sqnr_db - 5


def test_injected_fault_in_a_quantize_node_of_the_reference_graph():
    model, _, prepared = _models()
    reference = fxquant.convert_to_reference_fx(prepared)
    q = next(n for n in reference.graph.nodes if n.op == "call_function"
             and qinfo(n).role == "quantize" and qinfo(n).module_path == "layer2.conv2")
    scale = q.args[1]
    if isinstance(scale, fx.Node):  # the scale is a buffer the quantize reads
        with torch.no_grad():
            reference.get_buffer(str(scale.target)).mul_(6.0)  # coarse steps
    else:
        q.args = (q.args[0], scale * 6.0, *q.args[2:])
    reference.recompile()
    result = compare(model, reference, _inputs())
    assert result.worst_layers(1) == ["layer2.conv2"]


def test_prepared_model_is_converted_first():
    model, _, prepared = _models()
    a = compare(model, prepared, _inputs())
    b = compare(model, fxquant.convert_fx(prepared), _inputs())
    assert [lc.name for lc in a.layers] == [lc.name for lc in b.layers]
    assert [lc.sqnr_db for lc in a.layers] == pytest.approx([lc.sqnr_db for lc in b.layers])
    assert "observer" not in {lc.status for lc in a.layers}


def test_weights_against_folded_float_weights():
    model, _, prepared = _models()
    reference = fxquant.convert_to_reference_fx(prepared)
    result = compare(model, reference, _inputs())
    assert [w.name for w in result.weights] == ["stem.0", "layer1.conv1", "layer1.conv2",
                                                "layer2.conv1", "layer2.conv2", "fc"]
    assert all(w.sqnr_db > 35 for w in result.weights)  # BatchNorm folded in the float side
    ref = reference.get_submodule("layer2.conv1")[0]
    ref.weight_scale.mul_(20.0)
    corrupted = compare(model, reference, _inputs())
    worst = corrupted.worst_weights(2)
    assert worst[0].name == "layer2.conv1" and worst[0].sqnr_db < worst[1].sqnr_db - 10


def test_float_ops_and_unquantized_head():
    model, _, prepared = _models(WithFloatHead)
    result = compare(model, fxquant.convert_fx(prepared), torch.randn(*SHAPE))
    head = result.layer("head.1")
    assert head.status == "float" and head.input_sqnr_db < 60  # reads quantized features
    assert head.sqnr_db <= head.input_sqnr_db + 3
    assert "head.1" not in result.worst_layers(None)  # already float: nothing to skip


def test_batches_and_input_forms():
    x = torch.randn(1)
    assert batches_of(x) == [(x,)] and batches_of((x, x)) == [(x, x)]
    assert batches_of([x, (x, x)]) == [(x,), (x, x)]


def test_skip_layers_leaves_them_float_and_reruns():
    model, mapping, prepared = _models()
    quantized = fxquant.convert_fx(prepared)
    quantized.get_submodule("layer1.conv1").scale *= 0.2
    worst = compare(model, quantized, _inputs()).worst_layers(1)
    new_mapping = skip_layers(mapping, worst)
    assert new_mapping is not mapping and "layer1.conv1" not in mapping.module_name_qconfigs
    retry = fxquant.prepare_fx(model, new_mapping, (torch.randn(*SHAPE),), backend="x86")
    for batch in calibration_batches(SHAPE, n=3):
        retry(batch)
    again = compare(model, retry, _inputs())
    layer = again.layer("layer1.conv1")
    assert layer.status == "float"
    assert again.layer("layer1.conv2").status == "int8"
    node = next(n for n in retry.graph.nodes if n.target == "layer1.conv1")
    assert "module_name 'layer1.conv1'" in (qinfo(node).qconfig_reason or "")
    assert skip_worst(mapping, again, 2).module_name_qconfigs.keys() >= set(again.worst_layers(2))


def test_callable_module_and_user_models_untouched():
    model, _, prepared = _models()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxquant.compare(model, prepared, _inputs())
    assert isinstance(result, Comparison)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "layer" in result.to_text() and "weight" in result.to_text()
