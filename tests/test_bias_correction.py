"""fxquant.bias_correction: the per-channel mean shift quantization adds is measured on the
calibration data and removed from the biases, on the native and on the reference graph.

The model makes the shift real: a depthwise conv whose channel 0 has weights 40x larger than
the others, quantized per tensor (qnnpack's default weights), so the small channels' weights
round to a coarse grid; its input has a non-zero mean, so their rounding error becomes a mean
output shift. Measured (AMD AVX2): the mean |per-channel mean error| of the output on
held-out data drops from 0.019 to 0.0005 (native and reference, sequential) or 0.0012 (one
pass) after correction, and the output MSE from 0.00163 to 0.00123; the tests ask for 5x.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import fxquant
from fxquant.backends.engine import engine
from fxquant.bias_correction import bias_correction, correction_report
from fxquant.errors import FxQuantError
from fxquant.meta import qinfo

BACKEND = "qnnpack"  # per-tensor symmetric weights: the shift is large and deterministic


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(torch.relu(self.bn(self.dw(x))))


def _model() -> DepthwiseNet:
    torch.manual_seed(0)
    m = DepthwiseNet().eval()
    with torch.no_grad():
        m.dw.weight.mul_(0.3)
        m.dw.weight[0].mul_(40.0)
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.05, 0.2)
    return m


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 8, 8, generator=g) * 0.5 + 1.0


@pytest.fixture(scope="module")
def setup():
    m = _model()
    calib = [_data(16, s) for s in range(4)]
    prepared = fxquant.prepare_fx(m, fxquant.get_default_qconfig_mapping(BACKEND), (calib[0],),
                                  backend=BACKEND)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return m, prepared, calib


def _mean_shift(float_model: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    """Mean over output channels of |mean over the data of (model - float)|."""
    with torch.no_grad():
        d = model(x) - float_model(x)
    return float(d.mean(dim=(0, 2, 3)).abs().mean())


def test_native_shift_reduced(setup):
    m, prepared, calib = setup
    test = _data(64, 100)
    before = fxquant.convert_fx(prepared)
    corrected = bias_correction(prepared, calib)
    b, a = _mean_shift(m, before, test), _mean_shift(m, corrected, test)
    assert b > 0.01, b  # the model really has a shift
    assert a < b / 5, (b, a)
    # noise is not worse either
    with torch.no_grad():
        ref = m(test)
        assert (corrected(test) - ref).pow(2).mean() < (before(test) - ref).pow(2).mean()


def test_reference_graph_and_float_reference(setup):
    m, prepared, calib = setup
    test = _data(64, 100)
    ref = fxquant.convert_to_reference_fx(prepared)
    corrected = bias_correction(ref, calib, reference=m)  # float model as the reference
    b, a = _mean_shift(m, ref, test), _mean_shift(m, corrected, test)
    assert a < b / 5, (b, a)
    # the float model and the prepared model are the same reference
    via_prepared = bias_correction(ref, calib, reference=prepared)
    assert torch.allclose(corrected.get_submodule("pw").bias,
                          via_prepared.get_submodule("pw").bias, atol=1e-6)
    assert ref.get_submodule("pw").bias is None  # the input model is untouched


def test_report_decisions_and_progress(setup):
    _, prepared, calib = setup
    seen = []
    corrected = bias_correction(prepared, calib, progress=seen.append)
    report = correction_report(corrected)
    assert [lc.name for lc in report.layers] == [lc.name for lc in seen]
    assert {lc.name for lc in report.layers} == {"dw", "pw"}
    dw = report.layers[0]
    assert dw.channels == 8 and dw.max_abs_shift > 0.01
    node = next(n for n in corrected.graph.nodes if n.target == "dw")
    assert qinfo(node).last("correct_bias") is not None
    assert report.to_text().splitlines()[1].startswith("dw ")


def test_state_dict_round_trip(setup):
    _, prepared, calib = setup
    corrected = bias_correction(prepared, calib)
    assert corrected.get_submodule("pw").bias() is not None  # created: pw had no bias
    buf = io.BytesIO()
    torch.save(corrected.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = fxquant.convert_fx(prepared)  # uncorrected, no bias on pw
    x = _data(8, 7)
    with engine(BACKEND), torch.no_grad():  # load_state_dict packs for the current engine
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), corrected(x))
        assert not torch.equal(fxquant.convert_fx(prepared)(x), corrected(x))


def test_one_pass_mode_also_reduces(setup):
    m, prepared, calib = setup
    test = _data(64, 100)
    before = _mean_shift(m, fxquant.convert_fx(prepared), test)
    after = _mean_shift(m, bias_correction(prepared, calib, sequential=False), test)
    assert after < before / 5, (before, after)


def test_needs_reference_for_converted(setup):
    _, prepared, calib = setup
    q = fxquant.convert_fx(prepared)
    with pytest.raises(FxQuantError, match="reference"):
        bias_correction(q, calib)
    with pytest.raises(FxQuantError, match="no batch"):
        bias_correction(prepared, [])
    with pytest.raises(FxQuantError, match="GraphModule"):
        bias_correction(copy.deepcopy(nn.Linear(2, 2)), calib)
