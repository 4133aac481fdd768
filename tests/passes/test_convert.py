"""convert: observers → quantize/dequantize with the measured qparams; weighted modules →
reference modules with quantized weights. The result is the reference quantized graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant.backends.cpu import full_range_activations_safe
from fxquant.backends.reference_ops import quantize_qparams
from fxquant.errors import PassFailed
from fxquant.meta import qinfo
from fxquant.passes import Convert
from fxquant.qconfig import QConfigMapping
from tests.passes.graphs import (CONVERT_FACTS, assert_every_call_decided, call_nodes, decisions,
                                 prepared, run_passes, structure)
from tests.passes.graphs import Fn

P, O = "placeholder", "output"


OBS = "call_module:HistogramObserver"
Q, DQ = "call_function:torch.quantize_per_tensor", "call_method:dequantize"
X4 = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))


def convert(model, *inputs, **kw):
    gm, opts = prepared(model, *inputs, **kw)
    before = structure(gm)
    r, _ = run_passes(gm, [Convert()], opts, facts=CONVERT_FACTS)
    assert_every_call_decided(r.gm)
    return before, r


def sqnr(ref, x):
    return float(20 * torch.log10(ref.norm() / (ref - x).norm()))


def test_conv_before_expected():
    model = Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)).eval()
    before, r = convert(model, X4)
    assert before == [P, OBS, "call_module:Conv2d", OBS, O]
    assert structure(r.gm) == [P, Q, DQ, "call_module:Conv2d", Q, DQ, O]
    assert r.modified is True
    assert r.stats == {"quantize_dequantize": 2, "weights_quantized": 1}
    conv = r.gm.get_submodule("conv")
    assert type(conv).__module__ == "fxquant.nn.reference"
    assert not any(n.startswith("activation_post_process") for n, _ in r.gm.named_children())
    assert sqnr(model(X4), r.gm(X4)) > 25


def test_decisions_and_qparams():
    model = Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)).eval()
    _, r = convert(model, X4)
    q_in, dq_in, conv, q_out, dq_out = call_nodes(r.gm)
    for q, dq in ((q_in, dq_in), (q_out, dq_out)):
        (dq_d,) = decisions(q, "convert")
        assert dq_d.action == "quantize" and "scale=" in dq_d.reason and "quint8" in dq_d.reason
        scale, zp, dtype = quantize_qparams(q)
        assert dq_d.detail == {"scale": scale, "zero_point": zp, "dtype": dtype}
        assert isinstance(scale, float) and scale > 0 and 0 <= zp <= 255 and dtype == torch.quint8
        assert [d.action for d in decisions(dq)] == ["dequantize"]
        assert qinfo(q).role == "quantize" and qinfo(dq).role == "dequantize"
        assert qinfo(q).qparams == qinfo(dq).qparams == dq_d.detail
    (w,) = decisions(conv, "convert")
    assert w.action == "quantize_weight"
    assert w.reason == "weight qint8 per_channel_symmetric (4 scales); reference module Conv2d"
    assert qinfo(conv).qparams == qinfo(q_out).qparams  # the op knows its output qparams
    # x86 default: 7-bit (reduce_range) activations, zero points inside 0..127, on CPUs whose
    # kernels saturate int16 sums; full 8-bit on VNNI CPUs (the input observer says which)
    top = 255 if full_range_activations_safe("x86") else 127
    scale_in, zp_in, _ = quantize_qparams(q_in)
    assert zp_in <= top and scale_in * (top - zp_in) >= 0.9 * float(X4.max())
    # the qparams are buffers: state_dict carries them, exactly
    _, s_node, z_node, _ = q_in.args
    state = r.gm.state_dict()
    assert state[s_node.target].dtype == torch.float64 and state[s_node.target].item() == \
        quantize_qparams(q_in)[0]
    assert state[z_node.target].item() == quantize_qparams(q_in)[1]


def test_shared_observer_gives_identical_qparams():
    model = Fn(lambda s, x: s.pool(s.conv(x)), conv=nn.Conv2d(3, 4, 3), pool=nn.MaxPool2d(2))
    before, r = convert(model.eval(), X4)
    assert structure(r.gm) == [P, Q, DQ, "call_module:Conv2d", Q, DQ, "call_function:F.max_pool2d",
                               Q, DQ, O]
    qs = [n for n in call_nodes(r.gm) if n.target is torch.quantize_per_tensor]
    assert quantize_qparams(qs[1]) == quantize_qparams(qs[2])
    assert r.stats == {"quantize_dequantize": 3, "weights_quantized": 1}


def test_group_add_relu_reference():
    class M(nn.Module):
        def forward(self, x, y):
            return F.relu(x + y)

    a, b = torch.randn(2, 4), torch.randn(2, 4)
    before, r = convert(M(), a, b)
    assert structure(r.gm) == [P, Q, DQ, P, Q, DQ, "call_function:torch.add",
                               "call_function:F.relu", Q, DQ, O]
    assert r.stats == {"quantize_dequantize": 3}
    assert sqnr(F.relu(a + b), r.gm(a, b)) > 25


def test_uncalibrated_observer_fails_naming_pass_and_fix():
    model = Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)).eval()
    gm, opts = prepared(model, X4, calibrate=False)
    with pytest.raises(PassFailed) as e:
        run_passes(gm, [Convert()], opts, facts=CONVERT_FACTS)
    err = e.value
    assert err.pass_name == "convert"
    assert "saw no data" in str(err) and "not calibrated" in str(err)
    assert "representative inputs before convert_fx" in err.hint
    assert err.node_name.startswith("activation_post_process")


def test_unchanged_graph_when_nothing_was_observed():
    model = Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)).eval()
    before, r = convert(model, X4, mapping=QConfigMapping())
    assert structure(r.gm) == before == [P, "call_module:Conv2d", O]
    assert r.modified is False and r.stats == {}
    assert type(r.gm.get_submodule("conv")) is nn.Conv2d


def test_requires_observed():
    from fxquant.errors import FxQuantError
    from fxquant.pipeline import PassManager

    with pytest.raises(FxQuantError, match="'convert' requires \\['observed'\\]"):
        PassManager([Convert()], initial_facts={"traced"})


def test_before_expected_on_a_model():
    from tests.models import MLP, build

    model = build(MLP)
    x = torch.randn(8, 32)
    before, r = convert(model, x)
    assert structure(r.gm) == [P, Q, DQ, "call_module:LinearReLU", Q, DQ, "call_module:Linear",
                               Q, DQ, "call_module:Linear", Q, DQ, O]
    assert r.stats == {"quantize_dequantize": 4, "weights_quantized": 3}
    assert sqnr(model(x), r.gm(x)) > 20
