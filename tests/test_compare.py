"""fxquant.compare: per-layer numerics against float matched by debug handle; an injected qparams
fault is named first; weights; skip_layers and the re-run."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxquant
from fxquant.compare import (Comparison, batches_of, compare, run_and_record, skip_layers,
                             skip_worst, value_keys)
from fxquant.meta import qinfo
from fxquant.trace import trace
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


class InPlaceReLUs(nn.Module):
    """nn.ReLU(inplace=True) right after a conv, and ``p.relu_()`` on a pool's output: in the
    float run both write the tensor another op produced, after compare recorded it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        y = self.relu(self.conv(x))
        p = self.pool(self.conv2(y))
        p.relu_()
        return p


def _hooked(model, names):
    """Forward hooks that keep a copy of each named module's output as it was produced."""
    seen = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: seen.__setitem__(
                name, (out.dequantize() if out.is_quantized else out).detach().clone()))
    return seen


def _output_of(gm, path, x):
    """The output of the converted graph's node for module ``path`` as it was produced (a
    pooling module is the F.max_pool2d normalize wrote, which keeps the module's path)."""
    (node,) = [n for n in gm.graph.nodes if n.op.startswith("call_")
               and qinfo(n).module_path == path and n.target is not torch.quantize_per_tensor
               and qinfo(n).role not in ("quantize", "dequantize", "observer")]
    seen = {}

    class Run(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is node:
                seen[path] = (out.dequantize() if out.is_quantized else out).detach().clone()
            return out

    Run(gm).run(x)
    return seen


def _sqnr_by_hand(ref, test):
    ref, test = ref.double(), test.double()
    return 10 * math.log10(float((ref * ref).sum()) / float(((ref - test) ** 2).sum()))


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_float_values_are_copies_taken_before_in_place_writes(backend):
    model = build(InPlaceReLUs)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend),
                                  (torch.randn(*SHAPE),), backend=backend)
    for batch in calibration_batches(SHAPE, n=3):
        prepared(batch)
    quantized = fxquant.convert_fx(prepared)
    x = calibration_batches(SHAPE, n=1, seed=11)[0]
    # what compare records of the float model, against a separate hooked float run
    fgm = trace(model)
    values, _ = run_and_record(fgm, (x,))
    keys = {str(n.target): k for n, k in value_keys(fgm).items() if n.op == "call_module"}
    float_run = copy.deepcopy(model)
    float_seen = _hooked(float_run, ["conv", "conv2", "pool"])
    float_run(x)
    for name in ("conv", "conv2", "pool"):
        torch.testing.assert_close(values[keys[name]], float_seen[name], rtol=0, atol=0)
    assert float(float_seen["conv"].min()) < 0 and float(float_seen["pool"].min()) < 0
    # the SQNR compare reports for the pool is the one of those float values vs int8's
    torch.backends.quantized.engine = backend
    q_seen = _output_of(quantized, "pool", x)
    result = compare(model, quantized, x)
    assert result.layer("pool").sqnr_db == pytest.approx(
        _sqnr_by_hand(float_seen["pool"], q_seen["pool"]), abs=1e-9)
    assert result.layer("pool").sqnr_db > 25
