"""convert_fx(..., fuse_activations=True): conv + SiLU / hardswish rounded once
(fxquant.passes.fuse_activations, fxquant.nn.conv_add.ConvAct2d).

The fused model is its own model (the default rounds the conv's output before the activation,
and SiLU's sigmoid to 1/256 before quantized::mul): its native kernels, its reference graph,
its integer representation and the ONNX engines must agree with each other, and the default
convert must stay as it was. Activations use the x86 default qconfig (reduce_range): no int16
pair saturation on AVX2 CPUs.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.meta import qinfo
from fxquant.nn.conv_add import ConvAct2d, ConvAdd2d
from fxquant.records import Action
from tests.util import calibrated, output_scale


class MBBlocks(nn.Module):
    """EfficientNet / MobileNetV3-like: a conv-bn-SiLU stem, an inverted residual block
    (expand 1x1 + SiLU, depthwise 3x3 + SiLU, squeeze-excite with SiLU and sigmoid, project
    1x1, + identity), a conv + hardswish, a conv whose output is read twice (not fusable), a
    reflect-padded conv + SiLU (not fusable: the kernel pads with zeros), a head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.BatchNorm2d(4 * c),
                                    nn.SiLU(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c),
                                nn.BatchNorm2d(4 * c), nn.SiLU())
        self.se1, self.se2 = nn.Conv2d(4 * c, 8, 1), nn.Conv2d(8, 4 * c, 1)
        self.project = nn.Sequential(nn.Conv2d(4 * c, c, 1), nn.BatchNorm2d(c))
        self.hs = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, stride=2), nn.Hardswish())
        self.twice = nn.Conv2d(c, c, 1)
        self.reflect = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(self.expand(x))
        s = torch.sigmoid(self.se2(F.silu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        x = x + self.project(y * s)
        x = self.hs(x)
        z = self.twice(x)
        x = F.silu(z) + z
        x = F.silu(self.reflect(x))
        return self.head(x.mean((2, 3)))


FUSED = {"stem.0": "silu", "expand.0": "silu", "dw.0": "silu", "se1": "silu",
         "hs.0": "hardswish"}


def _prepared(seed: int = 0, backend: str = "x86") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return calibrated(MBBlocks(), fxquant.get_default_qconfig_mapping(backend), backend)


@pytest.fixture(scope="module")
def fused() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    prepared, example = _prepared()
    return prepared, fxquant.convert_fx(prepared, fuse_activations=True), example


def _within_one_step(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((torch.round((a - b) / scale).abs() <= 1).float().mean())


def _fused(qmodel: nn.Module) -> dict[str, str]:
    """Module path -> activation of every ConvAct2d in the converted model."""
    return {str(n.target): qmodel.get_submodule(n.target).activation
            for n in qmodel.graph.nodes if n.op == "call_module"
            and isinstance(qmodel.get_submodule(n.target), ConvAct2d)}


def test_convs_fuse_with_their_activations(fused) -> None:
    _, qmodel, _ = fused
    assert _fused(qmodel) == FUSED
    for n in qmodel.graph.nodes:
        if n.op == "call_module" and str(n.target) in FUSED:
            lowered = [d for d in qinfo(n).decisions if d.action == Action.LOWER]
            assert f"onednn::qconv2d_pointwise (conv + {FUSED[n.target]})" in lowered[-1].reason
            assert lowered[-1].detail["check"].startswith("max 0 step") or \
                lowered[-1].detail["check"].startswith("max 1 step")
            assert any(d.pass_name == "fuse_activations" and d.action == Action.FUSE
                       for d in qinfo(n).decisions)
    # not fused: the conv read twice (no record: not a candidate) and the reflect-padded one
    # (its reason recorded on the conv)
    assert not isinstance(qmodel.get_submodule("twice"), ConvAct2d)
    assert not isinstance(qmodel.get_submodule("reflect"), ConvAct2d)
    reflect = next(n for n in qmodel.graph.nodes if n.op == "call_module"
                   and n.target == "reflect")
    reasons = [d.reason for d in qinfo(reflect).decisions
               if d.pass_name == "fuse_activations" and d.action == Action.NOT_FUSED]
    assert reasons and "padding other than explicit zeros" in reasons[0]


def test_default_convert_is_unchanged(fused) -> None:
    prepared, _, example = fused
    assert not _fused(fxquant.convert_fx(prepared))
    ref = fxquant.convert_to_reference_fx(prepared)
    assert not any(d.pass_name == "fuse_activations" for n in ref.graph.nodes
                   for d in qinfo(n).decisions)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_reference_and_int_agree(seed: int) -> None:
    prepared, _ = _prepared(seed)
    native = fxquant.convert_fx(prepared, fuse_activations=True)
    reference = fxquant.convert_to_reference_fx(prepared, fuse_activations=True)
    integer = fxquant.convert_fx(prepared, fuse_activations=True, representation="int")
    x = torch.randn(32, 3, 16, 16) * 1.5
    with torch.no_grad():
        want = native(x)
        ref, ints = reference(x), integer(x)
    scale = output_scale(native)
    assert _within_one_step(want, ref, scale) >= 0.99
    assert _within_one_step(want, ints, scale) >= 0.99
    # the reference graph has no quantize between a fused conv and its activation
    fused_acts = [n for n in reference.graph.nodes if qinfo(n).rule == "conv2d_act"]
    assert len(fused_acts) == len(FUSED)
    for n in fused_acts:
        assert n.target in (F.silu, F.hardswish) and n.args[0].op == "call_module"


def test_fused_model_is_at_least_as_close_to_float() -> None:
    prepared, _ = _prepared(3)
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = copy.deepcopy(prepared)(x)  # the prepared model computes in float
        fused_out = fxquant.convert_fx(prepared, fuse_activations=True)(x)
        plain_out = fxquant.convert_fx(prepared)(x)

    def sqnr(y: torch.Tensor) -> float:
        return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()))

    # fewer roundings per fused activation: not worse than the plain model beyond noise
    assert sqnr(fused_out) >= sqnr(plain_out) - 0.5


@pytest.mark.parametrize("activation", ["silu", "hardswish"])
def test_conv_act_module_matches_float64(activation: str) -> None:
    torch.manual_seed(0)
    fn = {"silu": F.silu, "hardswish": F.hardswish}[activation]
    for zp, per_channel, groups, stride in [(3, True, 1, 1), (70, False, 4, 2),
                                            (0, True, 16, 1)]:
        out_channels = 32 if groups != 16 else 16
        m = ConvAct2d(16, out_channels, 3, stride=stride, padding=1, groups=groups,
                      activation=activation)
        w = torch.randn(out_channels, 16 // groups, 3, 3) * 0.3
        if per_channel:
            qw = torch.quantize_per_channel(w, w.abs().amax((1, 2, 3)).double() / 127,
                                            torch.zeros(out_channels, dtype=torch.long), 0,
                                            torch.qint8)
        else:
            qw = torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
        b = torch.randn(out_channels) * 0.3
        m.set_weight_bias(qw, b)
        m.set_output_qparams(0.02, zp)
        x = torch.quantize_per_tensor(torch.randn(2, 16, 12, 12), 0.03, 60, torch.quint8)
        y = m(x)
        exact = fn(F.conv2d(x.dequantize().double(), qw.dequantize().double(), b.double(),
                            stride, 1, 1, groups))
        want = torch.clamp(torch.round(exact / 0.02) + zp, 0, 255)
        steps = (y.int_repr().double() - want).abs()
        assert steps.max() <= 1 and float((steps == 0).float().mean()) >= 0.99
        assert float(want.std()) > 5  # random data over many steps, not a constant
        again = pickle.loads(pickle.dumps(m))
        assert torch.equal(again(x).int_repr(), y.int_repr())
        loaded = ConvAct2d(16, out_channels, 3, stride=stride, padding=1, groups=groups,
                           activation=activation)
        loaded.load_state_dict(m.state_dict())
        assert torch.equal(loaded(x).int_repr(), y.int_repr())
        assert torch.equal(copy.deepcopy(m)(x).int_repr(), y.int_repr())


def test_conv_act_module_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="activation must be one of"):
        ConvAct2d(4, 4, 1, activation="gelu")
    m = ConvAct2d(4, 4, 1)
    x = torch.quantize_per_tensor(torch.randn(1, 4, 3, 3), 0.1, 0, torch.qint8)
    with pytest.raises(ValueError, match="quint8"):
        m(x)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.quantize_per_tensor(torch.randn(4, 3, 3), 0.1, 0, torch.quint8))


def test_qnnpack_backend_does_not_fuse() -> None:
    prepared, _ = _prepared(0, backend="qnnpack")
    ref = fxquant.convert_to_reference_fx(prepared, fuse_activations=True)
    reasons = [d.reason for n in ref.graph.nodes for d in qinfo(n).decisions
               if d.pass_name == "fuse_activations"]
    assert len(reasons) == len(FUSED) + 1  # + the reflect-padded conv
    assert all("Backend.sum_fusion" in r for r in reasons)


def test_with_fuse_sums_both_fuse() -> None:
    prepared, _ = _prepared(1)
    both = fxquant.convert_fx(prepared, fuse_sums=True, fuse_activations=True)
    assert _fused(both) == FUSED
    assert sum(isinstance(m, ConvAdd2d) for m in both.modules()) == 1  # x + project(...)
    reference = fxquant.convert_to_reference_fx(prepared, fuse_sums=True,
                                                fuse_activations=True)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert _within_one_step(both(x), reference(x), output_scale(both)) >= 0.99


def test_save_load_keeps_fuse_activations(fused, tmp_path) -> None:
    prepared, qmodel, example = fused
    path = fxquant.save(qmodel, tmp_path / "m.fxq")
    torch.manual_seed(0)
    loaded = fxquant.load(MBBlocks().eval(), path, (example,))
    assert _fused(loaded) == FUSED
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


@pytest.mark.parametrize("backend,package", [("onnxruntime", "onnxruntime"),
                                             ("openvino", "openvino")])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_engines_agree_with_the_fused_model(backend: str, package: str, seed: int,
                                            tmp_path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip(package)
    prepared, example = _prepared(seed)
    qmodel = fxquant.convert_fx(prepared, fuse_activations=True)
    engine = fxquant.compile(qmodel, (example,), backend=backend)
    x = torch.randn(32, 3, 16, 16) * 1.5
    with torch.no_grad():
        assert _within_one_step(qmodel(x), engine(x), output_scale(qmodel)) >= 0.99
    if seed == 0:  # the exported graph: Conv -> Sigmoid / Mul or HardSwish, no Q between
        import onnx

        path = str(tmp_path / "m.onnx")
        fxquant.export_onnx(qmodel, path, (example,))
        graph = onnx.load(path).graph
        producer = {o: n for n in graph.node for o in n.output}
        sigmoids = [n for n in graph.node if n.op_type == "Sigmoid"
                    and producer[n.input[0]].op_type == "Conv"]
        hardswish = [n for n in graph.node if n.op_type == "HardSwish"
                     and producer[n.input[0]].op_type == "Conv"]
        assert len(sigmoids) == 4 and len(hardswish) == 1


def test_freeze_refuses_with_the_module_named(fused) -> None:
    """oneDNN's packed weights are tensors TorchScript cannot hold: freeze says so, naming
    the fused conv and its source line (the unfrozen GraphModule and the engines run it)."""
    from fxquant.freeze import FreezeError

    _, qmodel, example = fused
    with pytest.raises(FreezeError) as info:
        fxquant.freeze(qmodel, (example,))
    assert "ConvAct2d" in str(info.value) and "test_fuse_activations.py" in str(info.value)


def test_qat_model_fuses_its_conv_bn_activations() -> None:
    """A QAT-trained ConvBn2d (BatchNorm folded at convert) fuses like a Conv2d; the fused
    model agrees with its reference graph."""
    torch.manual_seed(0)
    model = MBBlocks().train()
    example = torch.randn(2, 3, 16, 16)
    prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("x86"),
                                      (example,), backend="x86")
    for _ in range(3):
        prepared(torch.randn(4, 3, 16, 16))
    prepared.eval()
    native = fxquant.convert_fx(prepared, fuse_activations=True)
    assert _fused(native) == FUSED
    reference = fxquant.convert_to_reference_fx(prepared, fuse_activations=True)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert _within_one_step(native(x), reference(x), output_scale(native)) >= 0.99


def test_inductor_runs_the_fused_int_representation() -> None:
    from tests.util import inductor_or_skip

    inductor_or_skip()
    prepared, example = _prepared(0)
    native = fxquant.convert_fx(prepared, fuse_activations=True)
    compiled = fxquant.compile(fxquant.convert_fx(prepared, fuse_activations=True,
                                                  representation="int"),
                               (example,), backend="inductor")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _within_one_step(native(x), compiled(x), output_scale(native)) >= 0.99


def test_fused_convs_example_runs(capsys) -> None:
    """examples/fused_convs.py: every conv + SiLU / hardswish / add of its model fused, the
    fused model not less accurate than the default, and (with OpenVINO) each model's engine
    within one step of its own native model."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "fused_convs.py"
    spec = importlib.util.spec_from_file_location("fused_convs_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    figures = example.run(size=32)
    printed = capsys.readouterr().out
    assert printed.count("conv with a silu post-op") == 7
    assert printed.count("conv with a hardswish post-op") == 1
    assert printed.count("conv with a sum post-op") == 2
    assert figures["sqnr fused"] >= figures["sqnr default"] - 0.5
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("onnx"):
        assert figures["openvino default agreement"] >= 0.99
        assert figures["openvino fused agreement"] >= 0.99
