"""Range sanity after calibration (issue 11 item 2): convert_fx's range check.

Models that build the bad cases on purpose: a -1e4 additive mask, a -inf masked_fill, a
mask-building multiply by -3.4e38 (the scale overflows), a branch never run in calibration.
Each finding must name the node, its module path / source line, be fixed (the tensor kept
float) or warned, be recorded as a decision and show in the report. The models avoid the
attention pattern (no softmax after a matmul), whose mask path another default keeps float
before any observer is placed.
"""
from __future__ import annotations

import operator
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import CalibrationDataError, ConfigError, RangeWarning
from fxquant.observers import MinMaxObserver, PlaceholderObserver
from fxquant.qconfig import QConfig, default_weight_observer, get_default_qconfig
from fxquant.range_check import _non_widening, bulk_and_far, check_ranges, findings_of

torch.manual_seed(0)


def histogram_mapping() -> fxquant.QConfigMapping:
    return fxquant.QConfigMapping().set_global(get_default_qconfig("x86"))


def minmax_mapping() -> fxquant.QConfigMapping:
    qconfig = QConfig(MinMaxObserver.with_args(reduce_range=True), default_weight_observer)
    return fxquant.QConfigMapping().set_global(qconfig)


class MaskAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple:
        scores = self.fc(x) + mask
        return self.fc2(scores), scores


class MaskFill(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc(x).masked_fill(keep < 0.5, float("-inf")).relu())


class MaskBuild(nn.Module):
    """(1 - m) * finfo.min + scores: the multiply's range is 3.4e38."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return ((1.0 - m) * -3.4e38 + self.fc(x)).amax(-1)


X = torch.randn(32, 16)
MASK = torch.zeros(32, 8)
MASK[:, 6:] = -1e4
KEEP = (MASK == 0).float()


def convert(model: nn.Module, inputs: tuple, mapping: fxquant.QConfigMapping, **kwargs):
    prepared = fxquant.prepare_fx(model.eval(), mapping, inputs, backend="x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxquant.errors.CalibrationWarning)
        prepared(*inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = fxquant.convert_fx(prepared, **kwargs)
    return quantized, [w for w in caught if issubclass(w.category, RangeWarning)]


def unmasked_error(model: nn.Module, quantized: nn.Module) -> float:
    """Relative error of the masked scores' unmasked columns."""
    ref, got = model(X, MASK)[1][:, :6].detach(), quantized(X, MASK)[1][:, :6].detach()
    return float((ref - got).abs().max() / ref.abs().max())


@pytest.mark.parametrize("mapping", [histogram_mapping, minmax_mapping])
def test_additive_mask_is_found_named_and_kept_float(mapping):
    model = MaskAdd().eval()
    quantized, caught = convert(model, (X, MASK), mapping())
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "far_values: node 'add" in text and "test_range_sanity.py" in text
    assert "scores = self.fc(x) + mask" in text and "kept float" in text
    findings = findings_of(quantized)
    assert [f.kind for f in findings] == ["far_values"]
    assert findings[0].node.startswith("add") and "test_range_sanity.py" in findings[0].source
    assert unmasked_error(model, quantized) < 0.05  # the int8 Linear's own rounding (~2%)
    report = fxquant.report(quantized).to_text()
    assert "Range findings (1" in report and "far_values: node 'add" in report
    assert "range check (far_values): output kept float" in report
    assert "Range findings" in fxquant.report(quantized).to_markdown()


def test_additive_mask_without_the_fix_collapses_and_warn_mode_says_so():
    model = MaskAdd().eval()
    off, caught = convert(model, (X, MASK), histogram_mapping(), range_check="off")
    assert caught == [] and findings_of(off) == []
    warned, caught = convert(model, (X, MASK), histogram_mapping(), range_check="warn")
    assert len(caught) == 1 and "not fixed (range_check='warn')" in str(caught[0].message)
    assert "convert_fx(..., range_check='fix') applies the fix" in str(caught[0].message)
    assert [f.fix for f in findings_of(warned)] == ["not fixed (range_check='warn')"]
    # the bulk gets well under one step of the -1e4-wide range: the unmasked scores collapse
    assert unmasked_error(model, warned) > 0.5
    assert unmasked_error(model, off) == pytest.approx(unmasked_error(model, warned))


def test_minus_inf_masked_fill_is_kept_float():
    model = MaskFill().eval()
    quantized, caught = convert(model, (X, KEEP), histogram_mapping())
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "infinite: node 'masked_fill'" in text and "infinite values" in text and "kept float" in text
    ref, got = model(X, KEEP).detach(), quantized(X, KEEP).detach()
    assert float((ref - got).abs().max() / ref.abs().max()) < 0.05


def test_mask_building_multiply_overflow_is_found_and_kept_float():
    model = MaskBuild().eval()
    # explicit rules for mul / add: the attention defaults would keep them float anyway
    qconfig = get_default_qconfig("x86")
    mapping = histogram_mapping().set_object_type(operator.mul, qconfig).set_object_type(operator.add, qconfig)
    quantized, caught = convert(model, (X, KEEP), mapping)
    texts = [str(w.message) for w in caught]
    assert any("overflow: node" in t and "(1.0 - m) * -3.4e38" in t for t in texts), texts
    assert all("kept float" in t for t in texts)
    assert any("scale" in t and "overflows" in t for t in texts)
    kinds = {f.kind for f in findings_of(quantized)}
    assert kinds == {"overflow"}
    ref, got = model(X, KEEP).detach(), quantized(X, KEEP).detach()
    # the masked rows are -3.4e38 + score; the others must come out right
    unmasked = ref > -1e30
    assert torch.allclose(got[unmasked], ref[unmasked], atol=0.1)


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> tuple:
        return self.a(x), self.b(x[: n.shape[0]])


def test_branch_never_run_is_an_error_naming_the_node():
    """No data stays what issue 9 made it: CalibrationDataError naming the unobserved node
    (range_check cannot help: there is no range to fix)."""
    prepared = fxquant.prepare_fx(Branch().eval(), histogram_mapping(),
                                  (torch.randn(3, 4), torch.zeros(2)), backend="x86")
    prepared(torch.randn(3, 4), torch.zeros(0))
    for mode in ("fix", "warn", "off"):
        with pytest.raises(CalibrationDataError, match="saw no data") as e:
            fxquant.convert_fx(prepared, range_check=mode)
        assert e.value.module_path == "b"


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(y * gate)


@pytest.mark.parametrize("mapping", [histogram_mapping, minmax_mapping])
def test_no_findings_on_a_plain_model_and_a_two_valued_input(mapping):
    """A 0 / 1 gate (two values, quantized exactly) and ordinary activations are no finding."""
    x = torch.randn(8, 3, 10, 10)
    gate = (torch.rand(8, 8) > 0.7).float()
    quantized, caught = convert(Plain().eval(), (x, gate), mapping())
    assert caught == [] and findings_of(quantized) == []


def test_wider_than_input_is_clipped_to_the_input_range():
    """fxquant's annotations give relu / pooling / clamp their input's observer; a custom
    annotation that gives them their own, wider one is clipped to the input's range."""
    class Clamp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.clamp(self.fc(x) + y, -1.0, 1.0)

    prepared = fxquant.prepare_fx(Clamp().eval(), minmax_mapping(), (X, X), backend="x86")
    prepared(X, X)
    gm = prepared
    relu = next(n for n in gm.graph.nodes if n.op != "call_module" and _non_widening(gm, n))
    out_obs = next(iter(relu.users))
    wide = MinMaxObserver(reduce_range=True)
    wide(torch.tensor([-40.0, 50.0]))  # a wider range than the input's observer saw
    gm.add_submodule("wide_observer", wide)
    out_obs.target = "wide_observer"
    in_range = gm.get_submodule(str(relu.args[0].target)).calculate_qparams()
    with pytest.warns(RangeWarning, match=f"wider_than_input: node '{relu.name}'"):
        findings = check_ranges(gm, "fix")
    assert [f.kind for f in findings] == ["wider_than_input"] and "clipped" in findings[0].fix
    fixed = gm.get_submodule("wide_observer")
    assert float(fixed.calculate_qparams()[0]) == pytest.approx(float(in_range[0]), rel=1e-5)


def test_bad_mode_is_a_config_error_and_off_changes_nothing():
    prepared = fxquant.prepare_fx(MaskAdd().eval(), histogram_mapping(), (X, MASK), backend="x86")
    prepared(X, MASK)
    with pytest.raises(ConfigError, match="range_check must be one of"):
        fxquant.convert_fx(prepared, range_check="fixit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RangeWarning)
        assert check_ranges(prepared, "off") == []
    # the prepared model itself is never changed by convert's check (convert works on a copy)
    assert not any(isinstance(m, PlaceholderObserver) for m in prepared.modules())


def test_bulk_and_far_split():
    values = torch.tensor([-1e4, -1e4 + 1, -2.0, 0.0, 3.0], dtype=torch.float64)
    lo, hi, far = bulk_and_far(values, torch.ones_like(values))
    assert (lo, hi) == (-2.0, 3.0) and far == pytest.approx(0.4)
    assert bulk_and_far(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.ones(2)) is None
