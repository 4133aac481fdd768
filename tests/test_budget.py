"""fxquant.quantize_with_budget: the one deliberately sensitive layer, and only it, stays float.

``mid`` has a weight column of 50 on an input feature that is always 0 (its producer's row is
zeroed and its bias negative, so ReLU gives exactly 0): per-channel int8 weights then have a
step of 50/127 and every other weight of ``mid`` (about 0.1) rounds to 0. Measured (AMD AVX2):
all layers int8 give a mean cosine to float of 0.915; ``mid`` float gives 0.9999.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.budget import quantize_with_budget
from fxquant.errors import FxQuantError
from fxquant.meta import qinfo


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.inp.weight[0] = 0.0
        m.inp.bias[0] = -1.0
        m.mid.weight[:, 0] = 50.0
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 16, generator=g) for _ in range(4)]
    test = torch.randn(256, 16, generator=g)
    with torch.no_grad():
        ref = m(test)

    def cosine(model: nn.Module) -> float:
        with torch.no_grad():
            return float(F.cosine_similarity(model(test), ref, dim=1).mean())

    return m, calib, cosine


def test_sensitive_layer_only_stays_float(case):
    m, calib, cosine = case
    seen = []
    q, report = quantize_with_budget(m, fxquant.get_default_qconfig_mapping("x86"), (calib[0],),
                                     calib, cosine, max_drop=0.01, backend="x86",
                                     progress=seen.append)
    assert report.met and report.float_layers == ("mid",)
    assert seen == report.steps and len(seen) == 2  # all int8, then mid float
    assert report.steps[0].drop > 0.05 and not report.steps[0].within_budget
    assert report.float_metric - report.metric <= 0.01
    assert cosine(q) == pytest.approx(report.metric)
    assert q.meta["fxquant_budget"] is report
    # decisions in the graph: mid float with the budget's reason, the others quantized
    kinds = {}
    for node in q.graph.nodes:
        if node.op == "call_module" and node.target in ("inp", "mid", "out"):
            kinds[node.target] = type(q.get_submodule(node.target)).__module__
            if node.target == "mid":
                d = qinfo(node).last("keep_float")
                assert d is not None and d.pass_name == "quantize_with_budget"
                assert "budget" in d.reason
    assert kinds["mid"] in ("torch.nn.modules.linear", "fxquant.nn.fused")  # float (+ ReLU)
    assert kinds["inp"] == kinds["out"] == "fxquant.nn.quantized"
    assert "mid" in report.to_text()


def test_budget_met_without_fallback(case):
    m, calib, cosine = case
    q, report = quantize_with_budget(m, fxquant.get_default_qconfig_mapping("x86"), (calib[0],),
                                     calib, cosine, max_drop=0.5, backend="x86")
    assert report.met and report.float_layers == () and len(report.steps) == 1


def test_budget_not_met_returns_best(case):
    m, calib, cosine = case
    q, report = quantize_with_budget(m, fxquant.get_default_qconfig_mapping("x86"), (calib[0],),
                                     calib, cosine, max_drop=0.0, backend="x86",
                                     max_float_layers=1)
    assert not report.met
    assert report.float_layers == ("mid",)  # the best of the tries
    assert "NOT met" in report.to_text()
    with pytest.raises(FxQuantError, match="max_drop"):
        quantize_with_budget(m, fxquant.get_default_qconfig_mapping("x86"), (calib[0],), calib,
                             cosine, max_drop=-1)
