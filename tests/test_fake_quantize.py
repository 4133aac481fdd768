"""Fake quantization: forward values, STE gradients, buffers and qparams identical to torch.ao's
FakeQuantize / FusedMovingAvgObsFakeQuantize / FixedQParamsFakeQuantize on the same inputs
(per-tensor and per-channel); switches; default QAT qconfigs and mappings as torch.ao's."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fxquant
from fxquant import fake_quantize as fq
from fxquant.observers import (FixedQParamsObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                               MovingAveragePerChannelMinMaxObserver)
from fxquant.qconfig import qconfig_equals

BACKENDS = ["fbgemm", "x86", "qnnpack", "onednn"]


def _ao():
    return pytest.importorskip("torch.ao.quantization")


def _ao_fq():
    return pytest.importorskip("torch.ao.quantization.fake_quantize")


# (our factory, torch.ao factory name, input shape) -- per-tensor and per-channel, fused and not
PAIRS = [
    ("default_fake_quant", (4, 8, 5)),
    ("default_weight_fake_quant", (6, 3, 3, 3)),
    ("default_per_channel_weight_fake_quant", (6, 3, 3, 3)),
    ("default_histogram_fake_quant", (4, 8, 5)),
    ("default_fused_act_fake_quant", (4, 8, 5)),
    ("default_fused_wt_fake_quant", (6, 3, 3, 3)),
    ("default_fused_per_channel_wt_fake_quant", (6, 3, 3, 3)),
    ("fused_wt_fake_quant_range_neg_127_to_127", (6, 3, 3)),
    ("fused_per_channel_wt_fake_quant_range_neg_127_to_127", (6, 3, 3)),
    ("default_fixed_qparams_range_0to1_fake_quant", (4, 8)),
    ("default_fixed_qparams_range_neg1to1_fake_quant", (4, 8)),
    ("default_embedding_fake_quant", (10, 6)),
]


def _batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # batches of different ranges so the moving averages move; one all-positive batch
    out = []
    for i in range(n):
        x = torch.randn(shape, generator=g) * (0.5 + i) + (0.3 * i - 0.4)
        out.append(x.abs() if i == 2 else x)
    return out


def _step(mod, x, grad):
    x = x.clone().requires_grad_(True)
    y = mod(x)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.parametrize("name,shape", PAIRS, ids=[p[0] for p in PAIRS])
def test_matches_torch_ao_values_and_gradients(name, shape):
    ours, theirs = getattr(fq, name)(), getattr(_ao_fq(), name)()
    g = torch.Generator().manual_seed(1)
    for i, x in enumerate(_batches(shape)):
        if i == 3:  # frozen qparams for the last step, as at the end of QAT
            ours.disable_observer()
            theirs.disable_observer()
        grad = torch.randn(shape, generator=g)
        y1, g1 = _step(ours, x, grad)
        y2, g2 = _step(theirs, x, grad)
        assert torch.equal(y1, y2), f"step {i}: max diff {(y1 - y2).abs().max()}"
        assert torch.equal(g1, g2), f"step {i}: gradients differ"
        assert not torch.equal(y1, x), "fake quant did nothing"
        assert torch.equal(ours.scale, theirs.scale) and torch.equal(ours.zero_point, theirs.zero_point)
        for buf in ("min_val", "max_val"):
            if hasattr(theirs.activation_post_process, buf):
                a, b = getattr(ours.activation_post_process, buf), getattr(theirs.activation_post_process, buf)
                assert torch.equal(a, b), buf
    s1, z1 = ours.activation_post_process.calculate_qparams()
    s2, z2 = theirs.activation_post_process.calculate_qparams()
    assert torch.equal(s1, s2) and torch.equal(z1.to(z2.dtype), z2)
    s1, z1 = ours.calculate_qparams()
    if isinstance(ours, fq.FusedMovingAvgObsFakeQuantize):
        # fxquant reports what the kernel applied (torch.ao recomputes with the observer)
        assert torch.equal(s1, theirs.scale) and torch.equal(z1, theirs.zero_point)
    else:
        s2, z2 = theirs.calculate_qparams()
        assert torch.equal(s1, s2) and torch.equal(z1.to(z2.dtype), z2)
    for attr in ("dtype", "qscheme", "quant_min", "quant_max", "ch_axis", "is_dynamic"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr


def test_gradient_is_straight_through_inside_range_and_zero_outside():
    mod = fq.FakeQuantize(observer=MinMaxObserver, quant_min=0, quant_max=255)
    mod(torch.tensor([0.0, 1.0]))  # scale 1/255, zero point 0
    mod.disable_observer()
    x = torch.tensor([-0.5, 0.25, 0.5, 1.5], requires_grad=True)
    mod(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_switches_match_torch_ao():
    ao_fq = _ao_fq()
    ours, theirs = fq.default_fake_quant(), ao_fq.default_fake_quant()
    x = torch.randn(16) * 3
    for mod in (ours, theirs):
        mod.disable_fake_quant()
    assert torch.equal(ours(x), x) and torch.equal(theirs(x), x)
    assert torch.equal(ours.scale, theirs.scale)  # observed although not fake-quantized
    for mod in (ours, theirs):
        mod.enable_fake_quant()
        mod.disable_observer()
    y = x * 2  # wider: frozen qparams clamp it
    assert torch.equal(ours(y), theirs(y))
    assert torch.equal(ours.activation_post_process.max_val, theirs.activation_post_process.max_val)


def test_model_level_switches_reach_every_fake_quant():
    model = nn.Sequential(fq.default_fake_quant(), nn.Sequential(fq.default_fused_act_fake_quant()),
                          nn.ReLU())
    assert len(list(fq.fake_quant_modules(model))) == 2
    assert fq.disable_observer(model) is model
    assert all(int(m.observer_enabled[0]) == 0 for _, m in fq.fake_quant_modules(model))
    fq.disable_fake_quant(model)
    x = torch.randn(3, 4)
    assert torch.equal(model(x), torch.relu(x))
    fq.enable_fake_quant(model)
    fq.enable_observer(model)
    assert all(int(m.observer_enabled[0]) == 1 and int(m.fake_quant_enabled[0]) == 1
               for _, m in fq.fake_quant_modules(model))
    model.apply(fq.disable_observer)  # torch.ao's spelling works too
    assert all(int(m.observer_enabled[0]) == 0 for _, m in fq.fake_quant_modules(model))


def test_state_dict_interoperates_with_torch_ao_per_channel():
    ao_fq = _ao_fq()
    theirs = ao_fq.default_per_channel_weight_fake_quant()
    theirs(torch.randn(5, 4))
    ours = fq.default_per_channel_weight_fake_quant()
    ours.load_state_dict(theirs.state_dict())
    assert ours.scale.shape == (5,)
    x = torch.randn(5, 4)
    ours.disable_observer()
    theirs.disable_observer()
    assert torch.equal(ours(x), theirs(x))


def test_observer_like_attributes_for_the_passes():
    mod = fq.default_fake_quant()
    assert (mod.dtype, mod.qscheme, mod.is_dynamic, mod.reduce_range) == (
        torch.quint8, torch.per_tensor_affine, False, True)
    assert (mod.quant_min, mod.quant_max) == (0, 127)  # reduce_range halves 0..255
    assert mod.min_val == float("inf")  # convert's "was it calibrated?" check reads it
    mod(torch.tensor([-1.0, 2.0]))
    assert float(mod.min_val) == -1.0 and float(mod.max_val) == 2.0
    assert fq.FixedQParamsFakeQuantize(fq.default_fixed_qparams_range_0to1_observer).min_val is None


def test_fused_kernel_qparams_quirk_is_pinned():
    """torch's fused kernel picks qparams in C++: for a symmetric per-channel weight, a channel
    with values of one sign gets affine qparams (zero point at the range end), unlike the
    observer's calculate_qparams (which convert reads). Documented on the class."""
    mod = fq.default_fused_per_channel_wt_fake_quant()
    w = torch.randn(3, 8)
    w[1] = w[1].abs() + 0.1
    mod(w)
    scale, zp = mod.activation_post_process.calculate_qparams()
    assert int(zp[1]) == 0 and int(mod.zero_point[1]) == -128, "torch changed the fused kernel"
    # and the symmetric per-channel scale formula: max(-min/128, max/127), not max(-min, max)/127.5
    lo, hi = mod.activation_post_process.min_val, mod.activation_post_process.max_val
    straddles = (lo < 0) & (hi > 0)
    kernel = torch.maximum(-lo / 128, hi / 127)
    torch.testing.assert_close(mod.scale[straddles], kernel[straddles])
    assert not torch.allclose(scale[straddles], kernel[straddles], rtol=1e-4, atol=0)
    applied = mod.calculate_qparams()  # what convert reads: what the forward applied
    assert torch.equal(applied[0], mod.scale) and torch.equal(applied[1], mod.zero_point)


def test_errors_name_the_fix():
    with pytest.raises(TypeError, match="MovingAverage"):
        fq.FusedMovingAvgObsFakeQuantize(observer=MinMaxObserver)
    with pytest.raises(TypeError, match="FixedQParamsObserver"):
        fq.FixedQParamsFakeQuantize(MovingAverageMinMaxObserver.with_args())
    with pytest.raises(ValueError, match="must not exceed"):
        fq.FakeQuantize(quant_min=10, quant_max=5)
    with pytest.raises(ValueError, match="both"):
        fq.FakeQuantize(quant_min=0)
    with pytest.raises(ValueError):
        fq.FakeQuantize(quant_min=-8, quant_max=7, dtype=torch.quint8)  # outside quint8


def test_four_bit_weight_fake_quant():
    mod = fq.FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-8,
                                    quant_max=7, dtype=torch.qint8,
                                    qscheme=torch.per_channel_symmetric)()
    w = torch.randn(4, 16)
    out = mod(w)
    levels = (out / mod.scale.reshape(-1, 1)).round()
    assert levels.min() >= -8 and levels.max() <= 7
    assert len(torch.unique(levels)) <= 16


def test_factories_pickle_and_modules_deepcopy():
    for factory in (fq.default_fused_per_channel_wt_fake_quant, fq.default_fixed_qparams_range_0to1_fake_quant):
        assert pickle.loads(pickle.dumps(factory)) == factory
    mod = fq.default_fused_act_fake_quant()
    mod(torch.randn(8))
    clone = copy.deepcopy(mod)
    assert torch.equal(clone.scale, mod.scale)
    clone2 = pickle.loads(pickle.dumps(mod))
    x = torch.randn(8)
    clone2.disable_observer()
    mod.disable_observer()
    assert torch.equal(clone2(x), mod(x))


def test_qat_observer_wrapper_turns_fixed_observers_into_fake_quant():
    fixed = FixedQParamsObserver.with_args(scale=1 / 256, zero_point=0)
    wrapped = fq.qat_observer_wrapper(fixed)
    assert isinstance(wrapped(), fq.FixedQParamsFakeQuantize)
    assert fq.qat_observer_wrapper(fq.default_fake_quant) is fq.default_fake_quant


# ---------------------------------------------------------------- default qconfigs vs torch.ao

def _describe(mod: nn.Module) -> tuple:
    app = getattr(mod, "activation_post_process", mod)
    return (type(mod).__name__, type(app).__name__, mod.dtype, mod.qscheme,
            getattr(mod, "quant_min", None), getattr(mod, "quant_max", None),
            getattr(app, "reduce_range", None), getattr(app, "averaging_constant", None),
            float(app.eps) if hasattr(app, "eps") and app.eps is not None else None,
            getattr(mod, "ch_axis", None))


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_default_qat_qconfig_matches_torch_ao(backend, version):
    """Pinned to torch.ao's activation range (fixed by backend there; fxquant's default follows
    the CPU: tests/test_hw_range.py) the qconfig is torch.ao's."""
    theirs = _ao().get_default_qat_qconfig(backend, version)
    pinned = bool(theirs.activation().activation_post_process.reduce_range)
    ours = fxquant.get_default_qat_qconfig(backend, version, reduce_range=pinned)
    assert _describe(ours.activation()) == _describe(theirs.activation())
    assert _describe(ours.weight()) == _describe(theirs.weight())


def test_qnnpack_qat_qconfig_as_the_issue_states():
    qc = fxquant.get_default_qat_qconfig("qnnpack")
    act, w = qc.activation(), qc.weight()
    assert (act.dtype, act.quant_min, act.quant_max, act.reduce_range) == (torch.quint8, 0, 255, False)
    assert (w.dtype, w.quant_min, w.quant_max, w.qscheme) == (torch.qint8, -128, 127,
                                                              torch.per_tensor_symmetric)
    assert isinstance(w.activation_post_process, MovingAverageMinMaxObserver)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_qat_qconfig_mapping_matches_torch_ao(backend):
    theirs = _ao().get_default_qat_qconfig_mapping(backend)
    pinned = bool(theirs.global_qconfig.activation().activation_post_process.reduce_range)
    ours = fxquant.get_default_qat_qconfig_mapping(backend, reduce_range=pinned)
    default = fxquant.get_default_qat_qconfig_mapping(backend)
    assert default.global_qconfig.activation().reduce_range is default.activation_range.reduce_range
    assert ours.backend == backend
    assert _describe(ours.global_qconfig.activation()) == _describe(theirs.global_qconfig.activation())
    assert len(ours.object_type_qconfigs) == len(theirs.object_type_qconfigs)
    for key, theirs_qc in theirs.object_type_qconfigs.items():
        ours_qc = ours.object_type_qconfigs[key]
        for role in ("activation", "weight"):
            a, b = getattr(ours_qc, role)(), getattr(theirs_qc, role)()
            assert type(a).__name__ == type(b).__name__, (key, role)
            if hasattr(b, "qscheme"):
                assert (a.dtype, a.qscheme) == (b.dtype, b.qscheme), (key, role)
    sig = ours.object_type_qconfigs[torch.sigmoid]
    assert isinstance(sig.activation(), fq.FixedQParamsFakeQuantize)
    assert qconfig_equals(ours.object_type_qconfigs[nn.Sigmoid], sig)
