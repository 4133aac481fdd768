"""WeightQParams, the engine() context manager and the reference weighted modules."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from fxquant.backends.engine import current_engine, engine, supported_engines
from fxquant.nn import fused, reference as R
from fxquant.nn.common import WeightQParams

warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")


def per_tensor(w: torch.Tensor) -> WeightQParams:
    return WeightQParams(w.detach().abs().max() / 127, 0, torch.qint8, torch.per_tensor_symmetric)


def per_channel(w: torch.Tensor, axis: int = 0) -> WeightQParams:
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims)
    return WeightQParams(amax / 127, torch.zeros(amax.numel(), dtype=torch.long), torch.qint8,
                         torch.per_channel_affine, ch_axis=axis)


# ---------------------------------------------------------------------------------------------
# WeightQParams


@pytest.fixture(scope="module")
def ao_quant():
    return pytest.importorskip("torch.ao.quantization")


@pytest.mark.parametrize("make_obs", [
    lambda q: q.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
    lambda q: q.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine),
    lambda q: q.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                               quant_min=-127, quant_max=127),
    lambda q: q.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    lambda q: q.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8,
                                         qscheme=torch.per_channel_affine),
    lambda q: q.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                         quant_min=-100, quant_max=100),
    lambda q: q.FakeQuantize(observer=q.MovingAverageMinMaxObserver, dtype=torch.qint8,
                             qscheme=torch.per_tensor_symmetric, quant_min=-128, quant_max=127),
], ids=["pt_sym", "pt_affine", "pt_sym_127", "pc_sym", "pc_affine_axis1", "pc_sym_100",
        "fake_quant"])
def test_from_observer_quantizes_like_torch(ao_quant, make_obs) -> None:
    from torch.ao.nn.quantized.modules.utils import _quantize_weight

    w = torch.randn(6, 5, 3) * 0.3
    w[0, 0, 0], w[1, 0, 1] = 1.5, -1.5  # outliers both ways
    obs = make_obs(ao_quant)
    obs(w)
    wq = WeightQParams.from_observer(obs)
    w = w * 1.5  # beyond the observed range: reduced ranges must clamp like torch
    ours, theirs = wq.quantize(w), _quantize_weight(w, obs)
    assert ours.qscheme() == theirs.qscheme()
    assert torch.equal(ours.int_repr(), theirs.int_repr())
    assert torch.equal(ours.dequantize(), theirs.dequantize())
    assert (wq.quant_min, wq.quant_max) == (obs.quant_min, obs.quant_max)
    assert torch.equal(wq.fake_quantize(w), theirs.dequantize())
    assert torch.equal(wq.dequantized(w), theirs.dequantize())


def test_reduced_range_is_clamped() -> None:
    w = torch.tensor([-1.0, 0.0, 1.0])
    wq = WeightQParams(1.0 / 127, 0, quant_min=-100, quant_max=100)
    assert wq.quantize(w).int_repr().tolist() == [-100, 0, 100]
    assert WeightQParams(1.0 / 127, 0).quantize(w).int_repr().tolist() == [-127, 0, 127]


def test_symmetric_quantizes_like_affine() -> None:
    w = torch.randn(4, 3)
    sym = WeightQParams(0.01, 0, qscheme=torch.per_tensor_symmetric).quantize(w)
    aff = WeightQParams(0.01, 0, qscheme=torch.per_tensor_affine).quantize(w)
    assert sym.qscheme() == torch.per_tensor_affine
    assert torch.equal(sym.int_repr(), aff.int_repr())


def test_normalizes_and_compares_by_value() -> None:
    a = WeightQParams(0.5, 3)
    b = WeightQParams(torch.tensor([0.5]), torch.tensor(3))
    assert a.scale.dtype == torch.float32 and a.zero_point.dtype == torch.int64
    assert a.scale.shape == (1,) and (a.quant_min, a.quant_max) == (-128, 127)
    assert a == b and hash(a) == hash(b)
    assert a != WeightQParams(0.5, 4)
    w = torch.randn(3, 2)
    pc = per_channel(w)
    assert pc == per_channel(w.clone()) and pc != per_channel(w * 2)
    assert pc != a and len({pc, a, b}) == 2
    with pytest.raises(Exception):
        a.scale = torch.tensor([1.0])  # frozen


@pytest.mark.parametrize("kwargs,match", [
    (dict(scale=torch.ones(3), zero_point=torch.zeros(3, dtype=torch.long)),
     "needs a 1-element scale"),
    (dict(scale=torch.ones(3), zero_point=torch.zeros(2, dtype=torch.long),
          qscheme=torch.per_channel_affine), "3 elements but zero_point has 2"),
    (dict(scale=0.1, zero_point=0, dtype=torch.float16), "dtype must be one of"),
    (dict(scale=0.1, zero_point=0, qscheme=torch.per_channel_affine_float_qparams),
     "not supported for weights"),
    (dict(scale=0.0, zero_point=0), "finite and > 0"),
    (dict(scale=0.1, zero_point=0, quant_min=-200), r"within torch.qint8's \[-128, 127\]"),
    (dict(scale=0.1, zero_point=torch.tensor([0.5])), "zero_point must be a integer tensor"),
])
def test_invalid_qparams_say_what_is_wrong(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        WeightQParams(**kwargs)


def test_per_channel_count_must_match_the_weight() -> None:
    wq = per_channel(torch.randn(4, 3))
    with pytest.raises(ValueError, match="4 per-channel scales but the weight has 5 channels"):
        wq.quantize(torch.randn(5, 3))
    with pytest.raises(ValueError, match="ch_axis=3 is out of range"):
        WeightQParams(wq.scale, wq.zero_point, qscheme=torch.per_channel_affine,
                      ch_axis=3).quantize(torch.randn(4, 3))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.floats(1e-3, 1.0), st.integers(-20, 20),
       st.booleans())
def test_quantize_round_trip_error_is_at_most_half_a_step(rows: int, cols: int, scale: float,
                                                          zp: int, channel: bool) -> None:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    w = torch.randn(rows, cols, generator=g) * scale * 20
    if channel:
        wq = WeightQParams(torch.full((rows,), scale), torch.full((rows,), zp),
                           qscheme=torch.per_channel_affine)
    else:
        wq = WeightQParams(scale, zp)
    q = wq.quantize(w)
    inside = (q.int_repr() > -128) & (q.int_repr() < 127)
    err = (wq.fake_quantize(w) - w).abs()
    assert bool((err[inside] <= scale / 2 * (1 + 1e-5)).all())


# ---------------------------------------------------------------------------------------------
# engine()


def test_engine_sets_and_restores_even_on_error() -> None:
    before = current_engine()
    other = next(e for e in supported_engines() if e != before)
    with engine(other) as name:
        assert name == other and torch.backends.quantized.engine == other
    assert current_engine() == before
    with pytest.raises(RuntimeError, match="boom"):
        with engine(other):
            raise RuntimeError("boom")
    assert current_engine() == before


def test_engine_rejects_unknown_names_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="'fbgem' is not supported.*pick one of.*fbgemm"):
        with engine("fbgem"):
            pass
    with pytest.raises(TypeError, match="must be a str"):
        with engine(None):  # type: ignore[arg-type]
            pass


# ---------------------------------------------------------------------------------------------
# reference modules

FLOATS = {
    "Linear": (lambda: nn.Linear(6, 5), (3, 6)),
    "Conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9)),
    "Conv2d": (lambda: nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(1, 2)), (2, 4, 6, 6)),
    "Conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1, bias=False), (1, 4, 4, 4, 4)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1),
                        (2, 4, 5)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 4, 4)),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2), (1, 4, 2, 3, 3)),
}
NAMES = list(FLOATS)


def build(name: str, channel: bool) -> tuple[nn.Module, WeightQParams, nn.Module]:
    torch.manual_seed(0)
    fmod = FLOATS[name][0]()
    transposed = name.startswith("ConvTranspose")
    wq = per_channel(fmod.weight, 1 if transposed else 0) if channel else per_tensor(fmod.weight)
    return fmod, wq, getattr(R, name).from_float(fmod, wq)


def float_forward(fmod: nn.Module, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(fmod, nn.Linear):
        return F.linear(x, w, fmod.bias)
    if fmod.transposed:
        op = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[w.dim() - 2]
        return op(x, w, fmod.bias, fmod.stride, fmod.padding, fmod.output_padding, fmod.groups,
                  fmod.dilation)
    return fmod._conv_forward(x, w, fmod.bias)


@pytest.mark.parametrize("channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_is_float_op_on_fake_quantized_weight(name: str, channel: bool) -> None:
    fmod, wq, ref = build(name, channel)
    x = torch.randn(FLOATS[name][1])
    want = float_forward(fmod, wq.fake_quantize(fmod.weight), x)
    assert torch.equal(ref(x), want)
    assert not torch.equal(ref(x), fmod(x))  # the weight really was rounded
    assert ref.weight is not None and torch.equal(ref.weight, fmod.weight)
    assert ref.weight_qparams() == wq
    assert torch.equal(ref.quantized_weight().int_repr(), wq.quantize(fmod.weight).int_repr())


@pytest.mark.parametrize("channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_torch_ao_reference_module(name: str, channel: bool) -> None:
    nnqr = pytest.importorskip("torch.ao.nn.quantized.reference")
    fmod, wq, ref = build(name, channel)
    qparams = {"qscheme": wq.affine_qscheme, "dtype": wq.dtype, "scale": wq.scale,
               "zero_point": wq.zero_point, "axis": wq.ch_axis}
    theirs = getattr(nnqr, name).from_float(fmod, qparams)
    x = torch.randn(FLOATS[name][1])
    assert torch.equal(ref(x), theirs(x))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_into_a_fresh_module(name: str) -> None:
    fmod, wq, ref = build(name, channel=True)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["weight_qscheme"] == torch.per_channel_affine and sd["weight_dtype"] == torch.qint8
    fresh = getattr(R, name).from_float(FLOATS[name][0](), WeightQParams(1.0, 0))
    x = torch.randn(FLOATS[name][1])
    assert not torch.equal(fresh(x), ref(x))
    fresh.load_state_dict(sd)
    assert fresh.weight_qparams() == wq
    assert torch.equal(fresh(x), ref(x))


def test_incomplete_qparams_in_state_dict_is_an_error() -> None:
    _, _, ref = build("Linear", channel=False)
    sd = ref.state_dict()
    del sd["weight_qscheme"]
    with pytest.raises(RuntimeError, match="Missing key.*weight_qscheme"):
        R.Linear(6, 5).load_state_dict(sd)


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_and_jit_script(name: str) -> None:
    _, _, ref = build(name, channel=True)
    x = torch.randn(FLOATS[name][1])
    buf = io.BytesIO()
    torch.save(ref, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), ref(x))
    assert torch.equal(torch.jit.script(ref)(x), ref(x))


def test_jit_script_with_reduced_range() -> None:
    lin = nn.Linear(6, 5)
    ref = R.Linear.from_float(lin, WeightQParams(lin.weight.abs().max() / 127, 0,
                                                 quant_min=-20, quant_max=20))
    x = torch.randn(2, 6)
    assert ref.quantized_weight().int_repr().abs().max() == 20
    assert torch.equal(torch.jit.script(ref)(x), ref(x))


def test_conv_transpose_output_size() -> None:
    _, _, ref = build("ConvTranspose2d", channel=False)
    x = torch.randn(1, 4, 4, 4)
    assert ref(x).shape[-2:] == (9, 9)
    assert ref(x, output_size=[10, 10]).shape[-2:] == (10, 10)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_padding_modes(mode: str) -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)
    wq = per_tensor(conv.weight)
    ref = R.Conv2d.from_float(conv, wq)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(ref(x), conv._conv_forward(x, wq.fake_quantize(conv.weight), conv.bias))


def test_repr_names_the_weight_qparams() -> None:
    _, _, ref = build("Conv2d", channel=True)
    text = repr(ref)
    assert text.startswith("ReferenceQuantizedConv2d(4, 6, kernel_size=(3, 2)")
    assert "weight_dtype=torch.qint8" in text
    assert "weight_qscheme=torch.per_channel_affine, axis=0" in text
    assert repr(build("Linear", False)[2]).startswith(
        "ReferenceQuantizedLinear(in_features=6, out_features=5")


def test_from_float_takes_only_the_plain_float_module() -> None:
    conv = nn.Conv2d(3, 4, 3)
    wq = per_tensor(conv.weight)
    with pytest.raises(TypeError, match="plain Conv2d.*ConvReLU2d.*\\[0\\]"):
        R.Conv2d.from_float(fused.ConvReLU2d(conv, nn.ReLU()), wq)
    with pytest.raises(TypeError, match="takes a float Conv2d, got Conv1d"):
        R.Conv2d.from_float(nn.Conv1d(3, 4, 3), wq)
    with pytest.raises(TypeError, match="got Conv2d"):
        R.Conv2d.from_float(R.Conv2d.from_float(conv, wq), wq)
    with pytest.raises(TypeError, match="WeightQParams.from_observer"):
        R.Conv2d.from_float(conv, {"scale": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="5 per-channel scales but the weight has 4"):
        R.Conv2d.from_float(conv, per_channel(torch.randn(5, 1)))
