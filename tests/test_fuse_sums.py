"""convert_fx(..., fuse_sums=True): conv + residual add (+ ReLU) rounded once
(fxquant.passes.fuse_sums, fxquant.nn.conv_add.ConvAdd2d).

The fused model is its own model (one rounding fewer than torch.ao's conv and add kernels):
its native kernels, its reference graph, its integer representation and the ONNX engines must
agree with each other, and the default convert must stay as it was. Activations use the x86
default qconfig (reduce_range): no int16 pair saturation on AVX2 CPUs.
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
from fxquant.nn.conv_add import ConvAdd2d
from fxquant.records import Action
from tests.util import calibrated, output_scale


class ResBlocks(nn.Module):
    """A stem, a basic block (conv-bn-relu, conv-bn, + identity, relu), an add of a 1x1 conv's
    output as the add's second operand (no ReLU), a conv whose output is used twice (not
    fusable), a head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, groups=2), nn.BatchNorm2d(c)
        self.c3 = nn.Conv2d(c, c, 1)
        self.c4 = nn.Conv2d(c, c, 3, stride=1, padding=1)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(y)) + x)
        x = x + self.c3(x)
        z = self.c4(x)
        x = z + z.sigmoid()  # z used twice: stays conv, then add
        return self.head(x.mean((2, 3)))


def _prepared(seed: int = 0, backend: str = "x86") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return calibrated(ResBlocks(), fxquant.get_default_qconfig_mapping(backend), backend)


@pytest.fixture(scope="module")
def fused() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    prepared, example = _prepared()
    return prepared, fxquant.convert_fx(prepared, fuse_sums=True), example


def _within_one_step(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((torch.round((a - b) / scale).abs() <= 1).float().mean())


def _fused_nodes(qmodel: nn.Module) -> list:
    return [n for n in qmodel.graph.nodes if n.op == "call_module"
            and isinstance(qmodel.get_submodule(n.target), ConvAdd2d)]


def test_residual_adds_fuse_into_their_convs(fused) -> None:
    _, qmodel, _ = fused
    nodes = _fused_nodes(qmodel)
    relus = sorted(qmodel.get_submodule(n.target).relu for n in nodes)
    assert relus == [False, True]  # the block's add + relu, and x + c3(x)
    for n in nodes:
        lowered = [d for d in qinfo(n).decisions if d.action == Action.LOWER]
        assert "onednn::qconv2d_pointwise.binary" in lowered[-1].reason
        assert lowered[-1].detail["check"].startswith("max 0 step") or \
            lowered[-1].detail["check"].startswith("max 1 step")
        assert any(d.pass_name == "fuse_sums" and d.action == Action.FUSE
                   for d in qinfo(n).decisions)
    # c4's output is also read by the sigmoid: not fused, and the reason is on the conv
    c4 = next(n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == "c4")
    assert not isinstance(qmodel.get_submodule("c4"), ConvAdd2d)
    assert not any(d.pass_name == "fuse_sums" for d in qinfo(c4).decisions)


def test_default_convert_is_unchanged(fused) -> None:
    prepared, _, example = fused
    assert not _fused_nodes(fxquant.convert_fx(prepared))
    ref = fxquant.convert_to_reference_fx(prepared)
    assert not any(d.pass_name == "fuse_sums" for n in ref.graph.nodes
                   for d in qinfo(n).decisions)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_reference_and_int_agree(seed: int) -> None:
    prepared, _ = _prepared(seed)
    native = fxquant.convert_fx(prepared, fuse_sums=True)
    reference = fxquant.convert_to_reference_fx(prepared, fuse_sums=True)
    integer = fxquant.convert_fx(prepared, fuse_sums=True, representation="int")
    x = torch.randn(32, 3, 16, 16) * 1.5
    with torch.no_grad():
        want = native(x)
        ref, ints = reference(x), integer(x)
    scale = output_scale(native)
    assert _within_one_step(want, ref, scale) >= 0.99
    assert _within_one_step(want, ints, scale) >= 0.99
    # the reference graph has no quantize between a fused conv and its add
    for n in reference.graph.nodes:
        if qinfo(n).rule == "conv2d_add":
            chain = n.args[0] if n.target is not torch.add else n
            assert chain.args[0].op == "call_module"


def test_fused_model_is_at_least_as_close_to_float() -> None:
    prepared, _ = _prepared(3)
    x = torch.randn(64, 3, 16, 16)
    float_model = copy.deepcopy(prepared)
    fused_out = fxquant.convert_fx(prepared, fuse_sums=True)(x)
    plain_out = fxquant.convert_fx(prepared)(x)
    with torch.no_grad():
        ref = float_model(x)  # the prepared model computes in float (observers only)

    def sqnr(y: torch.Tensor) -> float:
        return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()))

    # one rounding fewer per fused add: not worse than the plain model beyond noise
    assert sqnr(fused_out) >= sqnr(plain_out) - 0.5


def test_conv_add_module_matches_float64_and_leaves_accum_alone() -> None:
    torch.manual_seed(0)
    for relu, zp, per_channel, groups, stride in [(True, 3, True, 1, 1), (False, 70, False, 4, 2),
                                                  (True, 0, True, 8, 1)]:
        m = ConvAdd2d(16, 32, 3, stride=stride, padding=1, groups=groups, relu=relu)
        w = torch.randn(32, 16 // groups, 3, 3) * 0.1
        if per_channel:
            qw = torch.quantize_per_channel(w, w.abs().amax((1, 2, 3)).double() / 127,
                                            torch.zeros(32, dtype=torch.long), 0, torch.qint8)
        else:
            qw = torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
        b = torch.randn(32) * 0.1
        m.set_weight_bias(qw, b)
        m.set_output_qparams(0.05, zp)
        x = torch.quantize_per_tensor(torch.randn(2, 16, 12, 12), 0.03, 60, torch.quint8)
        h = 12 // stride
        accum = torch.quantize_per_tensor(torch.randn(2, 32, h, h), 0.04, 61, torch.quint8)
        before = accum.int_repr().clone()
        y = m(x, accum)
        assert torch.equal(accum.int_repr(), before)
        exact = F.conv2d(x.dequantize().double(), qw.dequantize().double(), b.double(),
                         stride, 1, 1, groups) + accum.dequantize().double()
        if relu:
            exact = exact.relu()
        want = torch.clamp(torch.round(exact / 0.05) + zp, 0, 255)
        steps = (y.int_repr().double() - want).abs()
        assert steps.max() <= 1 and float((steps == 0).float().mean()) >= 0.99
        again = pickle.loads(pickle.dumps(m))
        assert torch.equal(again(x, accum).int_repr(), y.int_repr())
        loaded = ConvAdd2d(16, 32, 3, stride=stride, padding=1, groups=groups, relu=relu)
        loaded.load_state_dict(m.state_dict())
        assert torch.equal(loaded(x, accum).int_repr(), y.int_repr())
        assert torch.equal(copy.deepcopy(m)(x, accum).int_repr(), y.int_repr())


def test_conv_add_module_refuses_other_dtypes() -> None:
    m = ConvAdd2d(4, 4, 1)
    x = torch.quantize_per_tensor(torch.randn(1, 4, 3, 3), 0.1, 0, torch.qint8)
    accum = torch.quantize_per_tensor(torch.randn(1, 4, 3, 3), 0.1, 0, torch.quint8)
    with pytest.raises(ValueError, match="quint8"):
        m(x, accum)
    with pytest.raises(ValueError, match="4-D"):
        m(accum[0], accum[0])


def test_qnnpack_backend_does_not_fuse() -> None:
    prepared, _ = _prepared(0, backend="qnnpack")
    ref = fxquant.convert_to_reference_fx(prepared, fuse_sums=True)
    reasons = [d.reason for n in ref.graph.nodes for d in qinfo(n).decisions
               if d.pass_name == "fuse_sums"]
    assert reasons and all("Backend.sum_fusion" in r for r in reasons)


def test_save_load_keeps_fuse_sums(fused, tmp_path) -> None:
    prepared, qmodel, example = fused
    path = fxquant.save(qmodel, tmp_path / "m.fxq")
    torch.manual_seed(0)
    loaded = fxquant.load(ResBlocks().eval(), path, (example,))
    assert len(_fused_nodes(loaded)) == 2
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(loaded(x), qmodel(x))


@pytest.mark.parametrize("backend,package", [("onnxruntime", "onnxruntime"),
                                             ("openvino", "openvino")])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_engines_agree_with_the_fused_model(backend: str, package: str, seed: int,
                                            tmp_path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip(package)
    prepared, example = _prepared(seed)
    qmodel = fxquant.convert_fx(prepared, fuse_sums=True)
    engine = fxquant.compile(qmodel, (example,), backend=backend)
    x = torch.randn(32, 3, 16, 16) * 1.5
    with torch.no_grad():
        assert _within_one_step(qmodel(x), engine(x), output_scale(qmodel)) >= 0.99
    if seed == 0:  # the exported graph: Conv -> Add, no QuantizeLinear between them
        import onnx

        path = str(tmp_path / "m.onnx")
        fxquant.export_onnx(qmodel, path, (example,))
        graph = onnx.load(path).graph
        producer = {o: n for n in graph.node for o in n.output}
        adds = [n for n in graph.node if n.op_type == "Add"]
        assert sum(producer[i].op_type == "Conv" for n in adds for i in n.input
                   if i in producer) == 2


def test_freeze_refuses_with_the_module_named(fused) -> None:
    """oneDNN's packed weights are tensors TorchScript cannot hold: freeze says so, naming
    the fused conv and its source line (the unfrozen GraphModule and the engines run it)."""
    from fxquant.freeze import FreezeError

    _, qmodel, example = fused
    with pytest.raises(FreezeError) as info:
        fxquant.freeze(qmodel, (example,))
    assert "ConvAdd2d" in str(info.value) and "test_fuse_sums.py" in str(info.value)


def test_qat_model_fuses_its_conv_bn_adds() -> None:
    """A QAT-trained ConvBn2d (BatchNorm folded at convert) fuses like a Conv2d; the fused
    model agrees with its reference graph."""
    torch.manual_seed(0)
    model = ResBlocks().train()
    example = torch.randn(2, 3, 16, 16)
    prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("x86"),
                                      (example,), backend="x86")
    for _ in range(3):
        prepared(torch.randn(4, 3, 16, 16))
    prepared.eval()
    native = fxquant.convert_fx(prepared, fuse_sums=True)
    assert len(_fused_nodes(native)) == 2  # the block's conv-bn + add + relu, and x + c3(x)
    reference = fxquant.convert_to_reference_fx(prepared, fuse_sums=True)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert _within_one_step(native(x), reference(x), output_scale(native)) >= 0.99


class BroadcastAdd(nn.Module):
    """conv(x) + its pooled mean (N, C, 1, 1): a broadcasting add, not a sum post-op."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + F.adaptive_avg_pool2d(self.conv2(x), 1)


def test_broadcasting_add_is_not_fused() -> None:
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    prepared = fxquant.prepare_fx(BroadcastAdd().eval(), fxquant.get_default_qconfig_mapping(
        "x86"), (example,), backend="x86")
    prepared(torch.randn(4, 3, 8, 8))
    qmodel = fxquant.convert_fx(prepared, fuse_sums=True)
    assert not _fused_nodes(qmodel)
    reasons = [d.reason for n in qmodel.graph.nodes for d in qinfo(n).decisions
               if d.pass_name == "fuse_sums"]
    assert any("broadcasting add" in r for r in reasons), reasons
    x = torch.randn(4, 3, 8, 8)
    ref = fxquant.convert_to_reference_fx(prepared, fuse_sums=True)
    with torch.no_grad():
        assert _within_one_step(qmodel(x), ref(x), output_scale(qmodel)) >= 0.99


def test_inductor_runs_the_fused_int_representation() -> None:
    from tests.util import inductor_or_skip

    inductor_or_skip()
    prepared, example = _prepared(0)
    native = fxquant.convert_fx(prepared, fuse_sums=True)
    compiled = fxquant.compile(fxquant.convert_fx(prepared, fuse_sums=True,
                                                  representation="int"),
                               (example,), backend="inductor")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _within_one_step(native(x), compiled(x), output_scale(native)) >= 0.99
