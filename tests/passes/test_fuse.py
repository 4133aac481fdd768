"""fuse: every entry of fxquant.fusion's tables, positive and negative, in eval (BatchNorm
folded) and training (QAT modules) mode; functional groups (add-relu, mul-relu)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant.fusion import default_group_fusions, default_module_fusions
from fxquant.meta import qinfo
from fxquant.passes import Fuse, Normalize
from fxquant.patterns import NoMatch, find_matches
from tests.models import _randomize_bn
from tests.passes.graphs import (assert_decisions_well_formed, call_nodes, decisions, run_passes,
                                 structure, traced)

P, O = "placeholder", "output"
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPE = {1: (2, 3, 6), 2: (2, 3, 5, 5), 3: (1, 3, 3, 4, 4)}


class Chain3(nn.Module):
    """a → b (→ F.relu). ``leak``: which intermediate is also returned ("a", "b" or None)."""

    def __init__(self, a: nn.Module, b: nn.Module | None, relu: bool, leak: str | None = None):
        super().__init__()
        self.a = a
        if b is not None:
            self.b = b
        self.relu, self.leak = relu, leak

    def forward(self, x):
        ya = self.a(x)
        y = self.b(ya) if hasattr(self, "b") else ya
        yb = y
        if self.relu:
            y = F.relu(y)
        if self.leak == "a":
            return y, ya
        if self.leak == "b":
            return y, yb
        return y


def _conv(d):
    return CONV[d](3, 4, 3, padding=1)


def _convt(d):
    return CONVT[d](3, 4, 2, stride=2)


def _bn(d, n=4):
    return BN[d](n)


def _lin():
    return nn.Linear(3, 4)


def _shape(kind, d):
    return (5, 3) if kind == "linear" else SHAPE[d]


# (id, a factory, b factory or None, relu, training) -> fused class name
CASES = []
for d in (1, 2, 3):
    CASES += [
        (f"conv{d}d_bn_relu", lambda d=d: _conv(d), lambda d=d: _bn(d), True, False,
         f"ConvReLU{d}d", d),
        (f"conv{d}d_bn_relu-train", lambda d=d: _conv(d), lambda d=d: _bn(d), True, True,
         f"ConvBnReLU{d}d", d),
        (f"conv{d}d_bn", lambda d=d: _conv(d), lambda d=d: _bn(d), False, False, f"Conv{d}d", d),
        (f"conv{d}d_bn-train", lambda d=d: _conv(d), lambda d=d: _bn(d), False, True,
         f"ConvBn{d}d", d),
        (f"conv{d}d_relu", lambda d=d: _conv(d), None, True, False, f"ConvReLU{d}d", d),
        (f"conv{d}d_relu-train", lambda d=d: _conv(d), None, True, True, f"ConvReLU{d}d", d),
        (f"convtranspose{d}d_bn", lambda d=d: _convt(d), lambda d=d: _bn(d), False, False,
         f"ConvTranspose{d}d", d),
    ]
for d in (2, 3):
    CASES += [
        (f"bn{d}d_relu", lambda d=d: _bn(d, 3), None, True, False, f"BNReLU{d}d", d),
        (f"bn{d}d_relu-train", lambda d=d: _bn(d, 3), None, True, True, f"BNReLU{d}d", d),
    ]
CASES += [
    ("linear_bn_relu", _lin, lambda: _bn(1), True, False, "LinearReLU", "linear"),
    ("linear_bn", _lin, lambda: _bn(1), False, False, "Linear", "linear"),
    ("linear_bn-train", _lin, lambda: _bn(1), False, True, "LinearBn1d", "linear"),
    ("linear_relu", _lin, None, True, False, "LinearReLU", "linear"),
    ("linear_relu-train", _lin, None, True, True, "LinearReLU", "linear"),
]


def _model(a, b, relu, training, leak=None):
    torch.manual_seed(0)
    m = _randomize_bn(Chain3(a(), b() if b else None, relu, leak))
    return m.train() if training else m.eval()


def _input(d):
    return torch.randn(*_shape("linear" if d == "linear" else "conv", d if d != "linear" else 1))


def fuse(model, x, training):
    gm = traced(model, x)
    gm.train(training)
    before = structure(gm)
    result, ctx = run_passes(gm, [Normalize(), Fuse()], {"is_qat": training})
    assert_decisions_well_formed(result.gm)
    return before, result


CLAMP_FUSIONS = {"conv1d_clamp", "conv2d_clamp", "conv3d_clamp", "linear_clamp",
                 "conv1d_bn_clamp", "conv2d_bn_clamp", "conv3d_bn_clamp", "linear_bn_clamp"}


def test_every_table_entry_has_a_case():
    names = {f.pattern.name for f in default_module_fusions()}
    covered = {c[0].replace("-train", "") for c in CASES} | CLAMP_FUSIONS
    assert names == covered


class WithClamp(nn.Module):
    def __init__(self, core: nn.Module, clamp) -> None:
        super().__init__()
        self.core = core
        self.clamp = clamp

    def forward(self, x):
        return self.clamp(self.core(x))


CLAMPS = {
    "relu6_module": (nn.ReLU6(), True),
    "relu6_function": (F.relu6, True),
    "hardtanh_-1_1": (nn.Hardtanh(-1.0, 1.0), True),
    "hardtanh_function": (lambda x: F.hardtanh(x, -2.0, 3.0), True),
    "clamp_0_4": (lambda x: torch.clamp(x, 0.0, 4.0), True),
    "clamp_method": (lambda x: x.clamp(-1.0, 0.5), True),
    "clamp_1_5": (lambda x: torch.clamp(x, 1.0, 5.0), False),  # 0 outside: no saturation trick
    "clamp_min_only": (lambda x: torch.clamp(x, min=0.0), False),  # no upper bound known
}


@pytest.mark.parametrize("d", [1, 2, 3, "linear"])
@pytest.mark.parametrize("clamp", list(CLAMPS), ids=list(CLAMPS))
def test_clamp_fuses_into_conv_and_linear(d, clamp):
    fn, fusable = CLAMPS[clamp]
    core = _lin() if d == "linear" else _conv(d)
    model = WithClamp(core, fn).eval()
    x = _input(d)
    want = model(x)
    before, r = fuse(model, x, False)
    kinds = [n for n in structure(r.gm) if n.startswith("call_module")]
    expected = "LinearClamp" if d == "linear" else f"ConvClamp{d}d"
    if fusable:
        assert kinds == [f"call_module:{expected}"], kinds
        assert r.stats == {"fused": 1}
    else:
        assert f"call_module:{expected}" not in kinds
    torch.testing.assert_close(r.gm(x), want)


class BnClamp(nn.Module):
    def __init__(self, core: nn.Module, bn: nn.Module, clamp) -> None:
        super().__init__()
        self.core, self.bn, self.clamp = core, bn, clamp

    def forward(self, x):
        return self.clamp(self.bn(self.core(x)))


@pytest.mark.parametrize("d", [1, 2, 3, "linear"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_bn_clamp_fuses_with_bn_folded(d, training):
    """conv/linear + BatchNorm + ReLU6 (MobileNetV2): one ConvClamp / LinearClamp with the
    BatchNorm folded in eval mode; in training (QAT) conv+bn fuse and the clamp stays."""
    core = _lin() if d == "linear" else _conv(d)
    torch.manual_seed(0)
    model = _randomize_bn(BnClamp(core, _bn(1 if d == "linear" else d), nn.ReLU6(inplace=True)))
    model.train(training)
    x = _input(d)
    want = model.eval()(x)
    model.train(training)
    _, r = fuse(model, x, training)
    kinds = [n for n in structure(r.gm) if n.startswith("call_module")]
    if training:
        assert kinds[0] in ("call_module:ConvBn1d", "call_module:ConvBn2d",
                            "call_module:ConvBn3d", "call_module:LinearBn1d"), kinds
        assert "call_function:F.relu6" in structure(r.gm)  # normalize's form of nn.ReLU6
        return
    expected = "LinearClamp" if d == "linear" else f"ConvClamp{d}d"
    assert kinds == [f"call_module:{expected}"], kinds
    (node,) = call_nodes(r.gm)
    (dec,) = decisions(node, "fuse", "fuse")
    assert dec.detail["pattern"].endswith("_bn_clamp") and "BatchNorm folded" in dec.reason
    torch.testing.assert_close(r.gm(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,a,b,relu,training,fused_cls,d", CASES, ids=[c[0] for c in CASES])
def test_module_fusion_positive(name, a, b, relu, training, fused_cls, d):
    model = _model(a, b, relu, training)
    x = _input(d)
    want = model.eval()(x) if not training else None
    model.train(training)
    before, r = fuse(model, x, training)
    expected_before = [P, f"call_module:{type(model.a).__name__}"]
    if b:
        expected_before.append(f"call_module:{type(model.b).__name__}")
    if relu:
        expected_before.append("call_function:F.relu")
    assert before == expected_before + [O]
    assert structure(r.gm) == [P, f"call_module:{fused_cls}", O]
    assert r.modified is True and r.stats == {"fused": 1}
    (node,) = call_nodes(r.gm)
    assert node.target == "a"  # the fused module lives at the first module's path
    if not training:  # bn / relu modules are gone (QAT: see test_qat_fusion_leaves_no_alias)
        assert {n for n, _ in r.gm.named_children()} == {"a"}
    info = qinfo(node)
    assert info.fused_from[0] == "a" and len(info.fused_from) == len(before) - 2
    assert info.debug_handle == len(before) - 2  # the handle of the chain's last (output) node
    (dec,) = decisions(node, "fuse", "fuse")
    assert dec.detail["pattern"] == name.replace("-train", "")
    assert fused_cls in dec.reason
    if not name.startswith("bn"):  # bn-relu: see test_bn_relu_reason_does_not_claim_folding
        assert ("BatchNorm folded" in dec.reason) == (b is not None and not training)
    if not training:  # eval-mode fusion computes the same function
        torch.testing.assert_close(r.gm(x), want, rtol=1e-4, atol=1e-5)


# Negative: the first module's output is also returned. What still fuses (a shorter pattern
# rooted later in the chain) is listed; None: nothing.
def _negative_expectation(name):
    if name.startswith(("bn2d", "bn3d")) or name.endswith("_relu") and "_bn_" not in name:
        return None
    if "_bn_relu" in name and name.startswith(("conv2d", "conv3d")):
        return f"BNReLU{name[4]}d"  # bn → relu still fuses
    return None


NEG_CASES = [c for c in CASES if not c[4]]


@pytest.mark.parametrize("name,a,b,relu,training,fused_cls,d", NEG_CASES,
                         ids=[c[0] for c in NEG_CASES])
def test_module_fusion_negative_first_output_used_twice(name, a, b, relu, training, fused_cls, d):
    model = _model(a, b, relu, training, leak="a")
    x = _input(d)
    want = model(x)
    before, r = fuse(model, x, training)
    rest = _negative_expectation(name)
    if rest is None:
        assert structure(r.gm) == before
        assert r.modified is False and r.stats == {}
    else:
        assert structure(r.gm) == [P, f"call_module:{type(model.a).__name__}",
                                   f"call_module:{rest}", O]
        assert r.stats == {"fused": 1}
    first = next(n for n in r.gm.graph.nodes if n.op == "call_module" and n.target == "a")
    assert type(r.gm.get_submodule("a")) is type(model.a)  # not replaced by a fused module
    assert not decisions(first, "fuse", "fuse")
    for got, exp in zip(r.gm(x), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


def test_three_op_chain_middle_output_used_twice_fuses_the_first_two():
    model = _model(lambda: _conv(2), lambda: _bn(2), True, False, leak="b")
    x = _input(2)
    want = model(x)
    before, r = fuse(model, x, False)
    assert structure(r.gm) == [P, "call_module:Conv2d", "call_function:F.relu", O]
    assert r.stats == {"fused": 1}
    assert decisions(call_nodes(r.gm)[0], "fuse", "fuse")[0].detail["pattern"] == "conv2d_bn"
    for got, exp in zip(r.gm(x), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


def test_matcher_says_why_a_used_twice_output_does_not_match():
    model = _model(lambda: _conv(2), lambda: _bn(2), False, False, leak="a")
    gm = traced(model)
    pattern = next(f.pattern for f in default_module_fusions() if f.pattern.name == "conv2d_bn")
    bn = next(n for n in gm.graph.nodes if n.target == "b")
    m = pattern.match(bn, dict(gm.named_modules()))
    assert isinstance(m, NoMatch) and not m
    assert "2 users" in m.reason and "a" in m.reason
    assert find_matches(gm.graph, [pattern], dict(gm.named_modules())) == []


def test_declined_match_reason_is_recorded():
    model = _model(lambda: _conv(2), lambda: _bn(2), False, False, leak="a")
    _, r = fuse(model, _input(2), False)
    conv = call_nodes(r.gm)[0]
    (d,) = decisions(conv, "fuse", "not_fused")
    assert "users" in d.reason


class CalledTwice(nn.Module):
    def __init__(self, twice: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.twice = twice

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if self.twice == "conv":
            return self.conv(y)
        return self.bn(y)


@pytest.mark.parametrize("twice", ["conv", "bn"])
def test_module_called_twice_is_not_fused(twice):
    model = _randomize_bn(CalledTwice(twice)).eval()
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    before, r = fuse(model, x, False)
    first = next(n for n in r.gm.graph.nodes if n.target == "conv")
    reasons = [d.reason for d in decisions(first, "fuse", "not_fused")]
    assert any("called more than once" in t and "Conv2d + BatchNorm2d + ReLU" in t
               for t in reasons), reasons
    if twice == "conv":
        # the conv is shared, but BatchNorm + ReLU after it still fuse on their own
        assert "call_module:BNReLU2d" in structure(r.gm) and r.stats == {"fused": 1}
    else:
        assert structure(r.gm) == before
        assert r.modified is False and r.stats == {}
    torch.testing.assert_close(r.gm(x), want)


@pytest.mark.parametrize("d", [2, 3])
def test_bn_relu_reason_does_not_claim_folding(d):
    model = _model(lambda: _bn(d, 3), None, True, False)
    _, r = fuse(model, _input(d), False)
    (dec,) = decisions(call_nodes(r.gm)[0], "fuse", "fuse")
    assert "folded" not in dec.reason


@pytest.mark.parametrize("a,fused_cls", [(lambda: _conv(2), "ConvBn2d"), (_lin, "LinearBn1d")],
                         ids=["conv2d_bn", "linear_bn"])
def test_qat_fusion_leaves_no_alias(a, fused_cls):
    model = _model(a, lambda: _bn(2 if fused_cls == "ConvBn2d" else 1), False, True)
    _, r = fuse(model, _input(2 if fused_cls == "ConvBn2d" else "linear"), True)
    assert structure(r.gm) == [P, f"call_module:{fused_cls}", O]
    assert {n for n, _ in r.gm.named_children()} == {"a"}
    assert not any(k.startswith("b.") for k in r.gm.state_dict())


def test_convtranspose_bn_not_fused_in_training():
    model = _model(lambda: _convt(2), lambda: _bn(2), False, True)
    before, r = fuse(model, _input(2), True)
    assert structure(r.gm) == before == [P, "call_module:ConvTranspose2d",
                                         "call_module:BatchNorm2d", O]
    assert r.modified is False and r.stats == {}
    (d,) = decisions(call_nodes(r.gm)[0], "fuse", "not_fused")
    assert "training" in d.reason


def test_linear_bn_relu_in_training_fuses_linear_bn():
    model = _model(_lin, lambda: _bn(1), True, True)
    _, r = fuse(model, _input("linear"), True)
    assert structure(r.gm) == [P, "call_module:LinearBn1d", "call_function:F.relu", O]


def test_bn_without_running_stats_is_left_unfused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            return self.bn(self.conv(x))

    before, r = fuse(M().eval(), torch.randn(2, 3, 4, 4), False)
    assert structure(r.gm) == before
    assert decisions(call_nodes(r.gm)[0], "fuse", "not_fused")


# -------------------------------------------------------------------------------------- groups


class Binary(nn.Module):
    def __init__(self, op, leak=False):
        super().__init__()
        self.op, self.leak = op, leak

    def forward(self, x, y):
        z = self.op(x, y)
        out = F.relu(z)
        return (out, z) if self.leak else out


@pytest.mark.parametrize("op,canonical,kernel", [
    (lambda x, y: x + y, "torch.add", "add_relu"),
    (lambda x, y: torch.add(x, y), "torch.add", "add_relu"),
    (lambda x, y: x * y, "torch.mul", "mul_relu"),
], ids=["x+y", "torch.add", "x*y"])
def test_group_fusion_positive(op, canonical, kernel):
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    gm = traced(Binary(op).eval(), x, y)
    r, _ = run_passes(gm, [Normalize(), Fuse()])
    assert structure(r.gm) == [P, P, f"call_function:{canonical}", "call_function:F.relu", O]
    assert r.modified is True and r.stats == {"grouped": 1}
    first, relu = call_nodes(r.gm)
    a, b = qinfo(first), qinfo(relu)
    assert a.group is not None and a.group == b.group
    assert a.group_root is False and b.group_root is True
    (root_d,) = decisions(relu, "fuse", "fuse")
    assert root_d.detail["kernel"] == kernel and kernel in root_d.reason
    (inner_d,) = decisions(first, "fuse", "fuse")
    assert "not quantized" in inner_d.reason


def test_group_fusions_table_covered():
    assert {g.kernel for g in default_group_fusions()} == {"add_relu", "mul_relu"}


@pytest.mark.parametrize("op", [lambda x, y: x + y, lambda x, y: x * y], ids=["add", "mul"])
def test_group_fusion_negative_interior_used_twice(op):
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    gm = traced(Binary(op, leak=True).eval(), x, y)
    r, _ = run_passes(gm, [Normalize(), Fuse()])
    assert r.modified is False and r.stats == {}
    assert all(qinfo(n).group is None for n in call_nodes(r.gm))


def test_group_fusion_negative_relu_not_after_add():
    class M(nn.Module):
        def forward(self, x, y):
            return torch.sub(x, y).relu() + F.relu(x)

    gm = traced(M(), torch.randn(2), torch.randn(2))
    r, _ = run_passes(gm, [Normalize(), Fuse()])
    assert r.stats == {}
    assert all(qinfo(n).group is None for n in call_nodes(r.gm))


# ---------------------------------------------------------------------------------- whole pass


def test_before_expected_on_a_model():
    from tests.models import ConvBnReLUChain, build

    model = build(ConvBnReLUChain)
    x = torch.randn(2, 3, 8, 8)
    gm = traced(model, x)
    normalized, _ = run_passes(gm, [Normalize()])
    assert structure(normalized.gm) == [P] + ["call_module:Conv2d", "call_module:BatchNorm2d",
                                              "call_function:F.relu"] * 3 + [
        "call_module:BatchNorm2d", "call_function:F.relu", "call_module:Conv2d", O]
    r, _ = run_passes(normalized.gm, [Fuse()], facts={"normalized"})
    assert structure(r.gm) == [P] + ["call_module:ConvReLU2d"] * 3 + ["call_module:BNReLU2d",
                                                                      "call_module:Conv2d", O]
    assert r.stats == {"fused": 4}
    assert [n.target for n in call_nodes(r.gm)] == ["features.0", "features.3", "features.6",
                                                   "bn", "head"]
    torch.testing.assert_close(r.gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_unchanged_graph():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return torch.sigmoid(self.pool(self.conv(x)))

    x = torch.randn(1, 3, 4, 4)
    gm = traced(M().eval(), x)
    # normalize rewrote nn.MaxPool2d into F.max_pool2d; fuse changes nothing
    before = [s.replace("call_module:MaxPool2d", "call_function:F.max_pool2d")
              for s in structure(gm)]
    r, _ = run_passes(gm, [Normalize(), Fuse()])
    assert structure(r.gm) == before
    assert r.modified is False and r.stats == {}
    assert all(not decisions(n, "fuse") for n in call_nodes(r.gm))


def _fused_resnet():
    from tests.models import TinyResNet, build

    x = torch.randn(2, 3, 8, 8)
    r, _ = run_passes(traced(build(TinyResNet), x), [Normalize(), Fuse()])
    assert r.stats == {"fused": 5, "grouped": 2}
    return r


def test_fuse_again_fuses_no_module():
    r = _fused_resnet()
    before = structure(r.gm)
    again, _ = run_passes(r.gm, [Fuse()], facts={"normalized"})
    assert structure(again.gm) == before
    assert "fused" not in again.stats


def test_fuse_is_idempotent():
    r = _fused_resnet()
    again, _ = run_passes(r.gm, [Fuse()], facts={"normalized"})
    assert again.modified is False and again.stats == {}
