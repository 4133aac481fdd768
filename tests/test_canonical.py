"""One canonical spelling per op (issue 12, item 5).

(a) The rule tables (every built-in backend's rules, the fusion patterns) name canonical ops
only: ``normalize`` rewrites every other spelling into them before any table is read, so a
target that normalize would rewrite can never be matched. The one exception is an in-place
spelling: normalize keeps it as written when its tensor has views (``keep_inplace``), so the
tables list it beside its out-of-place form.

(b) A model written in each alternate spelling (the stateless modules among them: nn.Sigmoid,
nn.ReLU6, nn.Upsample, nn.ZeroPad2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d ..., which normalize
rewrites into their function) converts to the same kernels as the same model in the canonical
spelling (op counts of the converted graphs are equal), within SQNR of float.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.fusion import default_group_fusions, default_module_fusions
from fxquant.ops import SPELLINGS
from fxquant.optable import builtin_backends, spelling_label
from tests.models import calibration_batches
from tests.util import op_counts


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, str) and isinstance(b, str) and a == b)


def _rewrites(target: Any) -> list[Any]:
    """The spellings in fxquant.ops whose target is ``target`` and that normalize rewrites
    into another op."""
    return [s for s in SPELLINGS if _same(s.target, target) and not _same(s.canonical, target)]


def _table_targets() -> list[tuple[str, Any]]:
    out = []
    for backend in builtin_backends():
        for rule in backend.rules:
            out += [(f"{backend.name}:{rule.name}", t) for t in rule.op.targets]
    for fusion in list(default_module_fusions()) + list(default_group_fusions()):
        for op in fusion.pattern.ops:
            out += [(f"fusion:{fusion.pattern.name}", t) for t in op.targets]
    return out


# Module classes normalize rewrites only in some configurations, kept as modules (and listed in
# the tables) in the others: nn.Softmax() with dim None picks its dim from the input's rank at
# each call (torch's legacy implicit dim), which no F.softmax call states.
KEPT_MODULES: dict[type, str] = {nn.Softmax: "dim None: implicit, rank-dependent dim"}
# Canonical functions no built-in backend quantizes (no rule, before the module was rewritten
# either): the module runs float, and so does its function.
FLOAT_ONLY: dict[Any, str] = {
    **{f: "no quantized kernel rule in any backend; nn.AdaptiveMaxPool* was in none either"
       for f in (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)},
    F.log_softmax: "no quantized kernel rule in any backend (nn.LogSoftmax was in none either)"}


def test_rule_tables_name_canonical_ops_only() -> None:
    bad = []
    for where, target in _table_targets():
        if target in KEPT_MODULES:
            continue
        rewrites = _rewrites(target)
        if any(not s.inplace for s in rewrites):
            bad.append(f"{where}: {spelling_label(target)} → "
                       f"{spelling_label(rewrites[0].canonical)}")
    assert not bad, "tables name spellings that normalize rewrites:\n" + "\n".join(bad)


def test_inplace_spellings_in_the_tables_sit_beside_their_canonical_op() -> None:
    """An in-place spelling listed in a rule (kept as written when its tensor has views) has its
    out-of-place canonical op in a rule of the same backend with the same kernel family."""
    for backend in builtin_backends():
        targets = [t for r in backend.rules for t in r.op.targets]
        for rule in backend.rules:
            for target in rule.op.targets:
                for s in _rewrites(target) if target not in KEPT_MODULES else ():
                    assert s.inplace
                    assert any(_same(s.canonical, t) for t in targets), (
                        backend.name, rule.name, spelling_label(target))


def test_stateless_modules_reach_the_tables_as_their_function() -> None:
    """Every module class normalize rewrites (nn.Sigmoid, nn.ReLU6, nn.Upsample, nn.ZeroPad2d
    nn.MaxPool2d, nn.AdaptiveAvgPool2d ...) is in no table (but for KEPT_MODULES), and its
    function is in a rule of every built-in backend (but for FLOAT_ONLY); the modules left in
    the tables have state (conv, linear, norms, prelu, embedding, rnn), are fused modules, or
    KEPT_MODULES."""
    modules = [s for s in SPELLINGS if isinstance(s.target, type)]
    pools = {getattr(nn, f"{kind}{d}d") for d in (1, 2, 3)
             for kind in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool")}
    assert {nn.Sigmoid, nn.ReLU6, nn.Hardtanh, nn.GELU, nn.Softmax, nn.Upsample, nn.ZeroPad2d,
            nn.ReflectionPad2d, nn.PixelShuffle, nn.Unflatten} | pools \
        <= {s.target for s in modules}
    tables = [t for _, t in _table_targets()]
    for backend in builtin_backends():
        targets = [t for r in backend.rules for t in r.op.targets]
        for s in modules:
            assert s.target in KEPT_MODULES or s.target not in tables, s.target
            assert s.canonical in FLOAT_ONLY or any(_same(s.canonical, t) for t in targets), (
                backend.name, s.target)
            assert s.canonical not in FLOAT_ONLY or not any(_same(s.canonical, t)
                                                            for t in targets)
    stateless = {type(m) for m in (nn.Sigmoid(), nn.Tanh(), nn.Hardswish(), nn.ELU(), nn.GELU(),
                                   nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))}
    for target in tables:
        if isinstance(target, type) and issubclass(target, nn.Module):
            assert target not in stateless
            assert target in KEPT_MODULES or not any(_same(s.target, target) for s in modules)


def test_every_canonical_op_is_a_fixed_point() -> None:
    """The canonical target of a spelling is not itself rewritten into another op."""
    for s in SPELLINGS:
        assert not _rewrites(s.canonical), spelling_label(s.canonical)


# ----------------------------------------------------------------- (b) same kernels, any spelling
Op = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class Head(nn.Module):
    """conv → the op (→ a second conv where the op keeps a 4-d tensor), with parameters and
    buffers the norms and prelu take as arguments."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.register_buffer("rm", torch.randn(8) * 0.1)
        self.register_buffer("rv", torch.rand(8) + 0.5)
        self.slope = nn.Parameter(torch.full((8,), 0.25))
        self.m = nn.ModuleDict({k: f() for k, f in MODULES.items()})  # the module spellings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self, self.conv(x))


def _mm(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    """(N, C, HW) x (N, HW, C) in spelling ``f``."""
    def op(s: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return f(t.flatten(2), t.flatten(2).transpose(1, 2))
    return op


# stateless modules, called as s.m[name](t) by the cases below (normalize: their function)
MODULES: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softmax": lambda: nn.Softmax(1),
    "softmax2d": nn.Softmax2d, "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5), "relu6": nn.ReLU6,
    "relu6_inplace": lambda: nn.ReLU6(inplace=True), "elu": lambda: nn.ELU(0.5),
    "leaky_relu": lambda: nn.LeakyReLU(0.2), "selu": nn.SELU, "celu": lambda: nn.CELU(0.5),
    "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "silu": nn.SiLU, "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU("tanh"), "upsample": lambda: nn.Upsample(scale_factor=2),
    "upsample_nearest": lambda: nn.UpsamplingNearest2d(scale_factor=2),
    "upsample_bilinear": lambda: nn.UpsamplingBilinear2d(scale_factor=2),
    "constant_pad": lambda: nn.ConstantPad1d((1, 2), 0.5),
    "zero_pad": lambda: nn.ZeroPad2d((1, 1, 2, 2)), "reflection_pad": lambda: nn.ReflectionPad2d(1),
    "pixel_shuffle": lambda: nn.PixelShuffle(2), "pixel_unshuffle": lambda: nn.PixelUnshuffle(2),
    "unflatten": lambda: nn.Unflatten(1, (2, 4)),
    "max_pool": lambda: nn.MaxPool2d(2), "max_pool_cfg": lambda: nn.MaxPool2d(3, 2, 1, 2, ceil_mode=True),
    "max_pool1d": lambda: nn.MaxPool1d(2), "avg_pool": lambda: nn.AvgPool2d(2),
    "avg_pool_cfg": lambda: nn.AvgPool2d(3, 2, 1, True, False, 4),
    "avg_pool1d": lambda: nn.AvgPool1d(3, 1, 1, count_include_pad=False),
    "adaptive_avg_pool": lambda: nn.AdaptiveAvgPool2d(1),
    "adaptive_avg_pool_none": lambda: nn.AdaptiveAvgPool2d((None, 2)),
    "adaptive_max_pool": lambda: nn.AdaptiveMaxPool2d(2), "log_softmax": lambda: nn.LogSoftmax(1),
}


def _m(name: str) -> Op:
    return lambda s, t: s.m[name](t)


# name: (canonical spelling, alternate spellings)
CASES: dict[str, tuple[Op, list[Op]]] = {
    "sigmoid": (lambda s, t: torch.sigmoid(t),
                [lambda s, t: F.sigmoid(t), lambda s, t: t.sigmoid(),
                 lambda s, t: torch.special.expit(t), lambda s, t: t.sigmoid_(),
                 lambda s, t: torch.sigmoid_(t), _m("sigmoid")]),
    "tanh": (lambda s, t: torch.tanh(t),
             [lambda s, t: F.tanh(t), lambda s, t: t.tanh(), lambda s, t: t.tanh_(),
              lambda s, t: torch.tanh_(t), _m("tanh")]),
    "softmax": (lambda s, t: F.softmax(t, 1),
                [lambda s, t: torch.softmax(t, 1), lambda s, t: t.softmax(1),
                 lambda s, t: torch.special.softmax(t, 1), _m("softmax")]),
    "softmax2d": (lambda s, t: F.softmax(t, -3), [_m("softmax2d")]),
    "log_softmax": (lambda s, t: F.log_softmax(t, 1),
                    [lambda s, t: torch.log_softmax(t, 1), lambda s, t: t.log_softmax(1),
                     lambda s, t: torch.special.log_softmax(t, 1), _m("log_softmax")]),
    "clamp": (lambda s, t: torch.clamp(t, -0.5, 0.5),
              [lambda s, t: torch.clip(t, -0.5, 0.5), lambda s, t: t.clamp(-0.5, 0.5),
               lambda s, t: t.clip(-0.5, 0.5)]),
    "clamp_min": (lambda s, t: torch.clamp(t, min=0.1), [lambda s, t: t.clamp(min=0.1)]),
    "hardtanh": (lambda s, t: F.hardtanh(t, -0.5, 0.5),
                 [lambda s, t: F.hardtanh_(t, -0.5, 0.5), _m("hardtanh")]),
    "relu6": (lambda s, t: F.relu6(t), [_m("relu6"), _m("relu6_inplace")]),  # fuses into conv
    "hardswish": (lambda s, t: F.hardswish(t), [_m("hardswish")]),
    "hardsigmoid": (lambda s, t: F.hardsigmoid(t), [_m("hardsigmoid")]),
    "silu": (lambda s, t: F.silu(t), [_m("silu")]),
    "gelu": (lambda s, t: F.gelu(t), [_m("gelu")]),
    "gelu_tanh": (lambda s, t: F.gelu(t, approximate="tanh"), [_m("gelu_tanh")]),
    "elu": (lambda s, t: F.elu(t, 0.5), [lambda s, t: F.elu_(t, 0.5), _m("elu")]),
    "leaky_relu": (lambda s, t: F.leaky_relu(t, 0.2),
                   [lambda s, t: F.leaky_relu_(t, 0.2), _m("leaky_relu")]),
    "selu": (lambda s, t: F.selu(t), [lambda s, t: torch.selu(t), lambda s, t: torch.selu_(t),
                                      _m("selu")]),
    "celu": (lambda s, t: F.celu(t, 0.5),
             [lambda s, t: torch.celu(t, 0.5), lambda s, t: torch.celu_(t, 0.5), _m("celu")]),
    "prelu": (lambda s, t: F.prelu(t, s.slope), [lambda s, t: t.prelu(s.slope)]),
    "layer_norm": (lambda s, t: F.layer_norm(t, [8], s.w, s.b),
                   [lambda s, t: torch.layer_norm(t, [8], s.w, s.b, 1e-5, False)]),
    "group_norm": (lambda s, t: F.group_norm(t, 2, s.w, s.b),
                   [lambda s, t: torch.group_norm(t, 2, s.w, s.b, 1e-5, False)]),
    "batch_norm": (lambda s, t: F.batch_norm(t, s.rm, s.rv, s.w, s.b, False, 0.1, 1e-5),
                   [lambda s, t: torch.batch_norm(t, s.w, s.b, s.rm, s.rv, False, 0.1, 1e-5,
                                                  False)]),
    "instance_norm": (lambda s, t: F.instance_norm(t, None, None, s.w, s.b),
                      [lambda s, t: torch.instance_norm(t, s.w, s.b, None, None, True, 0.1, 1e-5,
                                                        False)]),
    "upsample_nearest": (lambda s, t: F.interpolate(t, scale_factor=2, mode="nearest"),
                         [lambda s, t: F.upsample(t, scale_factor=2),
                          lambda s, t: F.upsample_nearest(t, scale_factor=2),
                          _m("upsample"), _m("upsample_nearest")]),
    "upsample_bilinear": (lambda s, t: F.interpolate(t, scale_factor=2, mode="bilinear",
                                                     align_corners=True),
                          [lambda s, t: F.upsample_bilinear(t, scale_factor=2),
                           _m("upsample_bilinear")]),
    "pad": (lambda s, t: F.pad(t, [1, 2], mode="constant", value=0.5),
            [lambda s, t: torch.constant_pad_nd(t, [1, 2], 0.5), _m("constant_pad")]),
    "zero_pad": (lambda s, t: F.pad(t, [1, 1, 2, 2], mode="constant", value=0.0),
                 [_m("zero_pad")]),
    "reflection_pad": (lambda s, t: F.pad(t, [1, 1, 1, 1], mode="reflect"),
                       [_m("reflection_pad")]),
    "pixel_shuffle": (lambda s, t: F.pixel_shuffle(t, 2), [_m("pixel_shuffle")]),
    "pixel_unshuffle": (lambda s, t: F.pixel_unshuffle(t, 2), [_m("pixel_unshuffle")]),
    "max_pool": (lambda s, t: F.max_pool2d(t, 2), [_m("max_pool")]),
    "max_pool_cfg": (lambda s, t: F.max_pool2d(t, 3, 2, 1, 2, ceil_mode=True),
                     [_m("max_pool_cfg")]),
    "max_pool1d": (lambda s, t: F.max_pool1d(t.flatten(2), 2),
                   [lambda s, t: s.m["max_pool1d"](t.flatten(2))]),
    "avg_pool": (lambda s, t: F.avg_pool2d(t, 2), [_m("avg_pool")]),
    "avg_pool_cfg": (lambda s, t: F.avg_pool2d(t, 3, 2, 1, True, False, 4), [_m("avg_pool_cfg")]),
    "avg_pool1d": (lambda s, t: F.avg_pool1d(t.flatten(2), 3, 1, 1, count_include_pad=False),
                   [lambda s, t: s.m["avg_pool1d"](t.flatten(2))]),
    "adaptive_avg_pool": (lambda s, t: F.adaptive_avg_pool2d(t, 1), [_m("adaptive_avg_pool")]),
    "adaptive_avg_pool_none": (lambda s, t: F.adaptive_avg_pool2d(t, (None, 2)),
                               [_m("adaptive_avg_pool_none")]),
    "adaptive_max_pool": (lambda s, t: F.adaptive_max_pool2d(t, 2), [_m("adaptive_max_pool")]),
    "matmul": (_mm(torch.matmul), [_mm(lambda a, b: a @ b), _mm(lambda a, b: a.matmul(b)),
                                   _mm(torch.bmm), _mm(lambda a, b: a.bmm(b))]),
    "mean": (lambda s, t: torch.mean(t, (2, 3)), [lambda s, t: t.mean((2, 3))]),
    "reshape": (lambda s, t: torch.reshape(t, (2, -1)),
                [lambda s, t: t.reshape(2, -1), lambda s, t: t.reshape((2, -1))]),
    "reshape_traced_size": (lambda s, t: torch.reshape(t, (t.size(0), -1)),
                            [lambda s, t: t.reshape(t.size(0), -1)]),
    "permute": (lambda s, t: torch.permute(t, (0, 2, 3, 1)),
                [lambda s, t: t.permute(0, 2, 3, 1), lambda s, t: t.permute((0, 2, 3, 1))]),
    "transpose": (lambda s, t: torch.transpose(t, 1, 2),
                  [lambda s, t: t.transpose(1, 2), lambda s, t: torch.swapaxes(t, 1, 2),
                   lambda s, t: t.swapaxes(1, 2)]),
    "flip": (lambda s, t: torch.flip(t, (2,)), [lambda s, t: t.flip(2), lambda s, t: t.flip([2])]),
    "squeeze": (lambda s, t: torch.squeeze(torch.unsqueeze(t, 1), 1),
                [lambda s, t: t.unsqueeze(1).squeeze(1)]),
    "t": (lambda s, t: torch.t(t.flatten(1)), [lambda s, t: t.flatten(1).t()]),
    "narrow": (lambda s, t: torch.narrow(t, 1, 0, 4), [lambda s, t: t.narrow(1, 0, 4)]),
    "movedim": (lambda s, t: torch.movedim(t, 1, 3), [lambda s, t: t.movedim(1, 3)]),
    "unflatten": (lambda s, t: torch.unflatten(t, 1, (2, 4)),
                  [lambda s, t: t.unflatten(1, (2, 4)), _m("unflatten")]),
    "chunk": (lambda s, t: torch.chunk(t, 2, 1)[1], [lambda s, t: t.chunk(2, 1)[1]]),
    "split": (lambda s, t: torch.split(t, 4, 1)[0], [lambda s, t: t.split(4, 1)[0]]),
    "unbind": (lambda s, t: torch.unbind(t, 1)[2], [lambda s, t: t.unbind(1)[2]]),
    "tensor_split": (lambda s, t: torch.tensor_split(t, 2, 1)[0],
                     [lambda s, t: t.tensor_split(2, 1)[0]]),
    "sub": (lambda s, t: torch.sub(t, t * 0.5),
            [lambda s, t: t - t * 0.5, lambda s, t: t.sub(t * 0.5),
             lambda s, t: torch.subtract(t, t * 0.5)]),
    "div": (lambda s, t: torch.div(t, 2.0),
            [lambda s, t: t / 2.0, lambda s, t: t.div(2.0), lambda s, t: torch.divide(t, 2.0)]),
}
SHAPE = (2, 3, 8, 8)
SQNR_FLOOR = 25.0  # dB, the floor; the lowest case here is instance_norm, 28 dB on x86


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().float(), got.detach().float()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean().clamp_min(1e-20)))


def _convert(model: nn.Module) -> torch.fx.GraphModule:
    torch.backends.quantized.engine = "x86"
    prepared = fxquant.prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping("x86"),
                                  (torch.randn(*SHAPE),), backend="x86")
    with torch.no_grad():
        for batch in calibration_batches(SHAPE, n=2):
            prepared(batch)
    return fxquant.convert_fx(prepared)


def _counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    return {k: v for k, v in op_counts(gm).items() if v}


@pytest.mark.parametrize("name", list(CASES))
def test_every_spelling_converts_to_the_same_kernels(name: str) -> None:
    canonical, alternates = CASES[name]
    x = calibration_batches(SHAPE, n=1, seed=7)[0]
    model = Head(canonical).eval()
    want = _counts(_convert(model))
    with torch.no_grad():
        ref = model(x)
    for i, alternate in enumerate(alternates):
        alt = Head(alternate).eval()
        quantized = _convert(alt)
        assert _counts(quantized) == want, (name, i)
        with torch.no_grad():
            assert torch.equal(alt(x.clone()), ref), (name, i)  # the same float model
            assert _sqnr(ref, quantized(x.clone())) >= SQNR_FLOOR, (name, i)


def test_pooling_module_rules_reach_its_function() -> None:
    """nn.MaxPool2d / nn.AdaptiveAvgPool2d become F.max_pool2d / F.adaptive_avg_pool2d, which keep
    the module's path and class: object_type(nn.MaxPool2d) and module_name rules still apply, and
    the converted pool runs float where a rule says None (int8 elsewhere, as before)."""
    from fxquant.meta import qinfo

    class Pools(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pool, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
            self.gap = nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gap(self.pool2(self.pool(self.conv(x))))

    def prepared(mapping: Any) -> torch.fx.GraphModule:
        return fxquant.prepare_fx(Pools().eval(), mapping, (torch.randn(*SHAPE),), backend="x86")

    def at(gm: torch.fx.GraphModule, path: str) -> torch.fx.Node:
        (node,) = [n for n in gm.graph.nodes if n.op == "call_function"
                   and qinfo(n).module_path == path]
        return node

    qc = fxquant.get_default_qconfig_mapping("x86")
    gm = prepared(copy.deepcopy(qc).set_object_type(nn.MaxPool2d, None))
    for path in ("pool", "pool2"):
        node = at(gm, path)
        assert node.target is F.max_pool2d and qinfo(node).original is nn.MaxPool2d
        assert qinfo(node).qconfig is None and "MaxPool2d" in qinfo(node).qconfig_reason
    assert qinfo(at(gm, "gap")).qconfig is not None
    gm = prepared(copy.deepcopy(qc).set_module_name("pool2", None))
    assert qinfo(at(gm, "pool2")).qconfig is None
    assert qinfo(at(gm, "pool")).qconfig is not None
    assert at(gm, "gap").target is F.adaptive_avg_pool2d
