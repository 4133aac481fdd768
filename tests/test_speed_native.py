"""Issue 10 items 0-1 on the native backends: broadcasting add/mul quantized, inference no-ops
removed in normalize, conv/linear(+bn)+ReLU6/Hardtanh/clamp fused with the bound in the output
qparams on every backend, and the measured per-layer engine choice (never a timing assertion:
the decision is recorded and the output stays within one step of the current engine's)."""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.backends import engine_choice
from fxquant.backends.engine import supported_engines
from fxquant.meta import qinfo
from fxquant.observers import MinMaxObserver
from fxquant.passes import Normalize
from fxquant.trace import TraceConfig, record_values, trace
from tests.models import build, calibration_batches
from tests.passes.graphs import decisions, run_passes, structure, traced
from tests.util import op_counts

BACKENDS = [b for b in ("x86", "fbgemm", "onednn", "qnnpack") if b in supported_engines()]


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - x).norm()))


def convert_both(model: nn.Module, backend: str, shape: tuple[int, ...], mapping=None,
                 scale: float = 1.0, n: int = 3):
    """(float model, converted, reference graph), calibrated on ``n`` seeded batches."""
    torch.backends.quantized.engine = backend
    mapping = mapping or fxquant.get_default_qconfig_mapping(backend)
    prepared = fxquant.prepare_fx(model, mapping, (torch.randn(shape),), backend=backend)
    for batch in calibration_batches(shape, n=n):
        prepared(batch * scale)
    return model, fxquant.convert_fx(prepared), fxquant.convert_to_reference_fx(prepared)


def float_binary_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.add,
                                                                                    torch.mul)]


# ------------------------------------------------------------------ broadcasting add / mul
class SqueezeExcite(nn.Module):
    """conv, squeeze-excite gating (N,C,H,W) x (N,C,1,1), the reverse add (N,C,1,1) + (N,C,H,W),
    a layer scale (C,1,1) parameter, and (N,C,H,W) x (C,1,1) from an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.gamma = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = y * g
        y = g + y
        y = y * self.gamma
        y = y * y[0, :, :1, :1]  # (N,C,H,W) x (C,1,1)
        return self.out(y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_squeeze_excite_broadcasts_run_int8(backend):
    model, quantized, reference = convert_both(build(SqueezeExcite), backend, (2, 3, 8, 8))
    counts = op_counts(quantized)
    assert counts["quantized::mul"] == 3 and counts["quantized::add"] == 1, dict(counts)
    assert not float_binary_ops(quantized), "a broadcasting add/mul stayed float"
    for n in quantized.graph.nodes:
        if n.op == "call_function" and "quantized::" in str(n.target):
            assert any(d.action == "lower" for d in qinfo(n).decisions)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want, got, ref = model(x), quantized(x), reference(x)
    assert sqnr(want, got) >= sqnr(want, ref) - 1.0, (sqnr(want, got), sqnr(want, ref))
    assert sqnr(want, got) >= 20.0


def test_broadcast_kernels_are_numerically_checked():
    """Every broadcasting kernel kept was run against the reference on random data of its
    recorded shapes (lowering's kernel check), and the check's verdict is on the node."""
    _, quantized, _ = convert_both(build(SqueezeExcite), "x86", (2, 3, 8, 8))
    binary = [n for n in quantized.graph.nodes if n.op == "call_function"
              and str(n.target) in ("quantized.add", "quantized.mul")]
    assert len(binary) == 4
    for n in binary:
        (lower,) = [d for d in qinfo(n).decisions if d.action == "lower"]
        assert "step(s) off the reference on random data" in lower.detail["check"], lower


def _wrong_add(a: torch.Tensor, b: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """A broken broadcasting add kernel: right shape, integers halved."""
    out = torch.ops.quantized.add(a, b, scale, zero_point)
    return torch._make_per_tensor_quantized_tensor(out.int_repr() // 2, scale, zero_point)


def test_broadcast_kernel_refused_by_the_check_stays_float_with_reason():
    """No real broadcast case fails the check on torch 2.13 (qnnpack's scale-ratio refusal
    covers equal shapes only: broadcast shapes take the generic kernel), so a backend with a
    wrong broadcasting add shows the mechanism: the add stays float, with the check's
    numbers as the reason, and the model still matches float."""
    from fxquant.backends.base import OWN, Rule
    from fxquant.backends.registry import get_backend, register_backend, unregister_backend
    from fxquant.backends.native import check_two_tensors, lower_binary
    from fxquant.patterns import Op

    rule = Rule("add", Op(torch.add), OWN, "wrong_add", lower_binary(_wrong_add, _wrong_add),
                inputs="tensors", check=check_two_tensors)
    backend = register_backend(get_backend("x86").extended(rule, name="x86_wrong_add"))
    try:
        class Gate(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)

            def forward(self, x):
                y = self.conv(x)
                return y + F.adaptive_avg_pool2d(y, 1)

        torch.backends.quantized.engine = "x86"
        prepared = fxquant.prepare_fx(build(Gate), fxquant.get_default_qconfig_mapping("x86"),
                                      (torch.randn(2, 3, 8, 8),), backend=backend.name)
        for batch in calibration_batches((2, 3, 8, 8), n=2):
            prepared(batch)
        quantized = fxquant.convert_fx(prepared)
    finally:
        unregister_backend("x86_wrong_add")
    (add,) = [n for n in float_binary_ops(quantized) if n.target is torch.add]
    (d,) = [d for d in qinfo(add).decisions if d.action == "keep_float"]
    assert "wrong_add" in d.reason and "off the reference" in d.reason, d.reason
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert sqnr(build(Gate)(x), quantized(x)) >= 25.0


# ------------------------------------------------------------------ inference no-ops
def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True
                     ) -> torch.Tensor:
    """torchvision.ops.stochastic_depth look-alike: identity unless training."""
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    keep = torch.empty(size, dtype=input.dtype).bernoulli_(1.0 - p)
    return input * keep / (1.0 - p)


torch.fx.wrap("stochastic_depth")  # as torchvision does: a leaf call in the traced graph


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return stochastic_depth(x, self.p, self.mode, self.training)


class NoOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.sd = StochasticDepth(0.2, "row")
        self.fad = nn.FeatureAlphaDropout(0.1)

    def forward(self, x):
        y = self.sd(self.lin(x))
        y = stochastic_depth(y, 0.1, "batch", self.training) + 1
        y = torch.dropout(y, 0.3, self.training)
        y = F.dropout(y, p=0.3, training=self.training)
        y = self.fad(y.unsqueeze(-1)).squeeze(-1)
        return y * 2


def test_stochastic_depth_and_every_dropout_removed_in_eval():
    model = build(NoOps).eval()
    x = torch.randn(3, 4)
    gm = traced(model, x)
    r, _ = run_passes(gm, [Normalize()])
    left = [s for s in structure(r.gm) if "dropout" in s.lower() or "stochastic" in s.lower()
            or "Dropout" in s or "StochasticDepth" in s]
    assert left == [], left
    assert r.stats["removed"] == 5, r.stats
    removed = [d.reason for n in r.gm.graph.nodes for d in decisions(n, "normalize",
                                                                        "remove_identity")]
    assert len(removed) == 5 and all("eval mode" in d for d in removed), removed
    assert sum("stochastic_depth" in d for d in removed) == 2, removed
    torch.testing.assert_close(r.gm(x), model(x), rtol=0, atol=0)


def test_stochastic_depth_kept_in_training_and_leaf_module_removed():
    model = build(NoOps).train()
    gm = traced(model, torch.randn(3, 4))
    gm.train()
    r, _ = run_passes(gm, [Normalize()])
    assert sum("stochastic_depth" in s for s in structure(r.gm)) == 2

    class Leaf(nn.Module):  # StochasticDepth kept as a leaf module (a tracer's choice)
        def __init__(self) -> None:
            super().__init__()
            self.sd = StochasticDepth(0.5, "row")

        def forward(self, x):
            return self.sd(x) * 3

    leaf = build(Leaf).eval()
    gm = trace(leaf, TraceConfig((StochasticDepth,)))
    record_values(gm, (torch.randn(3, 4),))
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    r, _ = run_passes(gm, [Normalize()])
    assert not any(n.op == "call_module" for n in r.gm.graph.nodes)
    assert r.stats["removed"] == 1


def test_functional_dropout_with_default_training_is_removed_and_noted():
    """F.dropout(x, p) without training= drops even in eager eval mode: removed all the same
    (a quantized model is for inference), and the record says so."""
    class M(nn.Module):
        def forward(self, x):
            return F.dropout(x * 2, 0.5) - 1

    gm = traced(build(M).eval(), torch.randn(2, 4))
    r, _ = run_passes(gm, [Normalize()])
    assert not any("dropout" in s for s in structure(r.gm))
    (d,) = [d for n in r.gm.graph.nodes for d in decisions(n, "normalize", "remove_identity")]
    assert "training=True" in d.reason


# ------------------------------------------------------------------ conv/linear + bn + relu6
class InvertedResidual(nn.Module):
    """MobileNetV2's block; ``spelling`` picks how the depthwise conv's ReLU6 is written."""

    def __init__(self, c: int, spelling: str) -> None:
        super().__init__()
        h = c * 4
        self.pw = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h),
                                nn.ReLU6(inplace=True))
        self.dw = nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False)
        self.bn = nn.BatchNorm2d(h)
        self.pwl = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        self.spelling = spelling

    def forward(self, x):
        z = self.bn(self.dw(self.pw(x)))
        s = self.spelling
        if s == "F.relu6":
            z = F.relu6(z)
        elif s == "F.hardtanh":
            z = F.hardtanh(z, 0.0, 6.0)
        elif s == "torch.clamp":
            z = torch.clamp(z, 0, 6)
        elif s == "x.clamp":
            z = z.clamp(0, 6)
        elif s == "F.hardtanh_":
            z = F.hardtanh(z, 0.0, 6.0, inplace=True)
        elif s == "x.clamp_":
            z = z.clamp_(0, 6)
        elif s == "F.relu6(inplace)":
            z = F.relu6(z, inplace=True)
        return x + self.pwl(z)


SPELLINGS = ("F.relu6", "F.hardtanh", "torch.clamp", "x.clamp", "F.hardtanh_", "x.clamp_",
             "F.relu6(inplace)")


class MobileNetV2ish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(*[InvertedResidual(8, s) for s in SPELLINGS])
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x)).mean((2, 3))
        x = F.relu6(self.bn(self.fc(x)))  # linear + bn + relu6
        return F.hardtanh(self.head(x), 0.0, 6.0)  # linear + relu6 spelled as hardtanh


CLAMP_NAMES = ("hardtanh", "relu6", "clamp", "clip", "ReLU6", "Hardtanh")
CLAMPED = 1 + 2 * len(SPELLINGS) + 2  # stem, pw and dw of each block, fc, head


def clamped_modules(gm: torch.fx.GraphModule) -> list[torch.nn.Module]:
    from fxquant.nn import clamped
    from fxquant.nn import quantized as q

    mods = dict(gm.named_modules())
    return [mods[n.target] for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(mods[n.target], (q.ConvReLU2d, q.LinearReLU,
                                            *clamped.CLAMPED_OF.values()))]


def activation_qmax(backend: str) -> int:
    """The top of the default activation observer's integer range (127 with reduce_range)."""
    observer = fxquant.get_default_qconfig_mapping(backend).global_qconfig.activation()
    return int(observer.quant_max) - int(observer.quant_min)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mobilenetv2_relu6_folded_into_conv_output_qparams(backend):
    """No separate hardtanh / relu6 / clamp remains, in any spelling, on any backend; every
    conv / linear followed by ReLU6 has output qparams over the clipped range (zero point 0,
    at most 6 at the top of the observer's integer range), observed after the clamp."""
    model, quantized, reference = convert_both(build(MobileNetV2ish), backend, (1, 3, 12, 12),
                                               scale=4.0)
    counts = op_counts(quantized)
    left = {k: v for k, v in counts.items() if any(c in k for c in CLAMP_NAMES)
            and "Clamp" not in k}
    assert not left, dict(counts)
    mods = clamped_modules(quantized)
    assert len(mods) == CLAMPED, dict(counts)
    qmax = activation_qmax(backend)
    for m in mods:
        assert m.zero_point == 0, m
        assert m.scale * qmax <= 6.0 + 1e-4, (m, qmax)
    assert "BatchNorm" not in " ".join(counts)
    x = torch.randn(1, 3, 12, 12) * 4
    with torch.no_grad():
        want, got, ref = model(x), quantized(x), reference(x)
    assert sqnr(want, got) >= sqnr(want, ref) - 1.0
    assert sqnr(want, got) >= 20.0
    assert got.max() <= 6.0 + 1e-5 and got.min() >= 0.0


@pytest.mark.parametrize("backend", [b for b in ("x86", "qnnpack") if b in BACKENDS])
def test_relu6_bound_is_the_output_range_with_min_max_observers(backend):
    """With min-max observers and data past the bound, the output qparams are exactly
    [0, 6] over the observer's integer range: scale 6/127 (reduce_range) or 6/255."""
    act = fxquant.get_default_qconfig_mapping(backend).global_qconfig
    qmax = activation_qmax(backend)
    mapping = fxquant.QConfigMapping().set_global(fxquant.QConfig(
        activation=MinMaxObserver.with_args(reduce_range=qmax == 127), weight=act.weight))
    model, quantized, _ = convert_both(build(MobileNetV2ish), backend, (1, 3, 12, 12),
                                       mapping=mapping, scale=8.0)
    scales = sorted(m.scale for m in clamped_modules(quantized))
    assert len(scales) == CLAMPED
    # where the clamp was active on the calibration data (random weights: about half of the
    # layers here) the scale is 6/qmax exactly; nowhere is it the unclipped range
    assert sum(abs(s - 6.0 / qmax) < 1e-7 for s in scales) >= CLAMPED // 3, (scales, qmax)
    assert all(s <= 6.0 / qmax + 1e-7 for s in scales), (scales, qmax)


def test_qat_keeps_conv_bn_apart_from_relu6():
    """In training (QAT) conv+bn+relu6 declines (no QAT module): conv+bn fuse, the clamp
    stays, so nothing silently changes the QAT graph."""
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu6(self.bn(self.conv(x)))

    prepared = fxquant.prepare_qat_fx(build(M).train(), fxquant.get_default_qat_qconfig_mapping(
        "qnnpack"), (torch.randn(2, 3, 8, 8),), backend="qnnpack")
    names = [type(m).__name__ for m in prepared.modules()]
    assert "ConvBn2d" in names
    assert any(n.target is F.relu6 or "relu6" in str(n.target) or "hardtanh" in str(n.target)
               for n in prepared.graph.nodes), prepared.graph


def test_clamped_modules_script_and_match():
    """The in-module clamp (reduce_range activations) scripts, and the scripted model gives
    the same integers. 7-bit activations pinned: on a VNNI CPU the default is 8-bit, where the
    bound folds into the output qparams and no clamping module is needed."""
    mapping = fxquant.QConfigMapping().set_global(
        fxquant.get_default_qconfig("x86", reduce_range=True))
    _, quantized, _ = convert_both(build(MobileNetV2ish), "x86", (1, 3, 12, 12),
                                   mapping=mapping, scale=4.0)
    from fxquant.nn import clamped

    assert any(isinstance(m, tuple(clamped.CLAMPED_OF.values())) for m in quantized.modules())
    scripted = torch.jit.script(quantized)
    x = torch.randn(1, 3, 12, 12) * 4
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), quantized(x), rtol=0, atol=0)


# ------------------------------------------------------------------ per-layer engine choice
class Depthwise58(nn.Module):
    """ShuffleNetV2's slow case: a depthwise 3x3 conv with 58 channels between 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(58, 58, 1)
        self.dw = nn.Conv2d(58, 58, 3, 1, 1, groups=58)
        self.pw2 = nn.Conv2d(58, 58, 1)

    def forward(self, x):
        return self.pw2(self.dw(F.relu(self.pw(x))))


def _prepared_depthwise(backend: str):
    torch.backends.quantized.engine = backend
    shape = (1, 58, 10, 10)
    prepared = fxquant.prepare_fx(build(Depthwise58), fxquant.get_default_qconfig_mapping(
        backend), (torch.randn(shape),), backend=backend)
    for batch in calibration_batches(shape, n=2):
        prepared(batch)
    return prepared, torch.randn(shape)


def _choices(gm: torch.fx.GraphModule) -> dict[str, list]:
    return {n.target: [d for d in qinfo(n).decisions if d.action == "engine_choice"]
            for n in gm.graph.nodes if n.op == "call_module"}


def _within_one_step(a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    assert float((a - b).abs().max()) <= scale * 1.0001, float((a - b).abs().max()) / scale


@pytest.mark.parametrize("backend", [b for b in ("x86", "fbgemm") if b in BACKENDS])
def test_engine_choice_measured_is_recorded_and_within_one_step(backend):
    if "onednn" not in supported_engines():
        pytest.skip("no onednn engine in this torch build")
    prepared, x = _prepared_depthwise(backend)
    with engine_choice.options(enabled=False):
        own = fxquant.convert_fx(prepared)
    engine_choice.clear_cache()
    with engine_choice.options(min_kernel_ms=0.0, repeats=2):
        chosen = fxquant.convert_fx(prepared)
    assert all(not ds for ds in _choices(own).values())  # switched off: nothing measured
    choices = _choices(chosen)
    assert set(choices) == {"pw", "dw", "pw2"}
    for target, (d,) in choices.items():
        assert d.detail["engine"] in (backend, "onednn", "qnnpack")
        assert {backend, "onednn"} <= set(d.detail["times_ms"]), d.detail
        assert all(t > 0 for t in d.detail["times_ms"].values())
        module = chosen.get_submodule(target)
        assert module.packed_engine == d.detail["engine"]
        if d.detail["engine"] != backend:
            assert "faster" in d.reason and d.detail["steps_vs_own"][d.detail["engine"]] <= 1
    scale = float(chosen.get_submodule("pw2").scale)
    with torch.no_grad():
        _within_one_step(chosen(x), own(x), scale)


def test_engine_choice_forced_packs_for_onednn_under_x86():
    if not {"x86", "onednn"} <= set(supported_engines()):
        pytest.skip("needs the x86 and onednn engines")
    prepared, x = _prepared_depthwise("x86")
    with engine_choice.options(enabled=False):
        own = fxquant.convert_fx(prepared)
    with engine_choice.options(force="onednn", repeats=1):
        forced = fxquant.convert_fx(prepared)
    dw = forced.get_submodule("dw")
    assert dw.packed_engine == "onednn" and own.get_submodule("dw").packed_engine == "x86"
    (d,) = _choices(forced)["dw"]
    assert d.detail["engine"] == "onednn" and "forced" in d.reason
    lowered = [r for n in forced.graph.nodes if n.op == "call_module" and n.target == "dw"
               for r in (qinfo(n).kernel,)]
    assert "onednn" in lowered[0]
    torch.backends.quantized.engine = "x86"
    with torch.no_grad():
        _within_one_step(forced(x), own(x), float(forced.get_submodule("pw2").scale))


def test_engine_choice_never_packs_conv3d_for_qnnpack():
    """qnnpack cannot unpack a Conv3d's weights: a choice of qnnpack (faster on a loaded
    machine) broke state_dict and TorchScript save (test_serialization's conv3d case)."""
    if not {"x86", "qnnpack"} <= set(supported_engines()):
        pytest.skip("needs the x86 and qnnpack engines")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 4, 6, 6, 6)
    torch.backends.quantized.engine = "x86"
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (x,),
                                  backend="x86")
    prepared(x)
    with engine_choice.options(force="qnnpack", repeats=1, min_kernel_ms=0.0):
        quantized = fxquant.convert_fx(prepared)
    assert quantized.get_submodule("0").packed_engine != "qnnpack"
    quantized.load_state_dict(quantized.state_dict())  # unpacks every weight


# -------------------------------------------------------------------- first-call kernel state
@pytest.mark.parametrize("backend", BACKENDS)
def test_forget_first_call_repacks_only_where_the_kernel_caches(backend):
    """oneDNN keeps the primitive built for the first input shape (x86 hands convs to oneDNN on
    VNNI CPUs); convert runs the modules at the example shape, so modules packed for x86 /
    onednn repack (a new packed object, the same weights and outputs at any batch)."""
    from fxquant.backends.engine import engine, keeps_first_call_primitive

    torch.manual_seed(0)
    _, qmodel, _ = convert_both(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).eval(),
                                backend, (4, 8, 12, 12))
    conv = next(m for m in qmodel.modules() if callable(getattr(m, "forget_first_call", None)))
    x1, x4 = torch.randn(1, 8, 12, 12), torch.randn(4, 8, 12, 12)
    with engine(backend):
        before = [qmodel(x4), qmodel(x1)]
        packed, w_before = conv._packed_params, conv.weight().int_repr().clone()
        repacked = conv.forget_first_call()
        after = [qmodel(x4), qmodel(x1)]
    assert repacked == keeps_first_call_primitive(conv.packed_engine)
    assert (conv._packed_params is not packed) == repacked
    assert torch.equal(conv.weight().int_repr(), w_before)
    for b, a in zip(before, after):
        assert torch.equal(b, a)


def test_convert_repacks_every_module_it_ran(monkeypatch):
    """Lowering calls forget_first_call on every packed module once it has run them all (after
    the probe, kernel check and engine choice), so a model prepared with a batch-4 example and
    run at batch 1 gets fresh kernels (ResNet-18: 1.3x faster at batch 1 on a VNNI CPU)."""
    from fxquant.nn.quantized import _PackedWeighted

    seen: list[int] = []
    original = _PackedWeighted.forget_first_call

    def counting(self):
        seen.append(id(self))
        return original(self)

    monkeypatch.setattr(_PackedWeighted, "forget_first_call", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    _, qmodel, _ = convert_both(model.eval(), BACKENDS[0], (4, 3, 12, 12))
    packed = [id(m) for m in qmodel.modules() if isinstance(m, _PackedWeighted)]
    assert len(packed) == 3
    assert sorted(seen) == sorted(packed)
