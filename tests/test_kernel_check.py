"""Lowering's numeric kernel self-check (fxquant/backends/kernel_check.py), issue 9.

Kernels that run but compute garbage must not reach the user: each (kernel, shape, qparams
class) is checked once against the reference computation on random data, and a kernel more
than one step off stays float (or runs with weights packed for another engine), with the
reason recorded. Regression cases found in the wild:

- ``nn.ConvTranspose2d(k=2, stride=2)`` (the U-Net upsampler): fbgemm's kernel gave -13 dB on
  x86 / fbgemm (qnnpack 36 dB);
- upsampling a quantized (N, C, 1, 1) tensor (``F.interpolate`` nearest / bilinear,
  ``adaptive_avg_pool2d`` to a larger size) scrambled channels (-1 dB vs 43 dB);
- a forward that reads ``self.conv.weight.device`` raised ``AttributeError`` on the
  converted model (the quantized conv exposed ``weight`` as a method);
- sigmoid / tanh / hardsigmoid outputs span the full 0..255 range whatever the next layer's
  observer asks for, and fbgemm's linear / conv after them saturates int16 pair sums on an
  AVX2-only CPU (found by the fuzz, tests/test_fuzz_models.py: 23.8 dB vs 40 dB).

Each model's converted output must be within 1 dB of fxquant's own reference graph.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.backends import kernel_check
from fxquant.backends.base import SHARED, Rule
from fxquant.backends.registry import get_backend, register_backend, unregister_backend
from fxquant.backends.native import lower_same_op
from fxquant.measure import sqnr_db
from fxquant.meta import qinfo
from fxquant.patterns import Op

BACKENDS = [b for b in ("x86", "fbgemm", "onednn", "qnnpack")
            if b in torch.backends.quantized.supported_engines]


class UpsampleOfPooled(nn.Module):
    """conv -> global pool -> 1x1 conv -> upsample a (N, C, 1, 1) tensor (SE / ASPP heads)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.pool(self.conv(x)))
        if self.how == "nearest":
            return F.interpolate(y, size=(4, 4), mode="nearest")
        if self.how == "bilinear":
            return F.interpolate(y, size=(4, 4), mode="bilinear", align_corners=False)
        return F.adaptive_avg_pool2d(y, (3, 3))


class UNetUp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.conv(x)))


class ReadsWeightDevice(nn.Module):
    """timm's EdgeNeXt / XCiT read a conv's weight device and dtype in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.ones(1, 8, 1, 1, device=self.conv.weight.device, dtype=self.fc.weight.dtype)
        y = self.conv(x) + pos
        return self.fc(y.mean((2, 3)))


def _convert_both(model: nn.Module, backend: str, shape=(2, 3, 8, 8)):
    torch.manual_seed(0)
    model.eval()
    torch.backends.quantized.engine = backend
    x = torch.randn(*shape)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (x,),
                                  backend=backend)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(*shape))
    reference = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
    return reference, fxquant.convert_fx(prepared)


def _lowering_notes(gm) -> list[str]:
    return [d.reason for n in gm.graph.nodes for d in qinfo(n).decisions
            if d.pass_name == "lower_to_backend"]


def _agree(model: nn.Module, backend: str, shape=(2, 3, 8, 8)):
    reference, converted = _convert_both(model, backend, shape)
    xs = torch.randn(4, *shape[1:])
    with torch.no_grad():
        f, r, c = model(xs), reference(xs), converted(xs)
    ref_db, conv_db = sqnr_db(f, r), sqnr_db(f, c)
    assert ref_db > 20, (backend, ref_db)  # the reference itself is a sane quantization
    assert conv_db >= ref_db - 1.0, (backend, ref_db, conv_db, _lowering_notes(converted))
    return converted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["nearest", "bilinear", "adaptive_avg_pool"])
def test_upsampling_a_1x1_tensor_agrees_with_the_reference(backend: str, how: str) -> None:
    converted = _agree(UpsampleOfPooled(how), backend)
    # the scrambling kernel stays float, and says why
    refused = [r for r in _lowering_notes(converted) if "wrong here" in r]
    assert any("off the reference" in r for r in refused), _lowering_notes(converted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_transpose_k2_s2_agrees_with_the_reference(backend: str) -> None:
    converted = _agree(UNetUp(), backend, (2, 3, 8, 8))
    up = next(n for n in converted.graph.nodes if n.target == "up")
    if backend == "onednn":  # its default mapping keeps per-channel weights (as torch.ao's),
        # which no transposed conv kernel takes: float, and the decision says so
        assert "per-channel" in " ".join(_lowering_notes(converted) + [
            d.reason for d in qinfo(up).decisions])
        return
    assert qinfo(up).kernel is not None and "conv_transpose2d" in qinfo(up).kernel  # int8


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_reading_weight_device_runs_converted(backend: str) -> None:
    converted = _agree(ReadsWeightDevice(), backend)
    conv = converted.get_submodule("conv")
    assert conv.weight.device == torch.device("cpu") and conv.weight.dtype == torch.float32
    assert conv.weight().is_quantized  # the quantized weight, as torch users call it


class Scrambler(nn.Module):
    """A user's leaf module that moves values only in float, and flips the channels on a
    quantized tensor: a "kernel" that runs on the quantized zeros probe and is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) if x.is_quantized else x


class WithScrambler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = Scrambler()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.mid(self.conv1(x)))


def test_a_user_rule_whose_kernel_is_wrong_stays_float_with_the_reason() -> None:
    rule = Rule("scrambler", Op(Scrambler), SHARED, "Scrambler on the quantized tensor",
                lower_same_op)
    register_backend(get_backend("x86").extended(rule, name="x86+scrambler"))
    try:
        model = WithScrambler().eval()
        torch.backends.quantized.engine = "x86"
        x = torch.randn(2, 3, 8, 8)
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (x,),
                                      backend="x86+scrambler", leaf_modules=[Scrambler])
        with torch.no_grad():
            prepared(x)
            converted = fxquant.convert_fx(prepared)
            out = converted(x)
        mid = next(n for n in converted.graph.nodes if n.target == "mid")
        reasons = " ".join(d.reason for d in qinfo(mid).decisions)
        assert "wrong here" in reasons and "Scrambler on the quantized tensor" in reasons
        assert qinfo(mid).kernel is None
        assert sqnr_db(model(x), out) > 25
    finally:
        unregister_backend("x86+scrambler")


def test_checked_once_per_class_and_off_switch() -> None:
    """Identical layers and a repeated convert reuse the cached verdict; the check can be
    switched off (for benchmarks), and a fresh cache checks again."""
    from fxquant.passes import Cleanup, Convert, LowerToBackend

    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
                            for _ in range(4)]).eval()
    torch.backends.quantized.engine = "x86"
    x = torch.randn(1, 8, 8, 8)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (x,),
                                  backend="x86")
    with torch.no_grad():
        prepared(x)
    kernel_check.clear_cache()
    calls = []
    real = kernel_check.run_check

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    kernel_check.run_check = counting
    try:
        fxquant.convert_fx(prepared)
        first = len(calls)
        fxquant.convert_fx(prepared)
        assert len(calls) == first  # everything cached
        # conv 1 has a different input qparams class (the model input) than convs 2-4
        assert 1 <= first <= 3
        fxquant.convert_fx(prepared, passes=(Convert(), LowerToBackend(check_kernels=False),
                                             Cleanup()))
        assert len(calls) == first
    finally:
        kernel_check.run_check = real


AVX2_ENV = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.skipif("x86" not in torch.backends.quantized.supported_engines,
                    reason="x86 engine only")
def test_full_range_fixed_qparams_into_fbgemm_on_avx2_uses_another_packing() -> None:
    """sigmoid -> linear on fbgemm limited to AVX2 (a fresh process: fbgemm reads the variable
    at start; on an AVX2-only CPU it changes nothing): the check sees the sigmoid's full
    0..255 range, refuses the saturating kernel and keeps qnnpack-packed weights."""
    code = r"""
import torch, torch.nn as nn, warnings; warnings.filterwarnings("ignore")
import fxquant
from fxquant.measure import sqnr_db
from fxquant.meta import qinfo
import copy
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 3)).eval()
torch.backends.quantized.engine = "x86"
p = fxquant.prepare_fx(m, fxquant.get_default_qconfig_mapping("x86"), (torch.randn(2, 6),),
                       backend="x86")
for _ in range(4):
    p(torch.randn(64, 6))
r = fxquant.convert_to_reference_fx(copy.deepcopy(p)); c = fxquant.convert_fx(p)
x = torch.randn(256, 6)
with torch.no_grad():
    f = m(x)
    print(f"{sqnr_db(f, r(x)):.2f} {sqnr_db(f, c(x)):.2f}")
print(" | ".join(d.reason for n in c.graph.nodes for d in qinfo(n).decisions
                 if d.pass_name == "lower_to_backend"))
"""
    res = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                         env={**os.environ, **AVX2_ENV}, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    figures, reasons = res.stdout.strip().splitlines()[-2:]
    ref_db, conv_db = map(float, figures.split())
    assert conv_db >= ref_db - 1.0, (ref_db, conv_db, reasons)
    assert "qnnpack" in reasons, reasons


@pytest.mark.parametrize("rule", ["add_scalar", "mul_scalar"])
@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8])
def test_derived_scalar_qparams_are_the_kernels(rule: str, dtype: torch.dtype) -> None:
    """The reference graph's qparams after x + c / x * c (plain arithmetic in qmath) equal
    what quantized::add_scalar / mul_scalar derive, over random qparams and scalars
    (including shifts past the integer range, negative and zero scalars)."""
    from fxquant.backends.reference_ops import scalar_op_qparams

    gen = torch.Generator().manual_seed(1)
    lo, hi = (0, 255) if dtype == torch.quint8 else (-128, 127)
    kernel = getattr(torch.ops.quantized, rule)
    for i in range(400):
        scale = float(10 ** (torch.rand(1, generator=gen) * 5 - 4))
        zp = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        c = [float(torch.randn(1, generator=gen) * 3), float(torch.randint(-3, 4, (1,),
             generator=gen)), float(torch.rand(1, generator=gen) * 1000 - 500) * scale][i % 3]
        x = torch._make_per_tensor_quantized_tensor(
            torch.zeros(1, dtype=torch.uint8 if dtype == torch.quint8 else torch.int8), scale, zp)
        out = kernel(x, c)
        got = scalar_op_qparams(rule, scale, zp, dtype, c)
        assert got is not None and got[1] == out.q_zero_point(), (scale, zp, c)
        assert got[0] == pytest.approx(out.q_scale(), rel=1e-6), (scale, zp, c)


def _spec(shape: tuple[int, ...], qrange: tuple[int, int] = (0, 255)) -> kernel_check.InputSpec:
    return kernel_check.InputSpec(shape, 0.05, 128, torch.quint8, qrange)


def test_random_samples_depend_on_their_arguments_only() -> None:
    """The check's samples are kept between checks (drawing them cost a good part of a cold
    convert); they must not depend on what ran before, differ between a kernel's inputs, and
    a kernel that writes its input in place must not change the next check's sample."""
    specs = {0: _spec((1, 8, 6, 6)), 1: _spec((1, 8, 6, 6))}
    kernel_check.clear_cache()
    first = {k: t.int_repr().clone() for k, t in kernel_check.random_inputs(specs).items()}
    kernel_check.random_inputs({0: _spec((2, 3)), 1: _spec((5,), (0, 127))})  # other draws
    again = kernel_check.random_inputs(specs)
    for key in specs:
        assert torch.equal(again[key].int_repr(), first[key])
    kernel_check.clear_cache()
    fresh = kernel_check.random_inputs(specs)
    assert torch.equal(fresh[0].int_repr(), first[0])  # the same after the cache is cleared
    assert not torch.equal(first[0], first[1])  # two inputs of one kernel differ
    assert int(first[0].min()) == 0 and int(first[0].max()) == 255  # the whole range
    torch.relu_(again[0])  # a kernel writing its input (zero point 128: half the values rise)
    assert not torch.equal(again[0].int_repr(), first[0])
    assert torch.equal(kernel_check.random_inputs(specs)[0].int_repr(), first[0])
    heavy = kernel_check.random_inputs(specs, top_heavy=True)[0].int_repr()
    assert set(heavy.unique().tolist()) == {0, 255} and float((heavy == 255).float().mean()) > 0.8
