"""Fused float modules and BatchNorm folding (bit-identical to torch.nn.utils.fusion)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import fusion as torch_fusion

from fxquant.nn import fused
from fxquant.nn.fold import (
    fold_conv_bn_eval, fold_conv_bn_weights, fold_linear_bn_eval, fold_linear_bn_weights,
)


def trained_bn(kind: type[nn.modules.batchnorm._BatchNorm], n: int,
               affine: bool = True) -> nn.modules.batchnorm._BatchNorm:
    bn = kind(n, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        if affine:
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


# ---------------------------------------------------------------------------------------------
# fused containers

FUSED = [
    (fused.ConvReLU1d, lambda: (nn.Conv1d(3, 4, 3), nn.ReLU()), (2, 3, 7)),
    (fused.ConvReLU2d, lambda: (nn.Conv2d(3, 4, 3), nn.ReLU()), (2, 3, 6, 6)),
    (fused.ConvReLU3d, lambda: (nn.Conv3d(3, 4, 3), nn.ReLU()), (1, 3, 4, 4, 4)),
    (fused.LinearReLU, lambda: (nn.Linear(5, 4), nn.ReLU()), (3, 5)),
    (fused.BNReLU2d, lambda: (trained_bn(nn.BatchNorm2d, 3), nn.ReLU()), (2, 3, 4, 4)),
    (fused.BNReLU3d, lambda: (trained_bn(nn.BatchNorm3d, 3), nn.ReLU()), (2, 3, 2, 4, 4)),
    (fused.ConvBn1d, lambda: (nn.Conv1d(3, 4, 3), trained_bn(nn.BatchNorm1d, 4)), (2, 3, 7)),
    (fused.ConvBn2d, lambda: (nn.Conv2d(3, 4, 3), trained_bn(nn.BatchNorm2d, 4)), (2, 3, 6, 6)),
    (fused.ConvBn3d, lambda: (nn.Conv3d(3, 4, 3), trained_bn(nn.BatchNorm3d, 4)),
     (1, 3, 4, 4, 4)),
    (fused.ConvBnReLU1d,
     lambda: (nn.Conv1d(3, 4, 3), trained_bn(nn.BatchNorm1d, 4), nn.ReLU()), (2, 3, 7)),
    (fused.ConvBnReLU2d,
     lambda: (nn.Conv2d(3, 4, 3), trained_bn(nn.BatchNorm2d, 4), nn.ReLU()), (2, 3, 6, 6)),
    (fused.ConvBnReLU3d,
     lambda: (nn.Conv3d(3, 4, 3), trained_bn(nn.BatchNorm3d, 4), nn.ReLU()), (1, 3, 4, 4, 4)),
    (fused.LinearBn1d, lambda: (nn.Linear(5, 4), trained_bn(nn.BatchNorm1d, 4)), (3, 5)),
]
FUSED_IDS = [c[0].__name__ for c in FUSED]


@pytest.mark.parametrize("cls,parts,shape", FUSED, ids=FUSED_IDS)
def test_fused_module_computes_its_parts_in_order(cls, parts, shape) -> None:
    mods = parts()
    module = cls(*mods).eval()
    x = torch.randn(shape)
    want = x
    for m in mods:
        want = m(want)
    assert isinstance(module, nn.Sequential) and isinstance(module, fused.FusedModule)
    assert list(module) == list(mods)
    assert torch.equal(module(x), want)
    assert set(module.state_dict()) == {
        f"{i}.{k}" for i, m in enumerate(mods) for k in m.state_dict()}


@pytest.mark.parametrize("cls,parts,shape", FUSED, ids=FUSED_IDS)
def test_state_dict_keys_match_torch_ao_intrinsic(cls, parts, shape) -> None:
    nni = pytest.importorskip("torch.ao.nn.intrinsic")
    mods = parts()
    assert set(cls(*mods).state_dict()) == set(getattr(nni, cls.__name__)(*mods).state_dict())


@pytest.mark.parametrize("cls,parts,shape", FUSED, ids=FUSED_IDS)
def test_fused_module_checks_member_types(cls, parts, shape) -> None:
    mods = parts()
    with pytest.raises(TypeError, match=f"{cls.__name__}.*argument 0 must be"):
        cls(nn.Identity(), *mods[1:])
    with pytest.raises(TypeError, match=f"{cls.__name__}.*takes .*got {len(mods) - 1} modules"):
        cls(*mods[:-1])


def test_wrong_dimensionality_is_named() -> None:
    with pytest.raises(TypeError, match="argument 0 must be Conv2d, got Conv1d"):
        fused.ConvReLU2d(nn.Conv1d(3, 4, 3), nn.ReLU())
    with pytest.raises(TypeError, match="argument 1 must be BatchNorm2d, got BatchNorm1d"):
        fused.ConvBn2d(nn.Conv2d(3, 4, 3), nn.BatchNorm1d(4))


@pytest.mark.parametrize("cls,parts,shape", [c for c in FUSED if hasattr(c[0], "fold_eval")],
                         ids=[c[0].__name__ for c in FUSED if hasattr(c[0], "fold_eval")])
def test_fold_eval_keeps_the_function(cls, parts, shape) -> None:
    module = cls(*parts()).eval()
    folded = module.fold_eval()
    x = torch.randn(shape)
    assert torch.allclose(folded(x), module(x), atol=1e-5, rtol=1e-5)
    has_relu = isinstance(module[-1], nn.ReLU)
    if has_relu:
        assert isinstance(folded, fused.FusedModule) and isinstance(folded[1], nn.ReLU)
    else:
        assert type(folded) is type(module[0])


# ---------------------------------------------------------------------------------------------
# folding vs torch.nn.utils.fusion

CONVS = [
    (lambda b: nn.Conv1d(3, 4, 3, bias=b), nn.BatchNorm1d, 4, (2, 3, 8)),
    (lambda b: nn.Conv2d(4, 6, 3, groups=2, bias=b), nn.BatchNorm2d, 6, (2, 4, 6, 6)),
    (lambda b: nn.Conv3d(3, 4, 2, bias=b), nn.BatchNorm3d, 4, (1, 3, 4, 4, 4)),
    (lambda b: nn.ConvTranspose1d(3, 4, 3, stride=2, bias=b), nn.BatchNorm1d, 4, (2, 3, 5)),
    (lambda b: nn.ConvTranspose2d(3, 4, 3, bias=b), nn.BatchNorm2d, 4, (2, 3, 4, 4)),
    (lambda b: nn.ConvTranspose3d(3, 4, 2, bias=b), nn.BatchNorm3d, 4, (1, 3, 3, 3, 3)),
]
CONV_IDS = ["Conv1d", "Conv2d_groups", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
            "ConvTranspose3d"]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("make_conv,bn_kind,n,shape", CONVS, ids=CONV_IDS)
def test_fold_conv_bn_eval_is_bit_identical_to_torch(make_conv, bn_kind, n, shape, bias,
                                                     affine) -> None:
    conv = make_conv(bias).eval()
    bn = trained_bn(bn_kind, n, affine)
    before = copy.deepcopy(conv.state_dict())
    ours = fold_conv_bn_eval(conv, bn)
    theirs = torch_fusion.fuse_conv_bn_eval(conv, bn, transpose=conv.transposed)
    assert ours is not conv and type(ours) is type(conv)
    assert torch.equal(ours.weight, theirs.weight)  # bit-identical, not just close
    assert torch.equal(ours.bias, theirs.bias)
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in before.items())  # untouched
    x = torch.randn(shape)
    assert torch.allclose(ours(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_grouped_transposed_conv_folds_per_output_channel() -> None:
    # torch's fuse_conv_bn_eval cannot fold this (weight is (C_in, C_out/groups, k)); we can
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).eval()
    bn = trained_bn(nn.BatchNorm2d, 6)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(fold_conv_bn_eval(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fold_linear_bn_eval_is_bit_identical_to_torch(bias: bool) -> None:
    linear = nn.Linear(5, 4, bias=bias).eval()
    bn = trained_bn(nn.BatchNorm1d, 4)
    ours = fold_linear_bn_eval(linear, bn)
    theirs = torch_fusion.fuse_linear_bn_eval(linear, bn)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    x = torch.randn(3, 5)
    assert torch.allclose(ours(x), bn(linear(x)), atol=1e-5, rtol=1e-5)


def test_fold_linear_into_single_feature_bn_broadcasts() -> None:
    linear = nn.Linear(5, 4).eval()
    bn = trained_bn(nn.BatchNorm1d, 1)
    folded = fold_linear_bn_eval(linear, bn)
    assert folded.bias.shape == (4,)
    x = torch.randn(3, 1, 5)  # BN1d(1) normalizes the single channel of (N, 1, L)
    assert torch.allclose(folded(x), bn(linear(x)), atol=1e-5, rtol=1e-5)


def test_fold_errors_say_what_to_fix() -> None:
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match=r"eval mode: call \.eval\(\)"):
        fold_conv_bn_eval(conv, bn)
    conv.eval()
    with pytest.raises(ValueError, match="BatchNorm with 5 features into a conv with 4"):
        fold_conv_bn_eval(conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_conv_bn_eval(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(TypeError, match="expects a conv module, got Linear"):
        fold_conv_bn_eval(nn.Linear(3, 4).eval(), bn.eval())
    with pytest.raises(ValueError, match="3 features into a linear with 4 out_features"):
        fold_linear_bn_eval(nn.Linear(3, 4).eval(), nn.BatchNorm1d(3).eval())


@settings(max_examples=30, deadline=None)
@given(out_ch=st.integers(1, 6), in_ch=st.integers(1, 4), k=st.integers(1, 3),
       dims=st.integers(1, 3), transpose=st.booleans(), with_bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 2**16))
def test_fold_conv_bn_weights_bit_identical_property(out_ch, in_ch, k, dims, transpose,
                                                     with_bias, eps, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (in_ch, out_ch) if transpose else (out_ch, in_ch)
    w = torch.randn(shape + (k,) * dims, generator=g)
    b = torch.randn(out_ch, generator=g) if with_bias else None
    rm, rv = torch.randn(out_ch, generator=g), torch.rand(out_ch, generator=g) + 0.1
    gamma, beta = torch.randn(out_ch, generator=g), torch.randn(out_ch, generator=g)
    ours = fold_conv_bn_weights(w, b, rm, rv, eps, gamma, beta, transpose=transpose)
    theirs = torch_fusion.fuse_conv_bn_weights(w, b, rm, rv, eps, gamma, beta, transpose)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    lw = torch.randn(out_ch, in_ch, generator=g)
    lin = fold_linear_bn_weights(lw, b, rm, rv, eps, gamma, beta)
    lin_theirs = torch_fusion.fuse_linear_bn_weights(lw, b, rm, rv, eps, gamma, beta)
    assert torch.equal(lin[0], lin_theirs[0]) and torch.equal(lin[1], lin_theirs[1])
