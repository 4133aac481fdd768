"""Issue 9, graph bugs: models that quantized without an error but computed something else
than float.

1. In-place writes through views (``y = conv(x)[:, :]; y.relu_()``, ``z[:, :2].mul_(2)``,
   ``z.relu_()`` with a view of ``z`` alive): a quantize/dequantize pair is a copy, so a copy
   inside the alias class, or an observer placed before the write that its reader comes after,
   hid the write.
2. cat's shared observer: cats that reach each other through pools, reshapes or a shared
   tensor must end with one scale/zero_point per cat (union of the "must share"
   constraints), where re-pointing observer names one cat after another split earlier cats.

Each case: the converted model (``convert_fx``) within 1 dB of fxquant's own reference graph
(``convert_to_reference_fx``) on the same data, and an absolute SQNR floor against float, on
x86 and qnnpack. The floors: 8-bit activations give ~38 dB on these conv outputs (qnnpack);
x86's default observers reduce the range to 7 bits (~6 dB less), and a write that doubles part
of a tensor widens the range it is quantized with. Measured (this machine, and with AVX2
simulated; the data is seeded, and neither backend saturates here: x86 uses reduce_range)
x86 28.8-38.6 dB / qnnpack 32.6-42.1 dB for the in-place cases, x86 28.0-33.3 dB / qnnpack
32.0-37.6 dB for the cat models, converted equal to reference to 0.1 dB; the floor is 24 dB.
Before the fixes the in-place cases gave -0.6 to 13 dB and 8 of 10 cat cases had a cat whose
inputs had different qparams (or ran float).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.meta import qinfo
from tests.models import build, calibration_batches

BACKENDS = ("x86", "qnnpack")
SHAPE = (4, 3, 8, 8)
FLOOR_DB = 24.0


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().double(), test.detach().double()
    noise = float(((ref - test) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref * ref).sum()) / noise)


def quantize(model: nn.Module, backend: str, shape=SHAPE):
    """(prepared and calibrated, reference graph, converted graph)."""
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend),
                                  (torch.randn(*shape),), backend=backend)
    with torch.no_grad():
        for batch in calibration_batches(shape, n=4):
            prepared(batch)
    reference = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
    converted = fxquant.convert_fx(copy.deepcopy(prepared))
    return prepared, reference, converted


def outputs(model, reference, converted, backend, shape=SHAPE):
    """Float, reference and converted outputs (tuples) on one seeded batch not used in
    calibration; every model gets its own copy of the input (some write their input)."""
    x = calibration_batches(shape, n=1, seed=7)[0]
    torch.backends.quantized.engine = backend
    with torch.no_grad():
        runs = [m(x.clone()) for m in (model, reference, converted)]
    return [r if isinstance(r, tuple) else (r,) for r in runs]


def assert_close_to_float(model, backend, shape=SHAPE):
    """converted ~ reference (1 dB) and converted vs float >= FLOOR_DB, for every output.
    Returns the (float, converted) outputs."""
    prepared, reference, converted = quantize(model, backend, shape)
    want, ref, got = outputs(model, reference, converted, backend, shape)
    for w, r, g in zip(want, ref, got):
        s_ref, s_q = sqnr(w, r), sqnr(w, g)
        assert s_q >= FLOOR_DB, f"converted {s_q:.1f} dB vs float (reference {s_ref:.1f} dB)"
        assert abs(s_q - s_ref) <= 1.0, f"converted {s_q:.1f} dB, reference {s_ref:.1f} dB"
    return want, got, converted


# ------------------------------------------------------------------ 1. in place through views
class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)


class SliceReLU(_Convs):
    def forward(self, x):
        y = self.conv(x)[:, :]
        y.relu_()
        return y


class ViewAdd(_Convs):
    def forward(self, x):
        y = self.conv(x).view(x.shape[0], -1)
        y.add_(1)
        return y


class SliceMulBase(_Convs):
    def forward(self, x):
        z = self.conv(x)
        z[:, :2].mul_(2)
        return z


class TransposeReLU(_Convs):
    def forward(self, x):
        y = self.conv(x).transpose(1, 2)
        y.relu_()
        return y


class SliceReLUBase(_Convs):
    """The write goes through a view; the output is the base tensor."""

    def forward(self, x):
        z = self.conv(x)
        y = z[:, :]
        y.relu_()
        return z


class ViewAliveReLU(_Convs):
    """In place on a tensor whose view is alive: the view (the output) sees the write."""

    def forward(self, x):
        z = self.conv(x)
        v = z.view(x.shape[0], -1)
        z.relu_()
        return v


class SliceMulThenConv(_Convs):
    """A quantized op reads the base after the write: observed where it reads."""

    def forward(self, x):
        z = self.conv(x)
        z[:, :2].mul_(2)
        return self.conv2(z)


class SliceReLUThenConv(_Convs):
    def forward(self, x):
        z = self.conv(x)
        z[:, 1:3].relu_()
        return self.conv2(z)


class TransposedViewWrittenThroughBase(_Convs):
    def forward(self, x):
        z = self.conv(x)
        v = z.transpose(2, 3)
        z.add_(1)
        return self.conv2(v.transpose(2, 3))


class WriteThenCatTwice(_Convs):
    def forward(self, x):
        z = self.conv(x)
        z[:, :2].mul_(2)
        return torch.cat([z, z], 1)


class ReadBeforeAndAfter(_Convs):
    """One quantized reader before the write (sees the old values), one after (the new)."""

    def forward(self, x):
        z = self.conv(x)
        before = self.conv2(z)
        z[:, :2].relu_()
        return before, z + 1


class WriteGraphInput(_Convs):
    def forward(self, x):
        x[:, :1].mul_(0.5)
        return self.conv(x)


RELU_ALL = (SliceReLU, TransposeReLU, SliceReLUBase, ViewAliveReLU)
IN_PLACE = RELU_ALL + (ViewAdd, SliceMulBase, SliceMulThenConv, SliceReLUThenConv,
                       TransposedViewWrittenThroughBase, WriteThenCatTwice, ReadBeforeAndAfter,
                       WriteGraphInput)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factory", IN_PLACE, ids=lambda f: f.__name__)
def test_in_place_write_through_a_view_is_kept(factory, backend):
    assert_close_to_float(build(factory), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factory", RELU_ALL, ids=lambda f: f.__name__)
def test_relu_through_a_view_reaches_the_output_exactly(factory, backend):
    """The ReLU runs on the float tensor the output is: not one value below zero."""
    want, got, _ = assert_close_to_float(build(factory), backend)
    assert float(want[0].min()) >= 0 and float(got[0].min()) >= 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_slice_write_doubles_exactly_the_slice(backend):
    """``z[:, :2].mul_(2)``: channels 0-1 of the output are twice what they would be."""
    model = build(SliceMulBase)
    want, got, _ = assert_close_to_float(model, backend)
    plain = model.conv(calibration_batches(SHAPE, n=1, seed=7)[0])
    assert sqnr(2 * plain[:, :2], got[0][:, :2]) > FLOOR_DB
    assert sqnr(plain[:, 2:], got[0][:, 2:]) > FLOOR_DB


def test_views_and_writes_stay_float_with_the_reason():
    _, _, converted = quantize(build(SliceMulThenConv), "x86")
    kept = [n for n in converted.graph.nodes
            if n.op != "placeholder" and qinfo(n).last("keep_float") is not None
            and "mutates in place" in qinfo(n).last("keep_float").reason]
    assert {n.op for n in kept} == {"call_function", "call_method"}  # getitem and mul_
    assert len(kept) == 2
    # conv and conv2 still run int8
    mods = [type(m).__module__ for n, m in converted.named_modules() if n in ("conv", "conv2")]
    assert all("fxquant.nn" in m for m in mods)


def test_read_before_the_write_keeps_the_old_values():
    model = build(ReadBeforeAndAfter)
    want, got, _ = assert_close_to_float(model, "x86")
    x = calibration_batches(SHAPE, n=1, seed=7)[0]
    unwritten = model.conv2(model.conv(x))
    assert sqnr(unwritten, got[0]) > FLOOR_DB  # conv2 read z before the ReLU
    # z + 1 read it after: not below 1 by more than half the output's step (1.0 itself need
    # not be on the output's integer grid)
    grid = got[1].unique()
    half_step = float((grid[1:] - grid[:-1]).min()) / 2
    assert float((got[1][:, :2] - 1).min()) >= -half_step * 1.001


def test_view_of_a_quantized_conv_runs_float_after_a_float_region():
    """A float ``view`` of an int8 conv's dequantized output: the quantized conv returns
    channels-last, where float gave a contiguous tensor; ``view`` on it raised."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(x.view(x.shape[0], -1))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = Head()

        def forward(self, x):
            return self.head(self.conv(x))

    model = build(Model)
    for backend in BACKENDS:
        mapping = fxquant.get_default_qconfig_mapping(backend).set_module_name("head", None)
        prepared = fxquant.prepare_fx(model, mapping, (torch.randn(*SHAPE),), backend=backend)
        for batch in calibration_batches(SHAPE, n=4):
            prepared(batch)
        converted = fxquant.convert_fx(prepared)
        x = calibration_batches(SHAPE, n=1, seed=7)[0]
        torch.backends.quantized.engine = backend
        assert sqnr(model(x), converted(x)) > FLOOR_DB


# ------------------------------------------------------------------ 2. cat's shared observer
def _cbr(cin: int, cout: int, k: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout),
                         nn.ReLU())


class TwoBranch(nn.Module):
    """cat1 -> max_pool -> cat2, the pooled cat first in cat2."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        cat1 = torch.cat([self.a(x), self.b(x)], 1)
        p = F.max_pool2d(cat1, 2)
        return torch.cat([p, self.c(p)], 1)


class TwoBranchReversed(TwoBranch):
    """The pooled cat second in cat2: cat2's union used to re-point cat1's observer name."""

    def forward(self, x):
        cat1 = torch.cat([self.a(x), self.b(x)], 1)
        p = F.max_pool2d(cat1, 2)
        return torch.cat([self.c(p), p], 1)


class InceptionLike(nn.Module):
    """Cats fed through pools and reshapes, a tensor that feeds two cats, a cat input that is
    also a graph output, a pool branch inside a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.b1a, self.b1b = _cbr(8, 4), _cbr(8, 4, 3)
        self.b2a, self.b2b = _cbr(16, 6), _cbr(16, 6, 3)
        self.b3 = _cbr(22, 8, 3)

    def forward(self, x):
        x = self.stem(x)
        c1 = torch.cat([self.b1a(x), self.b1b(x), F.max_pool2d(x, 3, 1, 1)], 1)  # 16
        p1 = F.max_pool2d(c1, 2)
        c2 = torch.cat([self.b2a(p1), p1], 1)  # 22
        c3 = torch.cat([p1, self.b2b(p1)], 1)  # p1 feeds two cats
        r = c3.reshape(c3.shape[0], 2, 11, 4, 4).flatten(1, 2)
        b3 = self.b3(c2)
        c4 = torch.cat([b3, r], 1)
        return c4, b3  # b3: a cat input and a graph output


class SigmoidIntoCat(nn.Module):
    """A fixed-qparams input (sigmoid: [0, 1)) and a conv: the conv must not be clipped to
    the sigmoid's range, nor the sigmoid lose its fixed qparams."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        s = torch.sigmoid(self.a(x))
        b = self.b(x)
        return torch.cat([s, b], 1), torch.cat([b, s], 1)


class ScalarOpIntoCat(nn.Module):
    """``x + 0.5`` / ``x * 2``: quantized::mul_scalar / add_scalar choose their output qparams
    from their input's, so they cannot share the cat's: requantized into it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return torch.cat([a + 0.5, b], 1), torch.cat([b, F.max_pool2d(a * 2, 3, 1, 1)], 1)


CATS = (TwoBranch, TwoBranchReversed, InceptionLike, SigmoidIntoCat, ScalarOpIntoCat)


def _cats(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat]


def assert_cats_share_one_observer(prepared: fx.GraphModule) -> None:
    """Every cat's input observers and its output observer call one module."""
    for cat in _cats(prepared):
        ins = list(cat.args[0])
        outs = list(cat.users)
        assert all(qinfo(n).role == "observer" for n in ins + outs), cat.name
        mods = {id(prepared.get_submodule(str(n.target))) for n in ins + outs}
        assert len(mods) == 1, f"{cat.name}: {len(mods)} observer modules"


def cat_qparams(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, list[tuple[float, int]]]:
    """(scale, zero_point) of each cat's inputs then output, read off the tensors as the
    converted graph runs."""
    seen: dict[str, list[tuple[float, int]]] = {}

    class Spy(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target is torch.cat:
                ts = [*self.env_of(n.args[0]), out]
                assert all(t.is_quantized for t in ts), f"{n.name} runs float"
                seen[n.name] = [(t.q_scale(), t.q_zero_point()) for t in ts]
            return out

        def env_of(self, nodes):
            return [self.env[a] for a in nodes]

    with torch.no_grad():
        Spy(gm).run(x)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factory", CATS, ids=lambda f: f.__name__)
def test_each_cat_has_one_scale(factory, backend):
    model = build(factory)
    prepared, reference, converted = quantize(model, backend)
    assert_cats_share_one_observer(prepared)
    qps = cat_qparams(converted, calibration_batches(SHAPE, n=1, seed=7)[0])
    assert len(qps) == len(_cats(prepared))
    for name, qp in qps.items():
        assert len(set(qp)) == 1, f"{name}: inputs/output qparams {qp}"
    assert_close_to_float(model, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_cat_output_is_not_zero(backend):
    """The small two-branch model: cat1's output (read by the max_pool) carries the data."""
    model = build(TwoBranchReversed)
    _, _, converted = quantize(model, backend)
    x = calibration_batches(SHAPE, n=1, seed=7)[0]
    first = _cats(converted)[0]
    values = {}

    class Spy(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is first:
                values["cat1"] = out.dequantize()
            return out

    torch.backends.quantized.engine = backend
    with torch.no_grad():
        Spy(converted).run(x)
    want = torch.cat([model.a(x), model.b(x)], 1)
    assert float(values["cat1"].abs().max()) > 0
    assert sqnr(want, values["cat1"]) > FLOOR_DB


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_qparams_input_is_requantized_into_the_cat(backend):
    prepared, _, converted = quantize(build(SigmoidIntoCat), backend)
    sig_obs = next(n for n in prepared.graph.nodes if qinfo(n).role == "observer"
                   and n.args[0].target is torch.sigmoid)
    assert prepared.get_submodule(str(sig_obs.target)).__class__.__name__ \
        .startswith("FixedQParams")
    requant = [n for n in prepared.graph.nodes if qinfo(n).role == "observer"
               and n.args[0] is sig_obs]
    assert len(requant) == 2  # one per cat: the sigmoid keeps its own fixed observer
    assert all("requantized" in qinfo(n).decisions[0].reason for n in requant)


def test_union_survives_any_cat_order():
    """cat2 joins cat1's set through the pool whichever of its inputs comes first: conv a,
    conv b, cat1, the pool, conv c and cat2 are measured by one observer module."""
    for factory in (TwoBranch, TwoBranchReversed):
        prepared, _, _ = quantize(build(factory), "x86")
        observers = [n for n in prepared.graph.nodes if qinfo(n).role == "observer"]
        inner = {id(prepared.get_submodule(str(n.target))) for n in observers
                 if n.args[0].op != "placeholder"}
        assert len(observers) == 7 and len(inner) == 1, factory.__name__


def test_qat_cats_share_one_fake_quant():
    model = build(InceptionLike).train()
    prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("x86"),
                                      (torch.randn(*SHAPE),), backend="x86")
    for batch in calibration_batches(SHAPE, n=2):
        prepared(batch)
    assert_cats_share_one_observer(prepared)
    converted = fxquant.convert_fx(prepared.eval())
    qps = cat_qparams(converted, calibration_batches(SHAPE, n=1, seed=7)[0])
    assert qps and all(len(set(qp)) == 1 for qp in qps.values())
