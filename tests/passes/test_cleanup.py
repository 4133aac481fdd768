"""cleanup: drop dequantize → quantize pairs that give back the same quantized tensor, remove
q/dq nodes nobody reads, delete unused submodules, recompile."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.backends.reference_ops import insert_dequantize, insert_quantize
from fxquant.meta import QNodeInfo, qinfo, record
from fxquant.passes import Cleanup, Convert, LowerToBackend
from tests.passes.graphs import (CONVERT_FACTS, assert_every_call_decided, call_nodes, prepared,
                                 run_passes, structure)
from tests.passes.graphs import Fn

P, O = "placeholder", "output"
Q, DQ = "call_function:torch.quantize_per_tensor", "call_method:dequantize"


FACTS = CONVERT_FACTS + ("reference", "lowered")
X4 = torch.randn(2, 3, 6, 6)


def cleanup(gm, opts=None):
    r, _ = run_passes(gm, [Cleanup()], opts or {}, facts=FACTS)
    return r


def _role(node, role, **qparams):
    node.meta["fxquant"] = QNodeInfo(role=role, qparams=qparams or None)
    record(node, "test", role, "built by hand")
    return node


def requantize_graph(scale2=0.1, zp2=3, kernel=False):
    """x → q(0.1, 3) [→ quantized::add(q, q) with known qparams] → dq → q(scale2, zp2) → dq."""
    g = fx.Graph()
    x = g.placeholder("x")
    q = _role(insert_quantize(g, x, 0.1, 3, torch.quint8), "quantize")
    src = q
    if kernel:
        src = g.call_function(torch.ops.quantized.add, (q, q, 0.1, 3))
        src.meta["fxquant"] = QNodeInfo(role="op", kernel="quantized::add",
                                        qparams={"scale": 0.1, "zero_point": 3,
                                                 "dtype": torch.quint8})
        record(src, "test", "lower", "built by hand")
    dq = _role(insert_dequantize(g, src), "dequantize")
    q2 = _role(insert_quantize(g, dq, scale2, zp2, torch.quint8), "quantize")
    g.output(_role(insert_dequantize(g, q2), "dequantize"))
    return fx.GraphModule(nn.Module(), g)


def test_dequantize_quantize_pair_with_same_qparams_is_dropped():
    gm = requantize_graph()
    x = torch.randn(3, 4)
    want = gm(x)
    assert structure(gm) == [P, Q, DQ, Q, DQ, O]
    r = cleanup(gm)
    assert structure(r.gm) == [P, Q, DQ, O]
    assert r.modified is True and r.stats == {"dq_q_removed": 1, "dead_removed": 1}
    assert torch.equal(r.gm(x), want)


def test_pair_after_a_lowered_kernel_with_the_same_qparams_is_dropped():
    gm = requantize_graph(kernel=True)
    x = torch.randn(3, 4)
    want = gm(x)
    r = cleanup(gm)
    assert structure(r.gm) == [P, Q, "call_function:torch.ops.quantized.add", DQ, O]
    assert r.stats == {"dq_q_removed": 1, "dead_removed": 1}
    assert torch.equal(r.gm(x), want)


def test_negative_pair_with_other_qparams_is_kept():
    for scale2, zp2 in ((0.2, 3), (0.1, 4)):
        gm = requantize_graph(scale2, zp2)
        before = structure(gm)
        r = cleanup(gm)
        assert structure(r.gm) == before
        assert r.modified is False and r.stats == {}


def test_negative_pair_after_kernel_with_other_qparams_is_kept():
    gm = requantize_graph(0.05, 3, kernel=True)
    before = structure(gm)
    r = cleanup(gm)
    assert structure(r.gm) == before and r.modified is False


def test_dead_dequantize_after_lowering_is_removed():
    model = Fn(lambda s, x: s.pool(s.conv(x)), conv=nn.Conv2d(3, 4, 1), pool=nn.MaxPool2d(2))
    gm, opts = prepared(model, X4)
    low, _ = run_passes(gm, [Convert(), LowerToBackend()], opts, facts=CONVERT_FACTS)
    want = low.gm(X4)
    assert structure(low.gm) == [P, Q, DQ, "call_module:Conv2d", DQ, "call_function:F.max_pool2d",
                                 DQ, O]
    r = cleanup(low.gm, opts)
    assert structure(r.gm) == [P, Q, "call_module:Conv2d", "call_function:F.max_pool2d", DQ, O]
    # two dead DQs, and the scale / zero-point get_attr nodes of the two folded quantizes
    assert r.modified is True and r.stats == {"dead_removed": 2 + 2 * 2}
    assert_every_call_decided(r.gm)
    assert torch.equal(r.gm(X4), want)
    assert "dequantize" not in r.gm.code.split("conv")[0]  # recompiled


def test_dead_float_ops_are_not_its_business():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            torch.cumsum(x, 1)  # dead, but not a q/dq node
            return self.conv(x)

    gm, opts = prepared(M(), X4)
    ref, _ = run_passes(gm, [Convert()], opts, facts=CONVERT_FACTS)
    r = cleanup(ref.gm, opts)
    assert "call_function:torch.cumsum" in structure(r.gm)


def test_unchanged_graph_reference_pipeline():
    """convert_to_reference = convert + cleanup: a conv's reference graph has nothing to clean."""
    gm, opts = prepared(Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 1)), X4)
    ref, _ = run_passes(gm, [Convert()], opts, facts=CONVERT_FACTS)
    before = structure(ref.gm)
    r = cleanup(ref.gm, opts)
    assert structure(r.gm) == before == [P, Q, DQ, "call_module:Conv2d", Q, DQ, O]
    assert r.modified is False and r.stats == {}


def test_cleanup_of_full_convert_pipeline_on_a_model():
    from tests.models import PlainCNN, build

    model = build(PlainCNN)
    x = torch.randn(2, 3, 16, 16)
    gm, opts = prepared(model, x)
    low, _ = run_passes(gm, [Convert(), LowerToBackend()], opts, facts=CONVERT_FACTS)
    r = cleanup(low.gm, opts)
    assert structure(r.gm) == [P, Q, "call_module:ConvReLU2d", "call_function:F.max_pool2d",
                               "call_module:Conv2d", "call_function:F.max_pool2d", "call_function:F.relu6",
                               "call_function:F.adaptive_avg_pool2d", "call_function:torch.flatten",
                               "call_module:Linear", DQ, O]
    # the DQ before each of the 8 lowered ops, and the scale / zero-point get_attr nodes of the
    # 8 quantize nodes that lowering folded into the kernels
    assert r.stats == {"dead_removed": 8 + 2 * 8}
    assert [k for k in r.gm.state_dict() if k.endswith((".scale", ".zero_point"))
            and "qparams" in k] == ["x_qparams.scale", "x_qparams.zero_point"]
    assert all(qinfo(n).role != "dequantize" or n.users for n in call_nodes(r.gm))


def test_pair_around_an_in_place_write_is_kept():
    """x → q → dq; dq[:, :2].mul_(2); q(dq) with the same qparams: the second quantize reads the
    written tensor, so dropping it would drop the write."""
    g = fx.Graph()
    x = g.placeholder("x")
    q = _role(insert_quantize(g, x, 0.1, 3, torch.quint8), "quantize")
    dq = _role(insert_dequantize(g, q), "dequantize")
    view = g.call_function(operator.getitem, (dq, (slice(None), slice(0, 2))))
    g.call_method("mul_", (view, 2))
    q2 = _role(insert_quantize(g, dq, 0.1, 3, torch.quint8), "quantize")
    g.output(_role(insert_dequantize(g, q2), "dequantize"))
    gm = fx.GraphModule(nn.Module(), g)
    x = torch.linspace(0.1, 1.2, 12).reshape(3, 4)
    plain = torch.quantize_per_tensor(x, 0.1, 3, torch.quint8).dequantize()
    want = torch.cat([2 * plain[:, :2], plain[:, 2:]], 1)
    torch.testing.assert_close(gm(x), want)
    r = cleanup(gm)
    assert sum(1 for n in r.gm.graph.nodes if n.target is torch.quantize_per_tensor) == 2
    assert "dq_q_removed" not in r.stats
    torch.testing.assert_close(r.gm(x), want)
