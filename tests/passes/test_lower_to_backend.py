"""lower_to_backend: reference patterns (dequantize → op → quantize) become the backend's
kernels through its rule table; a declined pattern stays a correct reference op with the
reason recorded."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant.backends.base import FIXED, Rule
from fxquant.backends.registry import get_backend
from fxquant.errors import PassFailed
from fxquant.meta import qinfo
from fxquant.passes import Convert, LowerToBackend
from fxquant.patterns import Op
from fxquant.qconfig import QConfigMapping
from tests.passes.graphs import (CONVERT_FACTS, assert_every_call_decided, call_nodes, decisions,
                                 prepared, run_passes, structure)
from tests.passes.graphs import Fn, Fn2

P, O = "placeholder", "output"
Q, DQ = "call_function:torch.quantize_per_tensor", "call_method:dequantize"


X4 = torch.randn(2, 3, 6, 6)
A, B = torch.randn(2, 4), torch.randn(2, 4)


def lower(model, *inputs, backend="x86", **kw):
    """prepare + calibrate + convert, then lower. Returns (reference structure, reference
    output, result)."""
    gm, opts = prepared(model, *inputs, backend=backend, **kw)
    ref, _ = run_passes(gm, [Convert()], opts, facts=CONVERT_FACTS)
    ref_structure, ref_out = structure(ref.gm), ref.gm(*inputs)
    r, _ = run_passes(ref.gm, [LowerToBackend()], opts, facts=CONVERT_FACTS + ("reference",))
    assert_every_call_decided(r.gm)
    return ref_structure, ref_out, r


def lowered_nodes(gm):
    return [n for n in call_nodes(gm) if decisions(n, "lower_to_backend", "lower")]


def quantum(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return qinfo(out.args[0]).qparams["scale"]


def close_to_reference(r, ref_out, *inputs):
    """The kernels compute what the reference graph computes, within one output step."""
    got = r.gm(*inputs)
    assert (got - ref_out).abs().max() <= quantum(r.gm) * 1.01


def test_conv_before_expected():
    ref_s, ref_out, r = lower(Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)), X4)
    assert ref_s == [P, Q, DQ, "call_module:Conv2d", Q, DQ, O]
    # the dequantize before the conv loses its user; cleanup removes it
    assert structure(r.gm) == [P, Q, DQ, "call_module:Conv2d", DQ, O]
    assert r.modified is True and r.stats == {"lowered": 1}
    conv = r.gm.get_submodule("conv")
    assert type(conv).__module__ == "fxquant.nn.quantized"
    (node,) = lowered_nodes(r.gm)
    d = decisions(node, "lower_to_backend", "lower")[0]
    assert d.reason == "runs on quantized::conv2d"
    assert qinfo(node).kernel == "quantized::conv2d"
    assert node.args[0].target is torch.quantize_per_tensor  # reads the quantized input
    close_to_reference(r, ref_out, X4)


@pytest.mark.parametrize("fn,kernel", [
    (lambda s, x, y: x + y, "torch.ops.quantized.add"),
    (lambda s, x, y: F.relu(x + y), "torch.ops.quantized.add_relu"),
    (lambda s, x, y: x * y, "torch.ops.quantized.mul"),
    (lambda s, x, y: F.relu(torch.mul(x, y)), "torch.ops.quantized.mul_relu"),
], ids=["add", "add_relu", "mul", "mul_relu"])
def test_binary_kernels(fn, kernel):
    _, ref_out, r = lower(Fn2(fn), A, B)
    assert structure(r.gm) == [P, Q, DQ, P, Q, DQ, f"call_function:{kernel}", DQ, O]
    assert r.stats == {"lowered": 1}
    (node,) = lowered_nodes(r.gm)
    name = kernel.rsplit(".", 1)[1]
    assert qinfo(node).kernel == f"quantized::{name}"
    if "relu" in kernel:
        assert len(qinfo(node).fused_from) == 2
    close_to_reference(r, ref_out, A, B)


@pytest.mark.parametrize("factory,kind", [
    (lambda: Fn(lambda s, x: s.pool(s.conv(x)), conv=nn.Conv2d(3, 4, 1), pool=nn.MaxPool2d(2)),
     "call_function:F.max_pool2d"),
    (lambda: Fn(lambda s, x: s.act(s.conv(x)), conv=nn.Conv2d(3, 4, 1),
                act=nn.Hardtanh(0.5, 2.0)),  # 0 outside [0.5, 2]: not fused into the conv
     "call_function:F.hardtanh"),
    (lambda: Fn(lambda s, x: torch.flatten(s.conv(x), 1), conv=nn.Conv2d(3, 4, 1)),
     "call_function:torch.flatten"),
], ids=["maxpool", "relu6", "flatten"])
def test_shared_op_runs_on_the_quantized_tensor(factory, kind):
    _, ref_out, r = lower(factory(), X4)
    assert structure(r.gm) == [P, Q, DQ, "call_module:Conv2d", DQ, kind, DQ, O]  # dead DQs: cleanup
    assert r.stats == {"lowered": 2}
    conv, op = lowered_nodes(r.gm)
    assert op.args[0] is conv
    assert qinfo(op).kernel.endswith("on the quantized tensor")
    close_to_reference(r, ref_out, X4)


def test_cat_kernel():
    _, ref_out, r = lower(Fn2(lambda s, x, y: torch.cat([x, y], 1)), A, B)
    assert r.stats == {"lowered": 1}
    (node,) = lowered_nodes(r.gm)
    assert all(a.target is torch.quantize_per_tensor for a in node.args[0])  # quantized inputs
    assert "cat" in qinfo(node).kernel
    close_to_reference(r, ref_out, A, B)


class ViewAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1))


def test_view_after_lowered_conv_still_runs():
    _, ref_out, r = lower(ViewAfterConv(), X4)
    close_to_reference(r, ref_out, X4)
    # view runs on the quantized (channels-last) conv output as reshape, which can take it
    assert "call_method:reshape" in structure(r.gm) and "call_method:view" not in structure(r.gm)


def test_negative_rule_without_lowering_keeps_reference_with_reason():
    backend = get_backend("x86").extended(
        Rule("test_sigmoid_no_lowering", Op(torch.sigmoid), FIXED, "quantized::sigmoid", fixed=(1.0 / 256, 0)),
        name="x86-test-sigmoid")
    ref_s, ref_out, r = lower(Fn(lambda s, x: torch.sigmoid(x)), A, backend=backend)
    assert structure(r.gm) == ref_s == [P, Q, DQ, "call_function:torch.sigmoid", Q, DQ, O]
    assert r.modified is False and r.stats == {"kept_reference": 1}
    sig = call_nodes(r.gm)[2]
    (d,) = decisions(sig, "lower_to_backend")
    assert d.action == "keep_reference"
    assert d.reason == ("not lowered, runs in float between dequantize/quantize: the rule has no "
                        "lowering")
    torch.testing.assert_close(r.gm(A), ref_out)


def test_negative_kernel_missing_on_engine_keeps_reference():
    """qnnpack has no quantized max_pool3d: the probe sees it and the pool stays reference."""
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("qnnpack engine not built")
    model = Fn(lambda s, x: s.pool(s.conv(x)), conv=nn.Conv3d(2, 2, 1), pool=nn.MaxPool3d(2))
    x = torch.randn(1, 2, 4, 4, 4)
    _, ref_out, r = lower(model, x, backend="qnnpack")
    assert r.stats == {"lowered": 1, "kept_reference": 1}
    pool = next(n for n in call_nodes(r.gm) if qinfo(n).module_path == "pool")
    (d,) = decisions(pool, "lower_to_backend")
    assert d.action == "keep_reference" and "has no quantized kernel on this engine" in d.reason
    assert pool.target is F.max_pool3d and qinfo(pool).original is nn.MaxPool3d
    torch.backends.quantized.engine = "qnnpack"
    close_to_reference(r, ref_out, x)


def test_unchanged_graph_when_nothing_is_quantized():
    ref_s, _, r = lower(Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)), X4,
                        mapping=QConfigMapping())
    assert structure(r.gm) == ref_s == [P, "call_module:Conv2d", O]
    assert r.modified is False and r.stats == {}


def test_before_expected_on_a_model():
    from tests.models import TinyResNet, build

    x = torch.randn(2, 3, 8, 8)
    _, ref_out, r = lower(build(TinyResNet), x)
    kinds = [s for s in structure(r.gm) if s != DQ]
    assert kinds == [P, Q, "call_module:ConvReLU2d",
                     "call_module:ConvReLU2d", "call_module:Conv2d",
                     "call_function:torch.ops.quantized.add_relu",
                     "call_module:ConvReLU2d", "call_module:Conv2d",
                     "call_function:torch.ops.quantized.add_relu",
                     "call_function:F.adaptive_avg_pool2d", "call_function:torch.flatten",
                     "call_module:Linear", O]
    assert r.stats == {"lowered": 10}
    close_to_reference(r, ref_out, x)
