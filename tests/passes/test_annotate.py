"""annotate: the policy. Per op node, from its qconfig and the backend's rule table: input specs,
weight spec, output spec (own / shared / fixed / none), or a keep_float decision with the reason.
The graph never changes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant.backends.base import FIXED, Rule
from fxquant.backends.registry import get_backend
from fxquant.errors import PassFailed
from fxquant.meta import QSpec, SharedSpec, qinfo
from fxquant.passes import Annotate, Fuse, Normalize, PropagateQConfig
from fxquant.patterns import Op
from fxquant.qconfig import (QConfig, QConfigMapping, default_dynamic_qconfig,
                             get_default_qconfig, get_default_qconfig_mapping)
from fxquant.trace import TraceConfig, record_values, trace
from tests.passes.graphs import (assert_every_call_decided, call_nodes, decisions, run_passes,
                                 structure, traced)
from tests.passes.graphs import Fn, Fn2

QU8, QI8 = torch.quint8, torch.qint8


def annotate(model, *inputs, mapping=None, backend="x86", leaf=()):
    model = model.eval()
    if leaf:
        gm = trace(model, TraceConfig(leaf_classes=tuple(leaf)))
        record_values(gm, tuple(inputs))
    else:
        gm = traced(model, *inputs)
    mapping = mapping if mapping is not None else get_default_qconfig_mapping("x86")
    opts = {"qconfig_mapping": mapping, "backend": backend}
    prefix, _ = run_passes(gm, [Normalize(), Fuse(), PropagateQConfig()], opts)
    before = structure(prefix.gm)
    r, _ = run_passes(prefix.gm, [Annotate()], opts, facts={"qconfig"})
    assert structure(r.gm) == before
    assert r.modified is False
    assert_every_call_decided(r.gm, "annotate")
    return r


def ann(node):
    (d,) = decisions(node, "annotate")
    return d


def node_of(gm, kind):
    from tests.passes.graphs import one

    op, _, k = kind.partition(":")
    return one(gm, op, k)


X4 = torch.randn(2, 3, 6, 6)
A, B = torch.randn(2, 4), torch.randn(2, 4)

# ------------------------------------------------------------------------------------ weighted


def test_weighted_conv_positive():
    r = annotate(Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)), X4)
    conv = node_of(r.gm, "call_module:Conv2d")
    info = qinfo(conv)
    assert info.rule == "conv2d"
    assert list(info.input_specs) == [0] and info.input_specs[0].dtype == QU8
    assert info.weight_spec.dtype == QI8 and info.weight_spec.qscheme == torch.per_channel_symmetric
    assert isinstance(info.output_spec, QSpec) and info.output_spec.dtype == QU8
    d = ann(conv)
    assert d.action == "quantize" and d.detail["kernel"] == "quantized::conv2d"
    assert d.reason == ("quantized::conv2d: input quint8, weight qint8 per_channel_symmetric, "
                        "own output qparams")
    assert r.stats == {"quantized": 1}


def test_weighted_negative_no_weight_observer():
    qc = QConfig(get_default_qconfig("x86").activation, None)
    r = annotate(Fn(lambda s, x: s.fc(x), fc=nn.Linear(4, 4)), A,
                 mapping=QConfigMapping().set_global(qc))
    fc = node_of(r.gm, "call_module:Linear")
    assert ann(fc).action == "keep_float"
    assert ann(fc).reason == "qconfig has no weight observer for a weighted op"
    assert qinfo(fc).input_specs == {} and qinfo(fc).output_spec is None
    assert r.stats == {"kept_float": 1}


def test_conv_transpose_positive_per_tensor_and_negative_per_channel():
    model = Fn(lambda s, x: s.up(x), up=nn.ConvTranspose2d(3, 3, 2))
    r = annotate(model, X4)  # the default mapping gives ConvTranspose per-tensor weights
    up = node_of(r.gm, "call_module:ConvTranspose2d")
    assert ann(up).action == "quantize"
    assert qinfo(up).weight_spec.qscheme == torch.per_tensor_symmetric
    r = annotate(model, X4, mapping=QConfigMapping().set_global(get_default_qconfig("x86")))
    up = node_of(r.gm, "call_module:ConvTranspose2d")
    assert ann(up).action == "keep_float"
    assert "per-tensor weights only" in ann(up).reason
    assert qinfo(up).rule is None and qinfo(up).input_specs == {}


# -------------------------------------------------------------------------------------- shared


@pytest.mark.parametrize("factory,kind", [
    (lambda: Fn(lambda s, x: s.pool(x), pool=nn.MaxPool2d(2)), "call_function:F.max_pool2d"),
    (lambda: Fn(lambda s, x: s.pool(x), pool=nn.AdaptiveAvgPool2d(1)),
     "call_function:F.adaptive_avg_pool2d"),
    (lambda: Fn(lambda s, x: F.relu(x)), "call_function:F.relu"),
    (lambda: Fn(lambda s, x: torch.flatten(x, 1)), "call_function:torch.flatten"),
    (lambda: Fn(lambda s, x: s.act(x), act=nn.ReLU6()), "call_function:F.relu6"),
    (lambda: Fn(lambda s, x: F.hardtanh(x)), "call_function:F.hardtanh"),
], ids=["maxpool", "adaptive_avg_pool", "relu", "flatten", "relu6", "hardtanh"])
def test_shared_positive(factory, kind):
    r = annotate(factory(), X4)
    node = node_of(r.gm, kind)
    info = qinfo(node)
    assert info.output_spec == SharedSpec(0)
    assert list(info.input_specs) == [0] and info.weight_spec is None
    assert ann(node).action == "share_qparams"
    assert "shares the input's scale/zero_point" in ann(node).reason


def test_shared_negative_qconfig_none():
    mapping = get_default_qconfig_mapping("x86").set_object_type(nn.MaxPool2d, None)
    r = annotate(Fn(lambda s, x: s.pool(x), pool=nn.MaxPool2d(2)), X4, mapping=mapping)
    pool = node_of(r.gm, "call_function:F.max_pool2d")
    assert ann(pool).action == "keep_float"
    assert ann(pool).reason == "qconfig is None (object_type nn.MaxPool2d → None)"
    assert qinfo(pool).output_spec is None and qinfo(pool).input_specs == {}


# ------------------------------------------------------------------------------ own: add, cat


@pytest.mark.parametrize("fn,kind,kernel", [
    (lambda s, x, y: x + y, "call_function:torch.add", "quantized::add"),
    (lambda s, x, y: x.mul(y), "call_function:torch.mul", "quantized::mul"),
    # broadcasting operands (squeeze-excite gating): quantized too since issue 10, lowering's
    # numeric check keeps a wrong kernel float (tests/test_speed_native.py)
    (lambda s, x, y: x * y[:1], "call_function:torch.mul", "quantized::mul"),
], ids=["add", "mul", "broadcast"])
def test_binary_positive(fn, kind, kernel):
    r = annotate(Fn2(fn), A, B)
    node = node_of(r.gm, kind)
    info = qinfo(node)
    assert sorted(info.input_specs) == [0, 1]
    assert isinstance(info.output_spec, QSpec) and info.output_spec.dtype == QU8
    assert ann(node).action == "quantize" and ann(node).detail["kernel"] == kernel


@pytest.mark.parametrize("fn,why", [
    (lambda s, x, y: x + x.size(1), "tensor-scalar form"),
], ids=["tensor-scalar"])
def test_binary_negative(fn, why):
    r = annotate(Fn2(fn), A, B)
    node = next(n for n in call_nodes(r.gm) if n.target in (torch.add, torch.mul))
    assert ann(node).action == "keep_float" and why in ann(node).reason
    assert qinfo(node).input_specs == {} and qinfo(node).output_spec is None


def test_cat_positive_list_slots():
    r = annotate(Fn2(lambda s, x, y: torch.cat([x, y], 1)), A, B)
    cat = node_of(r.gm, "call_function:torch.cat")
    assert sorted(qinfo(cat).input_specs) == [(0, 0), (0, 1)]
    assert ann(cat).action in ("quantize", "share_qparams")
    assert ann(cat).detail["rule"] == "cat"


def test_cat_negative_integer_tensors():
    r = annotate(Fn2(lambda s, x, y: torch.cat([x.long(), y.long()], 1)), A, B)
    cat = node_of(r.gm, "call_function:torch.cat")
    assert ann(cat).action == "keep_float"
    assert ann(cat).reason == "produces a torch.int64 tensor; only float tensors are quantized"


# -------------------------------------------------------------------------------------- groups


def test_group_add_relu_positive():
    r = annotate(Fn2(lambda s, x, y: F.relu(x + y)), A, B)
    add = node_of(r.gm, "call_function:torch.add")
    relu = node_of(r.gm, "call_function:F.relu")
    assert ann(add).action == "quantize_inputs"
    assert sorted(qinfo(add).input_specs) == [0, 1] and qinfo(add).output_spec is None
    assert ann(relu).action == "quantize" and "fused add group" in ann(relu).reason
    assert qinfo(relu).rule == "add" and isinstance(qinfo(relu).output_spec, QSpec)
    assert qinfo(relu).input_specs == {}  # the relu's input stays inside the kernel
    assert r.stats == {"quantized": 2}


def test_group_negative_interior_float_root_is_annotated_alone():
    r = annotate(Fn2(lambda s, x, y: F.relu(x + x.size(1))), A, B)
    add = node_of(r.gm, "call_function:torch.add")
    relu = node_of(r.gm, "call_function:F.relu")
    assert qinfo(add).group is not None and qinfo(add).group == qinfo(relu).group
    assert ann(add).action == "keep_float"
    assert ann(relu).action == "share_qparams"  # a plain relu on an observed float input
    assert qinfo(relu).output_spec == SharedSpec(0)


def test_group_negative_qconfig_none_on_relu_keeps_root_float():
    mapping = get_default_qconfig_mapping("x86").set_object_type(F.relu, None)
    r = annotate(Fn2(lambda s, x, y: F.relu(x + y)), A, B, mapping=mapping)
    relu = node_of(r.gm, "call_function:F.relu")
    assert ann(relu).action == "keep_float" and "qconfig is None" in ann(relu).reason


# --------------------------------------------------------------------------------- keep_float


class Leaf(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class KeepFloat(nn.Module):
    def __init__(self):
        super().__init__()
        self.leaf = Leaf()

    def forward(self, x):
        v, i = torch.sort(x, dim=1)
        t = torch.topk(x, 2, dim=1)
        return self.leaf(x), i, t.values, x.size(0) * 2, torch.cumsum(v, 1)


def test_keep_float_reasons():
    r = annotate(KeepFloat(), A, leaf=(Leaf,))
    want = {
        "call_function:torch.sort": "produces a sort of tensors; no quantized kernel for "
                                    "torch.sort",
        "call_function:torch.topk": "produces a topk of tensors; no quantized kernel for "
                                    "torch.topk",
        "call_module:Leaf": "no quantized kernel for Leaf on x86",
        "call_method:size": "produces int, not a tensor; not quantized",
        "call_function:operator.mul": "produces int, not a tensor; not quantized",
        "call_function:torch.cumsum": "no quantized kernel for torch.cumsum on x86",
    }
    for kind, reason in want.items():
        node = node_of(r.gm, kind)
        assert ann(node).action == "keep_float" and ann(node).reason == reason, kind
        assert qinfo(node).input_specs == {} and qinfo(node).output_spec is None
    getitems = [n for n in call_nodes(r.gm) if getattr(n.target, "__name__", "") == "getitem"]
    idx = next(n for n in getitems if n.args[1] == 1)
    assert ann(idx).reason == "produces a torch.int64 tensor; only float tensors are quantized"
    assert r.stats == {"kept_float": len(call_nodes(r.gm))}


def test_dynamic_qconfig_positive_weight_only_spec():
    r = annotate(Fn(lambda s, x: s.fc(x), fc=nn.Linear(4, 4)), A,
                 mapping=QConfigMapping().set_global(default_dynamic_qconfig))
    fc = node_of(r.gm, "call_module:Linear")
    info = qinfo(fc)
    assert ann(fc).action == "dynamic" and info.qkind == "dynamic"
    assert ann(fc).reason == ("quantized::linear_dynamic: weight qint8 per_tensor_symmetric, "
                              "activations quantized at run time")
    assert info.input_specs == {} and info.output_spec is None  # no activation observers
    assert info.weight_spec.dtype == QI8


def test_dynamic_qconfig_negative_no_dynamic_kernel():
    r = annotate(Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 1)), X4,
                 mapping=QConfigMapping().set_global(default_dynamic_qconfig))
    conv = node_of(r.gm, "call_module:Conv2d")
    assert ann(conv).action == "keep_float"
    assert ann(conv).reason == "no dynamic kernel for Conv2d on x86"
    assert qinfo(conv).weight_spec is None


def test_keep_float_activation_dtype_without_kernel_family():
    from fxquant.qconfig import float16_static_qconfig

    r = annotate(Fn(lambda s, x: s.fc(x), fc=nn.Linear(4, 4)), A,
                 mapping=QConfigMapping().set_global(float16_static_qconfig))
    fc = node_of(r.gm, "call_module:Linear")
    assert ann(fc).action == "keep_float"
    assert ann(fc).reason.startswith("activation float16: no kernel family for this qconfig")


# ------------------------------------------------------------------------ fixed qparams, backend


def test_fixed_qparams_through_a_backend_rule():
    backend = get_backend("x86").extended(
        Rule("test_sigmoid_fixed", Op(torch.sigmoid), FIXED, "quantized::sigmoid", fixed=(1.0 / 256, 0)),
        name="x86+sigmoid")
    r = annotate(Fn(lambda s, x: torch.sigmoid(x)), A, backend=backend)
    sig = node_of(r.gm, "call_function:torch.sigmoid")
    spec = qinfo(sig).output_spec
    assert isinstance(spec, QSpec) and spec.fixed == (1.0 / 256, 0) and spec.dtype == QU8
    assert ann(sig).action == "fixed_qparams"
    assert "scale=0.00390625, zp=0" in ann(sig).reason


def test_unknown_backend_fails_naming_the_pass():
    model = Fn(lambda s, x: s.fc(x), fc=nn.Linear(4, 4)).eval()
    gm = traced(model, A)
    opts = {"qconfig_mapping": get_default_qconfig_mapping("x86"), "backend": "no-such-backend"}
    with pytest.raises(PassFailed) as e:
        run_passes(gm, [Normalize(), Fuse(), PropagateQConfig(), Annotate()], opts)
    assert e.value.pass_name == "annotate" and "no-such-backend" in str(e.value)
    assert e.value.before == ("normalize", "fuse", "propagate_qconfig")


# ---------------------------------------------------------------------------------- whole pass


def test_before_expected_on_a_model():
    from tests.models import TinyResNet, build

    r = annotate(build(TinyResNet), torch.randn(2, 3, 8, 8))
    actions = [(structure_of(r.gm, n), ann(n).action) for n in call_nodes(r.gm)]
    assert actions == [
        ("call_module:ConvReLU2d", "quantize"),
        ("call_module:ConvReLU2d", "quantize"), ("call_module:Conv2d", "quantize"),
        ("call_function:torch.add", "quantize_inputs"), ("call_function:F.relu", "quantize"),
        ("call_module:ConvReLU2d", "quantize"), ("call_module:Conv2d", "quantize"),
        ("call_function:torch.add", "quantize_inputs"), ("call_function:F.relu", "quantize"),
        ("call_function:F.adaptive_avg_pool2d", "share_qparams"),
        ("call_function:torch.flatten", "share_qparams"),
        ("call_module:Linear", "quantize"),
    ]
    assert r.stats == {"quantized": 12}


def structure_of(gm, node):
    from tests.passes.graphs import target_str

    return f"{node.op}:{target_str(node)}"


def test_unchanged_graph_all_float():
    r = annotate(Fn(lambda s, x: s.fc(x), fc=nn.Linear(4, 4)), A, mapping=QConfigMapping())
    assert r.modified is False and r.stats == {"kept_float": 1}
