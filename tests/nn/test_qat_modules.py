"""QAT modules: weight fake quant in the forward, simulated BatchNorm folding (train / eval /
frozen), to_reference_parts, model-level freeze/update of BN statistics; differential against
torch.ao.nn.qat / torch.ao.nn.intrinsic.qat."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant import fake_quantize as fq
from fxquant.nn import fused, qat
from fxquant.nn.common import WeightQParams
from fxquant.qconfig import QConfig


QCONFIG = QConfig(activation=fq.default_fake_quant, weight=fq.default_per_channel_weight_fake_quant)
QCONFIG_FUSED = QConfig(activation=fq.default_fused_act_fake_quant,
                        weight=fq.default_fused_per_channel_wt_fake_quant)


def _ao_qconfig():
    ao = pytest.importorskip("torch.ao.quantization")
    return ao.QConfig(activation=ao.default_fake_quant, weight=ao.default_per_channel_weight_fake_quant)


def _bn(cls, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = cls(c)
    bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return bn


CONVS = {1: (nn.Conv1d, nn.BatchNorm1d, (2, 3, 9)), 2: (nn.Conv2d, nn.BatchNorm2d, (2, 3, 7, 7)),
         3: (nn.Conv3d, nn.BatchNorm3d, (2, 3, 5, 5, 5))}


def _float_and_qat(kind: str, d: int = 2):
    torch.manual_seed(d)
    conv_cls, bn_cls, shape = CONVS[d]
    conv = conv_cls(3, 4, 3, bias=True)
    if kind == "conv":
        mod = conv
    elif kind == "conv_relu":
        mod = getattr(fused, f"ConvReLU{d}d")(conv, nn.ReLU())
    elif kind == "conv_bn":
        mod = getattr(fused, f"ConvBn{d}d")(conv, _bn(bn_cls, 4))
    elif kind == "conv_bn_relu":
        mod = getattr(fused, f"ConvBnReLU{d}d")(conv, _bn(bn_cls, 4), nn.ReLU())
    elif kind == "linear":
        mod, shape = nn.Linear(6, 5), (4, 6)
    elif kind == "linear_relu":
        mod, shape = fused.LinearReLU(nn.Linear(6, 5), nn.ReLU()), (4, 6)
    else:
        mod, shape = fused.LinearBn1d(nn.Linear(6, 5), _bn(nn.BatchNorm1d, 5)), (8, 6)
    return mod, qat.to_qat(copy.deepcopy(mod), QCONFIG), shape


def _grads(mod, x):
    x = x.clone().requires_grad_(True)
    out = mod(x)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("kind", ["conv", "conv_relu"])
def test_conv_matches_torch_ao_qat(kind, d):
    nnqat = pytest.importorskip("torch.ao.nn.qat")
    nniqat = pytest.importorskip("torch.ao.nn.intrinsic.qat")
    nni = pytest.importorskip("torch.ao.nn.intrinsic")
    float_mod, ours, shape = _float_and_qat(kind, d)
    ref = copy.deepcopy(float_mod)
    if kind == "conv":
        ref.qconfig = _ao_qconfig()
        theirs = getattr(nnqat, f"Conv{d}d").from_float(ref)
    else:
        ao_fused = getattr(nni, f"ConvReLU{d}d")(ref[0], ref[1])
        ao_fused.qconfig = ao_fused[0].qconfig = _ao_qconfig()
        theirs = getattr(nniqat, f"ConvReLU{d}d").from_float(ao_fused)
    x = torch.randn(shape)
    y1, gx1, gp1 = _grads(ours, x)
    y2, gx2, gp2 = _grads(theirs, x)
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert torch.equal(gp1["weight"], gp2["weight"]) and torch.equal(gp1["bias"], gp2["bias"])
    assert not torch.equal(y1, float_mod(x)), "the weight was not fake-quantized"


@pytest.mark.parametrize("kind", ["linear", "linear_relu"])
def test_linear_matches_torch_ao_qat(kind):
    nnqat = pytest.importorskip("torch.ao.nn.qat")
    nniqat = pytest.importorskip("torch.ao.nn.intrinsic.qat")
    nni = pytest.importorskip("torch.ao.nn.intrinsic")
    float_mod, ours, shape = _float_and_qat(kind)
    ref = copy.deepcopy(float_mod)
    if kind == "linear":
        ref.qconfig = _ao_qconfig()
        theirs = nnqat.Linear.from_float(ref)
    else:
        ao_fused = nni.LinearReLU(ref[0], ref[1])
        ao_fused.qconfig = ao_fused[0].qconfig = _ao_qconfig()
        theirs = nniqat.LinearReLU.from_float(ao_fused)
    x = torch.randn(shape)
    y1, gx1, gp1 = _grads(ours, x)
    y2, gx2, gp2 = _grads(theirs, x)
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2) and torch.equal(gp1["weight"], gp2["weight"])


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("kind", ["conv_bn", "conv_bn_relu"])
def test_conv_bn_close_to_torch_ao_in_train_and_eval(kind, d):
    """torch.ao computes the folding factor as gamma / sqrt(var + eps); fxquant as
    gamma * rsqrt(var + eps) (fold.py's arithmetic, so convert folds bit-identically). The
    factors differ by an ulp, so outputs agree to float rounding (and, rarely, one weight
    step where a scaled weight sits on a rounding boundary)."""
    nniqat = pytest.importorskip("torch.ao.nn.intrinsic.qat")
    nni = pytest.importorskip("torch.ao.nn.intrinsic")
    float_mod, ours, shape = _float_and_qat(kind, d)
    ref = copy.deepcopy(float_mod)
    members = [ref[0], ref[1]] + ([ref[2]] if kind == "conv_bn_relu" else [])
    ao_fused = getattr(nni, f"{'ConvBnReLU' if kind == 'conv_bn_relu' else 'ConvBn'}{d}d")(*members)
    ao_fused.qconfig = _ao_qconfig()
    theirs = getattr(nniqat, type(ours).__name__).from_float(ao_fused)
    x = torch.randn(shape)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        y1, gx1, gp1 = _grads(ours, x)
        y2, gx2, gp2 = _grads(theirs, x)
        step = float(ours.weight_fake_quant.scale.max()) * float(x.abs().sum(0).max())
        assert (y1 - y2).abs().max() <= max(1e-4, step), mode
        torch.testing.assert_close(gx1, gx2, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(ours.bn.running_mean, theirs.bn.running_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bn.running_var, theirs.bn.running_var, rtol=1e-4, atol=1e-4)


def test_linear_bn_close_to_torch_ao():
    nniqat = pytest.importorskip("torch.ao.nn.intrinsic.qat")
    nni = pytest.importorskip("torch.ao.nn.intrinsic")
    float_mod, ours, shape = _float_and_qat("linear_bn")
    ref = copy.deepcopy(float_mod)
    ao_fused = nni.LinearBn1d(ref[0], ref[1])
    ao_fused.qconfig = _ao_qconfig()
    theirs = nniqat.LinearBn1d.from_float(ao_fused)
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bn.running_mean, theirs.bn.running_mean)


@pytest.mark.parametrize("kind", ["conv_bn", "conv_bn_relu", "linear_bn"])
def test_simulated_folding_sees_exactly_the_folded_weight(kind):
    """The weight the fake quant observes in forward is bit-identical to the weight convert
    folds, and in eval mode the output is the folded module's with fake-quantized weights."""
    _, mod, shape = _float_and_qat(kind)
    mod.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        y = mod(x)
    obs = mod.weight_fake_quant.activation_post_process
    float_mod, wq = mod.to_reference_parts()
    core = float_mod[0] if isinstance(float_mod, fused.FusedModule) else float_mod
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in float_mod.modules())
    lo, hi = torch.aminmax(core.weight.detach().flatten(1), dim=1)
    assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi)
    assert isinstance(wq, WeightQParams) and wq.scale.numel() == core.weight.shape[0]
    w = wq.fake_quantize(core.weight)
    op = F.linear if kind == "linear_bn" else (lambda a, b, c: core._conv_forward(a, b, c))
    expected = op(x, w, core.bias)
    if kind == "conv_bn_relu":
        expected = F.relu(expected)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_bn_statistics_update_in_training_and_freeze():
    _, mod, shape = _float_and_qat("conv_bn")
    mod.train()
    mean0 = mod.bn.running_mean.clone()
    mod(torch.randn(shape))
    assert not torch.equal(mod.bn.running_mean, mean0), "running stats must keep updating"
    assert int(mod.bn.num_batches_tracked) == 1
    model = nn.Sequential(mod)
    assert qat.freeze_bn_stats(model) is model
    assert mod.freeze_bn and not mod.bn.training
    model.train()
    assert mod.training and not mod.bn.training, "a frozen BN stays frozen under .train()"
    mean1 = mod.bn.running_mean.clone()
    fq.disable_observer(model)  # freeze the weight qparams too
    x = torch.randn(shape)
    y = mod(x)
    assert torch.equal(mod.bn.running_mean, mean1)
    mod.eval()
    assert torch.equal(mod(x), y), "frozen training forward == eval forward"
    qat.update_bn_stats(model.train())
    assert mod.bn.training and not mod.freeze_bn
    mod(x)
    assert not torch.equal(mod.bn.running_mean, mean1)


def test_to_reference_parts_kinds():
    expected = {"conv": nn.Conv2d, "conv_relu": fused.ConvReLU2d, "conv_bn": nn.Conv2d,
                "conv_bn_relu": fused.ConvReLU2d, "linear": nn.Linear,
                "linear_relu": fused.LinearReLU, "linear_bn": nn.Linear}
    for kind, cls in expected.items():
        _, mod, shape = _float_and_qat(kind)
        mod(torch.randn(shape))
        float_mod, wq = mod.to_reference_parts()
        assert type(float_mod) is cls, kind
        core = float_mod[0] if isinstance(float_mod, fused.FusedModule) else float_mod
        assert type(core) in (nn.Conv2d, nn.Linear) and core.bias is not None or kind in ("conv", "linear")
        assert wq.qscheme == torch.per_channel_symmetric and wq.dtype == torch.qint8


def test_from_float_shares_parameters_and_keeps_the_users_bn():
    float_mod, _, _ = _float_and_qat("conv_bn")
    mod = qat.ConvBn2d.from_float(float_mod, QCONFIG)
    assert mod.weight is float_mod[0].weight and mod.bn is float_mod[1]
    nonaffine = fused.ConvBn2d(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    mod = qat.ConvBn2d.from_float(nonaffine, QCONFIG_FUSED)
    x = torch.randn(2, 3, 6, 6)
    mod(x)
    fq.disable_observer(mod)
    mod.eval()
    float_mod, wq = mod.to_reference_parts()
    torch.testing.assert_close(mod(x), float_mod._conv_forward(x, wq.fake_quantize(float_mod.weight),
                                                               float_mod.bias), rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="qconfig"):
        qat.Conv2d(3, 4, 3)
    with pytest.raises(TypeError, match="ConvBn2d"):
        qat.ConvBn2d.from_float(nn.Conv2d(3, 4, 3), QCONFIG)
    no_stats = fused.ConvBn2d(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        qat.ConvBn2d.from_float(no_stats, QCONFIG)
    assert qat.to_qat(nn.ConvTranspose2d(3, 4, 3), QCONFIG) is None


def test_direct_construction_and_pickle():
    mod = qat.ConvBnReLU2d(3, 4, 3, bias=True, qconfig=QCONFIG_FUSED)
    x = torch.randn(2, 3, 6, 6)
    y = mod(x)
    assert y.min() >= 0
    clone = pickle.loads(pickle.dumps(mod))
    assert type(clone) is qat.ConvBnReLU2d
    mod.eval()
    clone.eval()
    assert torch.equal(clone(x), mod(x))
    lin = qat.LinearBn1d(6, 5, qconfig=QCONFIG)
    assert lin(torch.randn(4, 6)).shape == (4, 5)
