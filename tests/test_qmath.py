"""fxquant.qmath: integer ranges, scale / zero point and histogram math, against torch.ao."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fxquant import qmath

tq_utils = pytest.importorskip("torch.ao.quantization.utils")
tq_obs = pytest.importorskip("torch.ao.quantization.observer")


INT_DTYPES = [
    torch.quint8,
    torch.qint8,
    torch.qint32,
    torch.quint4x2,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.int32,
]
FULL = {
    torch.quint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.qint32: (-(2**31), 2**31 - 1),
    torch.quint4x2: (0, 15),
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.uint16: (0, 2**16 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
}
F32 = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_subnormal=False, allow_nan=False, width=32)


def assert_bit_identical(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN == NaN when the bits agree)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got, expected)
    if got.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        got, expected = got.contiguous().view(bits), expected.contiguous().view(bits)
    assert torch.equal(got, expected), (got, expected)


def _torch_qmin_qmax(dtype, qmin, qmax, reduce_range):
    custom = qmin is not None and qmax is not None
    return tq_utils.calculate_qmin_qmax(qmin, qmax, custom, dtype, reduce_range)


# -- quant_range -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "reduce_range", "expected"),
    [
        (torch.quint8, False, (0, 255)),
        (torch.quint8, True, (0, 127)),
        (torch.qint8, False, (-128, 127)),
        (torch.qint8, True, (-64, 63)),
        (torch.qint32, False, (-(2**31), 2**31 - 1)),
        (torch.qint32, True, (-(2**31), 2**31 - 1)),
        (torch.quint4x2, False, (0, 15)),
        (torch.quint4x2, True, (0, 15)),
    ],
)
def test_quant_range_defaults(dtype, reduce_range, expected):
    assert qmath.quant_range(dtype, reduce_range=reduce_range) == expected


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("reduce_range", [False, True])
def test_quant_range_default_matches_torch(dtype, reduce_range):
    assert qmath.quant_range(dtype, reduce_range=reduce_range) == _torch_qmin_qmax(dtype, None, None, reduce_range)


@st.composite
def custom_ranges(draw):
    dtype = draw(st.sampled_from(INT_DTYPES))
    lo, hi = FULL[dtype]
    qmin = draw(st.integers(lo, 0))
    qmax = draw(st.integers(max(qmin + 1, 0), hi))
    return dtype, qmin, qmax, draw(st.booleans())


@given(custom_ranges())
@settings(max_examples=200, deadline=None)
def test_quant_range_custom_matches_torch(case):
    dtype, qmin, qmax, reduce_range = case
    expected = _torch_qmin_qmax(dtype, qmin, qmax, reduce_range)
    if expected[0] >= expected[1]:  # torch accepts a range that reduce_range empties; we refuse
        with pytest.raises(ValueError, match="halves the custom range"):
            qmath.quant_range(dtype, qmin, qmax, reduce_range)
        return
    assert qmath.quant_range(dtype, qmin, qmax, reduce_range) == _torch_qmin_qmax(dtype, qmin, qmax, reduce_range)


def test_quant_range_custom_reduce_halves():
    assert qmath.quant_range(torch.qint8, -127, 127, reduce_range=True) == (-64, 63)
    assert qmath.quant_range(torch.quint8, 0, 15) == (0, 15)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.quint8, 1, 255), "must include 0"),
        ((torch.qint8, -5, -1), "must include 0"),
        ((torch.quint8, 0, 0), "quant_min < quant_max"),
        ((torch.quint8, 0, 256), r"does not fit torch.quint8, whose range is \[0, 255\]"),
        ((torch.qint8, -129, 127), "does not fit torch.qint8"),
        ((torch.quint4x2, 0, 16), "does not fit torch.quint4x2"),
        ((torch.quint8, 0, None), "give both quant_min and quant_max"),
        ((torch.float16,), "float.*PlaceholderObserver"),
        ((torch.float32,), "no integer quantization range"),
        ((torch.bool,), "unsupported quantized dtype"),
    ],
)
def test_quant_range_errors(args, message):
    with pytest.raises(ValueError, match=message):
        qmath.quant_range(*args)


# -- calculate_qparams -------------------------------------------------------------------


def test_calculate_qparams_known_values():
    scale, zp = qmath.calculate_qparams(
        torch.tensor(-1.0), torch.tensor(1.0), dtype=torch.quint8, qscheme=torch.per_tensor_affine,
        quant_min=0, quant_max=255,
    )
    assert scale.shape == zp.shape == (1,)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    # float32(2/255) is a hair above 2/255, so -1/scale rounds to -127, not -128
    assert scale.item() == pytest.approx(2 / 255) and zp.item() == 127
    # the range always includes 0: [2, 4] quantizes as [0, 4]
    scale, zp = qmath.calculate_qparams(
        torch.tensor(2.0), torch.tensor(4.0), dtype=torch.quint8, qscheme=torch.per_tensor_affine,
        quant_min=0, quant_max=255,
    )
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == 0
    scale, zp = qmath.calculate_qparams(
        torch.tensor(-3.0), torch.tensor(1.0), dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
        quant_min=-128, quant_max=127,
    )
    assert scale.item() == pytest.approx(3 / 127.5) and zp.tolist() == [0] and zp.dtype == torch.int64


def test_calculate_qparams_symmetric_quint8_zero_point():
    kw = dict(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    assert qmath.calculate_qparams(lo, hi, quant_min=0, quant_max=255, **kw)[1].item() == 128
    custom = qmath.calculate_qparams(lo, hi, quant_min=0, quant_max=101, custom_range=True, **kw)
    assert custom[1].item() == 50


def test_calculate_qparams_float_qparams_embedding():
    scale, zp = qmath.calculate_qparams(
        torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 6.0]), dtype=torch.quint8,
        qscheme=torch.per_channel_affine_float_qparams, quant_min=0, quant_max=255,
    )
    assert zp.dtype == torch.float32
    assert scale.tolist() == pytest.approx([2 / 255, 1.0, 4 / 255])  # empty range -> scale 1
    assert zp.tolist() == pytest.approx([255 / 2, 0.0, -2 / (4 / 255)])


def test_calculate_qparams_eps_floors_scale():
    scale, _ = qmath.calculate_qparams(
        torch.tensor(0.0), torch.tensor(0.0), dtype=torch.quint8, qscheme=torch.per_tensor_affine,
        quant_min=0, quant_max=255, eps=2**-12,
    )
    assert scale.item() == 2**-12


def test_calculate_qparams_unobserved_warns_and_defaults():
    for lo, hi in [(torch.tensor(float("inf")), torch.tensor(float("-inf"))), (torch.tensor([]), torch.tensor([]))]:
        with pytest.warns(UserWarning, match="seen no data"):
            scale, zp = qmath.calculate_qparams(
                lo, hi, dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255
            )
        assert scale.tolist() == [1.0] and zp.tolist() == [0] and zp.dtype == torch.int64


def test_calculate_qparams_errors():
    with pytest.raises(ValueError, match="min_val .* exceeds max_val"):
        qmath.calculate_qparams(
            torch.tensor(2.0), torch.tensor(1.0), dtype=torch.quint8, qscheme=torch.per_tensor_affine,
            quant_min=0, quant_max=255,
        )
    with pytest.raises(ValueError, match="unsupported qscheme"):
        qmath.calculate_qparams(
            torch.tensor(0.0), torch.tensor(1.0), dtype=torch.quint8, qscheme="affine", quant_min=0, quant_max=255,
        )


def _torch_observer_for(qscheme, dtype, reduce_range, qmin, qmax, eps):
    cls = tq_obs.MinMaxObserver if qmath.is_per_tensor(qscheme) else tq_obs.PerChannelMinMaxObserver
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=qmin, quant_max=qmax, eps=eps)


@st.composite
def qparams_cases(draw):
    qscheme = draw(st.sampled_from(qmath.SUPPORTED_QSCHEMES))
    dtype = draw(st.sampled_from(INT_DTYPES))
    reduce_range = draw(st.booleans())
    assume(not (qmath.is_symmetric(qscheme) and reduce_range and dtype == torch.quint8))
    qmin = qmax = None
    if draw(st.booleans()):
        lo, hi = FULL[dtype]
        qmin = draw(st.integers(lo, 0))
        qmax = draw(st.integers(max(qmin + 1, 0), hi))
        assume(not reduce_range or qmin // 2 < qmax // 2)
    eps = draw(st.sampled_from([torch.finfo(torch.float32).eps, 2**-12, 1e-3]))
    channels = None if qmath.is_per_tensor(qscheme) else draw(st.integers(1, 5))
    pairs = draw(st.lists(st.tuples(F32, F32), min_size=channels or 1, max_size=channels or 1))
    lows = [min(a, b) for a, b in pairs]
    highs = [max(a, b) for a, b in pairs]
    if channels is None:
        min_val, max_val = torch.tensor(lows[0]), torch.tensor(highs[0])
    else:
        min_val, max_val = torch.tensor(lows), torch.tensor(highs)
    return qscheme, dtype, reduce_range, qmin, qmax, eps, min_val, max_val


@given(qparams_cases())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
def test_calculate_qparams_bit_identical_to_torch(case):
    qscheme, dtype, reduce_range, qmin, qmax, eps, min_val, max_val = case
    ref = _torch_observer_for(qscheme, dtype, reduce_range, qmin, qmax, eps)
    expected = ref._calculate_qparams(min_val, max_val)
    got_min, got_max = qmath.quant_range(dtype, qmin, qmax, reduce_range)
    assert (got_min, got_max) == (ref.quant_min, ref.quant_max)
    got = qmath.calculate_qparams(
        min_val, max_val, dtype=dtype, qscheme=qscheme, quant_min=got_min, quant_max=got_max,
        eps=eps, custom_range=qmin is not None,
    )
    for g, e in zip(got, expected):
        assert_bit_identical(g, e)


# -- histogram math ----------------------------------------------------------------------


def _torch_histogram_observer(hist, lo, hi, dtype=torch.quint8):
    obs = tq_obs.HistogramObserver(bins=hist.numel(), dtype=dtype)
    obs.histogram.copy_(hist)
    obs.min_val.copy_(torch.tensor(lo))
    obs.max_val.copy_(torch.tensor(hi))
    return obs


_counts = st.one_of(
    st.lists(st.integers(0, 50), min_size=4, max_size=96),
    # fractional, large masses (as after re-binning): exercises the float32 quantile thresholds
    st.lists(st.floats(0, 1e7, width=32, allow_subnormal=False), min_size=4, max_size=96),
)
histograms = _counts.map(lambda v: torch.tensor(v, dtype=torch.float32))
ranges = st.tuples(st.floats(-100, 0, width=32), st.floats(0.0009765625, 100, width=32))


@given(histograms, ranges, st.data())
@settings(max_examples=150, deadline=None)
def test_histogram_quantization_error_matches_torch(hist, bounds, data):
    lo, hi = bounds
    start = data.draw(st.integers(0, hist.numel() - 1))
    end = data.draw(st.integers(start, hist.numel() - 1))
    ref = _torch_histogram_observer(hist, lo, hi)
    got = qmath.histogram_quantization_error(hist, ref.min_val, ref.max_val, start, end, 256)
    assert got == ref._compute_quantization_error(start, end)


@given(histograms, ranges, st.sampled_from([torch.quint8, torch.qint8, torch.qint32]))
@settings(max_examples=40, deadline=None)  # torch's search loop (the oracle) is slow
def test_histogram_search_range_matches_torch(hist, bounds, dtype):
    assume(hist.sum() > 0)
    ref = _torch_histogram_observer(hist, *bounds, dtype=dtype)
    expected = ref._non_linear_param_search()
    got = qmath.histogram_search_range(hist, ref.min_val, ref.max_val, qmath.dst_nbins(dtype))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_histogram_search_range_trims_sparse_tail():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100000, generator=gen), torch.rand(5, generator=gen) * 40 + 10])
    lo, hi = torch.aminmax(x)
    hist = torch.histc(x, 2048, min=lo.item(), max=hi.item())
    new_min, new_max = qmath.histogram_search_range(hist, lo, hi, 256)
    bin_width = (hi - lo) / 2048
    assert lo <= new_min < new_max < hi  # the sparse tail above ~10 is (partly) clipped
    for edge in (new_min, new_max):  # results lie on bin edges
        k = ((edge - lo) / bin_width).item()
        assert k == pytest.approx(round(k), abs=1e-3)


@given(histograms, ranges, st.floats(0, 50, width=32), st.floats(0, 50, width=32))
@settings(max_examples=100, deadline=None)
def test_combine_histograms_matches_torch(hist, bounds, grow_low, grow_high):
    lo, hi = bounds
    ref = _torch_histogram_observer(hist, lo, hi)
    new_min, new_max = torch.tensor(lo - grow_low), torch.tensor(hi + grow_high)
    update = torch.histc(torch.randn(50) * 30, hist.numel(), min=new_min, max=new_max)
    expected = ref._combine_histograms(hist, ref.min_val, ref.max_val, update, new_min, new_max)
    got = qmath.combine_histograms(hist, ref.min_val, ref.max_val, update, new_min, new_max, 16)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_combine_histograms_preserves_mass_and_rejects_shrinking():
    hist = torch.tensor([1.0, 2.0, 3.0, 4.0])
    update = torch.zeros(4)
    out = qmath.combine_histograms(hist, torch.tensor(0.0), torch.tensor(4.0), update, torch.tensor(-4.0), torch.tensor(4.0))
    assert out.sum().item() == pytest.approx(10.0)
    assert out[:2].sum().item() == pytest.approx(0.0)  # the old mass all lies in [0, 4]
    with pytest.raises(ValueError, match="must contain the old range"):
        qmath.combine_histograms(hist, torch.tensor(0.0), torch.tensor(4.0), update, torch.tensor(1.0), torch.tensor(4.0))


def test_dst_nbins():
    assert qmath.dst_nbins(torch.quint8) == 256
    assert qmath.dst_nbins(torch.qint32) == 2**32


def test_histogram_search_compares_quantiles_in_float32():
    # torch compares cumsum[i] < alpha * total with the threshold cast to float32; here the
    # double threshold is just above cumsum[0] but rounds onto it, so the lower bound stays.
    hist = torch.tensor([968.9219970703125, 0, 0, 0, 0, 0, 0, 96891232.0])
    lo, hi = torch.tensor(-1.0), torch.tensor(3.0)
    ref = _torch_histogram_observer(hist, -1.0, 3.0)
    expected = ref._non_linear_param_search()
    got = qmath.histogram_search_range(hist, lo, hi, 256)
    assert got[0].item() == -1.0
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
