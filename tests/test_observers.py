"""fxquant.observers: differential tests against torch.ao's observers, plus unit tests."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from fxquant import observers as O
from fxquant import qmath

tq = pytest.importorskip("torch.ao.quantization.observer")


INT_DTYPES = [
    torch.quint8, torch.qint8, torch.qint32, torch.quint4x2,
    torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32,
]
FULL = {d: qmath.quant_range(d) for d in INT_DTYPES}
PER_TENSOR = ["MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver"]
PER_CHANNEL = ["PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"]
# value patterns: scale, offset kind
VALUE_KINDS = ["normal", "zeros", "constant", "tiny", "huge", "negative", "positive", "grow", "shrink", "mixed"]


def assert_bit_identical(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got, expected)
    if got.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        got, expected = got.contiguous().view(bits), expected.contiguous().view(bits)
    assert torch.equal(got, expected), (got, expected)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- input sequences ---------------------------------------------------------------------


def _batch(kind: str, shape: tuple[int, ...], step: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, 0.37 * (step + 1) - 1.0)
    if kind == "tiny":
        return x * 1e-30
    if kind == "huge":
        return x * 1e30
    if kind == "negative":
        return -(x.abs() + 0.5) * (step + 1)
    if kind == "positive":
        return x.abs() + 3.0
    if kind == "grow":  # the range widens every batch: histograms get re-binned
        return x * 4.0**step + step
    if kind == "shrink":
        return x * 4.0 ** (-step)
    if kind == "mixed":
        return x * float(torch.rand(1, generator=gen)) * 10 ** int(torch.randint(-5, 6, (1,), generator=gen))
    return x


@st.composite
def sequences(draw, per_channel: bool, max_numel: int):
    ndim = draw(st.integers(2 if per_channel else 1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    while torch.Size(shape).numel() > max_numel:
        shape = shape[:-1] if len(shape) > (2 if per_channel else 1) else tuple(max(1, s // 2) for s in shape)
    kind = draw(st.sampled_from(VALUE_KINDS))
    n = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    batches = [_batch(kind, shape, step, gen) for step in range(n)]
    if not per_channel and draw(st.booleans()):  # per-tensor observers accept varying shapes
        batches = [b.reshape(-1)[: max(1, b.numel() - i)] for i, b in enumerate(batches)]
    return batches


# -- observer configurations -------------------------------------------------------------


@st.composite
def uniform_kwargs(draw, name: str):
    per_channel = name in PER_CHANNEL
    qschemes = qmath.PER_CHANNEL_QSCHEMES if per_channel else qmath.PER_TENSOR_QSCHEMES
    # also draw the other family now and then: torch must reject it, and so must we
    qscheme = draw(st.sampled_from(qschemes) if draw(st.integers(0, 9)) else st.sampled_from(qmath.SUPPORTED_QSCHEMES))
    dtype = draw(st.sampled_from(INT_DTYPES))
    kwargs = {"dtype": dtype, "qscheme": qscheme, "reduce_range": draw(st.booleans())}
    if draw(st.booleans()):
        lo, hi = FULL[dtype]
        qmin = draw(st.integers(lo, 0))
        qmax = draw(st.integers(max(qmin + 1, 0), hi))
        if not kwargs["reduce_range"] or qmin // 2 < qmax // 2:
            kwargs.update(quant_min=qmin, quant_max=qmax)
    kwargs["eps"] = draw(st.sampled_from([torch.finfo(torch.float32).eps, 2**-12, 1e-2]))
    if "MovingAverage" in name:
        kwargs["averaging_constant"] = draw(st.sampled_from([0.01, 0.5, 1.0]))
    if per_channel:
        kwargs["ch_axis"] = draw(st.integers(-2, 1))
    if draw(st.integers(0, 9)) == 0:
        kwargs["is_dynamic"] = True
    return kwargs


def _build(module, name: str, kwargs: dict):
    try:
        return _quiet(getattr(module, name), **kwargs), None
    except (AssertionError, NotImplementedError, ValueError) as err:
        return None, err


def _run_differential(name: str, kwargs: dict, batches: list[torch.Tensor]) -> None:
    ref, ref_err = _build(tq, name, kwargs)
    ours, our_err = _build(O, name, kwargs)
    if currently_in_test_context():
        event(f"{name} {'rejected' if ref is None else 'compared'}")
    if ref is None:
        assert ours is None, f"torch rejects {name}({kwargs}) ({ref_err}) but fxquant accepts it"
        assert isinstance(our_err, ValueError) and str(our_err)
        return
    assert ours is not None, f"fxquant rejects {name}({kwargs}): {our_err}"
    for attr in ("dtype", "qscheme", "quant_min", "quant_max", "reduce_range", "is_dynamic", "has_customized_qrange"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for x in batches:
        assert _quiet(ours, x) is x
        _quiet(ref, x)
    assert set(ours.state_dict()) == set(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert_bit_identical(ours.state_dict()[key], value)
    try:
        expected = _quiet(ref.calculate_qparams)
    except AssertionError:  # an EMA can leave min above max by an ulp: torch refuses, so must we
        with pytest.raises(ValueError, match="min_val .* exceeds max_val"):
            _quiet(ours.calculate_qparams)
        return
    got = _quiet(ours.calculate_qparams)
    for g, e in zip(got, expected):
        assert_bit_identical(g, e)


@st.composite
def minmax_cases(draw):
    name = draw(st.sampled_from(PER_TENSOR[:2] + PER_CHANNEL))
    kwargs = draw(uniform_kwargs(name))
    qscheme_ok = kwargs["qscheme"] in (qmath.PER_CHANNEL_QSCHEMES if name in PER_CHANNEL else qmath.PER_TENSOR_QSCHEMES)
    batches = draw(sequences(per_channel=name in PER_CHANNEL and qscheme_ok, max_numel=240))
    return name, kwargs, batches


@given(minmax_cases())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_minmax_family_bit_identical_to_torch(case):
    _run_differential(*case)


@st.composite
def histogram_cases(draw):
    kwargs = draw(uniform_kwargs("HistogramObserver"))
    kwargs["bins"] = draw(st.sampled_from([16, 64, 256, 2048]))
    batches = draw(sequences(per_channel=False, max_numel=48))
    if draw(st.integers(0, 4)) == 0:  # infinities are dropped with a warning
        batches[0] = batches[0].reshape(-1).clone()
        batches[0][0] = float("inf")
    return "HistogramObserver", kwargs, batches


@given(histogram_cases())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_histogram_observer_bit_identical_to_torch(case):
    _run_differential(*case)


def test_histogram_observer_default_bins_growing_range_matches_torch():
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(64, generator=gen) * s + o for s, o in [(1, 0), (3, 2), (0.5, -8), (20, 0), (1, 0)]]
    _run_differential("HistogramObserver", {"reduce_range": True}, batches)
    _run_differential("HistogramObserver", {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric}, batches)


def _sweep_sequences() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    growing = [torch.zeros(3, 4), torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen) * 5 + 2]
    negative = [-(torch.rand(3, 4, generator=gen) + 1), torch.full((3, 4), -0.25), -torch.rand(3, 4, generator=gen) * 9]
    return [growing, negative]


@pytest.mark.parametrize("name", PER_TENSOR + PER_CHANNEL)
def test_every_dtype_qscheme_reduce_range_combination_matches_torch(name):
    """Exhaustive sweep (the property tests above sample the same space at random).

    torch's histogram search (the oracle) takes ~0.3 s per run, so HistogramObserver gets one
    input sequence and custom ranges on the 8-bit dtypes only."""
    histogram = name == "HistogramObserver"
    sequences_ = _sweep_sequences()[:1] if histogram else _sweep_sequences()
    for dtype in INT_DTYPES:
        lo, hi = FULL[dtype]
        customs = [{}, {"quant_min": max(lo, -100), "quant_max": min(hi, 100)}]
        if histogram and dtype not in (torch.quint8, torch.qint8):
            customs = customs[:1]
        for qscheme in qmath.SUPPORTED_QSCHEMES:
            for reduce_range in (False, True):
                for custom in customs:
                    kwargs = dict(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, **custom)
                    for batches in sequences_:
                        _run_differential(name, kwargs, batches)


def test_fixed_qparams_and_placeholder_match_torch():
    for kwargs in [dict(scale=1 / 256, zero_point=0), dict(scale=2 / 256, zero_point=128, quant_min=0, quant_max=255)]:
        ref, ours = tq.FixedQParamsObserver(**kwargs), O.FixedQParamsObserver(**kwargs)
        x = torch.randn(3)
        assert ours(x) is x
        for g, e in zip(ours.calculate_qparams(), ref.calculate_qparams()):
            assert_bit_identical(g, e)
        assert (ours.dtype, ours.qscheme, ours.quant_min, ours.quant_max) == (
            ref.dtype, ref.qscheme, ref.quant_min, ref.quant_max)
        assert set(ours.state_dict()) == set(ref.state_dict())
    for kwargs in [dict(dtype=torch.float16), dict(dtype=torch.float16, is_dynamic=True),
                   dict(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)]:
        ref, ours = tq.PlaceholderObserver(**kwargs), O.PlaceholderObserver(**kwargs)
        for attr in ("dtype", "is_dynamic", "qscheme", "quant_min", "quant_max", "eps", "custom_op"):
            assert getattr(ours, attr) == getattr(ref, attr), attr
        x = torch.randn(2)
        assert ours(x) is x


# -- defaults ------------------------------------------------------------------------------

DEFAULT_NAMES = [
    "default_observer", "default_weight_observer", "default_per_channel_weight_observer",
    "default_histogram_observer", "default_placeholder_observer", "default_dynamic_quant_observer",
    "default_float_qparams_observer", "default_float_qparams_observer_4bit",
    "default_fixed_qparams_range_0to1_observer", "default_fixed_qparams_range_neg1to1_observer",
    "default_reuse_input_observer", "weight_observer_range_neg_127_to_127",
    "per_channel_weight_observer_range_neg_127_to_127",
]


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_default_factories_match_torch(name):
    ours_cls, ours_kwargs = O.factory_parts(getattr(O, name))
    ref_cls, ref_kwargs = O.factory_parts(getattr(tq, name))
    assert ours_cls.__name__ == ref_cls.__name__
    assert ours_kwargs == ref_kwargs
    obs, ref = getattr(O, name)(), _quiet(getattr(tq, name))
    for attr in ("dtype", "qscheme", "quant_min", "quant_max", "is_dynamic", "ch_axis"):
        if hasattr(ref, attr):
            assert getattr(obs, attr) == getattr(ref, attr), attr


def test_default_observer_values():
    weight = O.default_weight_observer()
    assert (weight.dtype, weight.qscheme, weight.quant_min, weight.quant_max) == (
        torch.qint8, torch.per_tensor_symmetric, -128, 127)
    act = O.default_observer()
    assert (act.dtype, act.quant_min, act.quant_max) == (torch.quint8, 0, 127)
    emb4 = O.default_float_qparams_observer_4bit()
    assert (emb4.dtype, emb4.qscheme, emb4.ch_axis, emb4.quant_max) == (
        torch.quint4x2, torch.per_channel_affine_float_qparams, 0, 15)
    dyn = O.default_dynamic_quant_observer()
    assert (dyn.dtype, dyn.is_dynamic) == (torch.quint8, True)
    assert O.default_fixed_qparams_range_neg1to1_observer().calculate_qparams()[1].item() == 128


# -- factories -----------------------------------------------------------------------------


def test_with_args_factory_builds_fresh_instances_and_chains():
    factory = O.MinMaxObserver.with_args(dtype=torch.qint8).with_args(qscheme=torch.per_tensor_symmetric)
    a, b = factory(), factory()
    assert a is not b and isinstance(a, O.MinMaxObserver)
    assert (a.dtype, a.qscheme) == (torch.qint8, torch.per_tensor_symmetric)
    assert factory(dtype=torch.quint8, qscheme=torch.per_tensor_affine).dtype == torch.quint8  # call-time override
    assert repr(factory) == "MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)"
    assert factory == O.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    assert factory != O.MinMaxObserver.with_args(dtype=torch.qint8)
    assert len({factory, O.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)}) == 1
    assert factory.p.func is O.MinMaxObserver and factory.p.keywords == factory.kwargs  # torch.ao-style access


def test_factory_pickles():
    factory = O.PerChannelMinMaxObserver.with_args(ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    clone = pickle.loads(pickle.dumps(factory))
    assert clone == factory
    assert clone().ch_axis == 1


def test_with_callable_args_evaluates_each_time():
    calls = []

    def make_eps():
        calls.append(1)
        return 2.0**-10

    factory = O.MinMaxObserver.with_callable_args(eps=make_eps)
    assert factory().eps.item() == 2.0**-10 and factory().eps.item() == 2.0**-10
    assert len(calls) == 2
    assert factory.with_args(eps=0.5)().eps.item() == 0.5  # a fixed argument replaces the deferred one
    assert "with_callable_args(eps=" in repr(factory)


# -- behaviour -----------------------------------------------------------------------------


def test_minmax_observer_records_running_range():
    obs = O.MinMaxObserver()
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([0.5, 3.0]))
    obs(torch.tensor([]))  # empty tensors are ignored
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 3.0)
    assert "min_val=-1.0" in repr(obs) and "quant_range=(0, 255)" in repr(obs)
    obs.reset_min_max_vals()
    assert obs.min_val.item() == float("inf") and obs.max_val.item() == float("-inf")


def test_moving_average_observer_averages():
    obs = O.MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs(torch.tensor([-2.0, 2.0]))
    obs(torch.tensor([0.0, 4.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 3.0)


def test_per_channel_observer_state_dict_roundtrip_and_torch_interop():
    obs = O.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    obs(torch.randn(4, 3, 5))
    buffer = io.BytesIO()
    torch.save(obs.state_dict(), buffer)
    buffer.seek(0)
    fresh = O.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.min_val, obs.min_val) and fresh.min_val.shape == (3,)
    ref = tq.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    ref.load_state_dict(obs.state_dict())  # the same buffers as torch.ao's
    for g, e in zip(fresh.calculate_qparams(), ref.calculate_qparams()):
        assert_bit_identical(g, e)
    fresh.reset_min_max_vals()
    assert fresh.min_val.numel() == 0


def test_per_channel_observer_errors():
    obs = O.PerChannelMinMaxObserver()
    with pytest.raises(ValueError, match="at least 2 dims"):
        obs(torch.randn(3))
    obs(torch.randn(3, 2))
    with pytest.raises(ValueError, match="saw 4 channels along axis 0 but has statistics for 3"):
        obs(torch.randn(4, 2))
    with pytest.raises(ValueError, match="ch_axis=5 is out of range"):
        O.PerChannelMinMaxObserver(ch_axis=5)(torch.randn(2, 2))


def test_histogram_observer_state_and_reset():
    obs = O.HistogramObserver(bins=32)
    obs(torch.linspace(-1, 1, 100))
    obs(torch.linspace(-3, 2, 100))  # widens the range: re-binned, mass preserved
    assert obs.histogram.sum().item() == pytest.approx(200.0)
    assert (obs.min_val.item(), obs.max_val.item()) == (-3.0, 2.0)
    assert "bins=32" in repr(obs) and "count=200" in repr(obs)
    with pytest.warns(UserWarning, match="ignoring infinite"):
        obs(torch.tensor([float("inf"), 0.0]))
    obs.reset_min_max_vals()
    with pytest.warns(UserWarning, match="seen no data"):
        scale, zp = obs.calculate_qparams()
    assert scale.tolist() == [1.0] and zp.tolist() == [0]


def test_unobserved_minmax_warns():
    with pytest.warns(UserWarning, match="seen no data"):
        scale, zp = O.MinMaxObserver().calculate_qparams()
    assert scale.tolist() == [1.0] and zp.tolist() == [0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: O.MinMaxObserver(qscheme=torch.per_channel_affine), "MinMaxObserver supports qscheme"),
        (lambda: O.PerChannelMinMaxObserver(qscheme=torch.per_tensor_affine), "PerChannelMinMaxObserver supports"),
        (lambda: O.MinMaxObserver(qscheme=torch.per_tensor_symmetric, reduce_range=True), "symmetric quint8"),
        (lambda: O.HistogramObserver(is_dynamic=True), "does not support dynamic"),
        (lambda: O.MovingAverageMinMaxObserver(is_dynamic=True), "averaging_constant=1"),
        (lambda: O.MinMaxObserver(dtype=torch.float16), "PlaceholderObserver"),
        (lambda: O.MinMaxObserver(quant_min=1, quant_max=10), "must include 0"),
        (lambda: O.FixedQParamsObserver(scale=0.1, zero_point=300), "zero_point 300 is outside"),
        (lambda: O.FixedQParamsObserver(scale=0.0, zero_point=0), "scale must be positive"),
    ],
)
def test_observer_configuration_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "leading"),
    [
        (lambda *a, **k: O.MovingAverageMinMaxObserver(*a, **k), {"averaging_constant": 0.5}),
        (lambda *a, **k: O.PerChannelMinMaxObserver(*a, **k), {"ch_axis": 1}),
        (lambda *a, **k: O.MovingAveragePerChannelMinMaxObserver(*a, **k), {"averaging_constant": 0.5, "ch_axis": 1}),
        (lambda *a, **k: O.HistogramObserver(*a, **k), {"bins": 64}),
        (lambda *a, **k: O.PercentileObserver(*a, **k), {"percentile": 99.0, "bins": 64}),
        (lambda *a, **k: O.EntropyObserver(*a, **k), {"bins": 64}),
    ],
)
def test_subclass_takes_leading_arguments_by_position_and_shared_ones_by_keyword(make, leading):
    # the shared arguments (UniformObserverArgs) are declared once, in the base; a subclass
    # takes its own leading ones by position, forwards the shared ones as keywords
    obs = make(*leading.values(), dtype=torch.qint8, quant_min=-100, quant_max=100, eps=2**-12)
    assert {k: getattr(obs, k) for k in leading} == leading
    assert (obs.dtype, obs.quant_min, obs.quant_max, obs.eps.item()) == (torch.qint8, -100, 100, 2**-12)
    with pytest.raises(TypeError, match="positional"):
        make(*leading.values(), torch.qint8)
    with pytest.raises(TypeError, match="'quant_mni'"):
        make(quant_mni=-100)


def test_minmax_keeps_torch_positional_order():
    x = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 5 + 1
    ours = O.MinMaxObserver(torch.qint8, torch.per_tensor_symmetric, False, -127, 127, None, 2**-12)
    ref = tq.MinMaxObserver(torch.qint8, torch.per_tensor_symmetric, False, -127, 127, None, 2**-12)
    ours(x), ref(x)
    for got, expected in zip(ours.calculate_qparams(), ref.calculate_qparams()):
        assert_bit_identical(got, expected)


def test_placeholder_has_no_qparams():
    obs = O.PlaceholderObserver(dtype=torch.float16)
    with pytest.raises(RuntimeError, match="has no qparams"):
        obs.calculate_qparams()
    assert "dtype=torch.float16" in repr(obs)
    assert obs.reduce_range is False


def test_every_observer_exposes_common_attributes():
    for obs in [O.MinMaxObserver(), O.MovingAverageMinMaxObserver(), O.PerChannelMinMaxObserver(),
                O.MovingAveragePerChannelMinMaxObserver(), O.HistogramObserver(), O.PlaceholderObserver(),
                O.FixedQParamsObserver(0.1, 0), O.NoopObserver(), O.ReuseInputObserver()]:
        for attr in ("dtype", "qscheme", "quant_min", "quant_max", "reduce_range", "is_dynamic"):
            assert hasattr(obs, attr), (type(obs).__name__, attr)
        assert obs.extra_repr()
