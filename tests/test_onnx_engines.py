"""fxquant.export_onnx and the ONNX Runtime / OpenVINO engines (issue 10, item 3).

The exported QDQ graph must carry fxquant's own decisions: every QuantizeLinear has exactly a
scale / zero point of the converted model, the int8 weights and their per-channel scales are
the converted modules', ReLU6 after a conv is a Clip on the conv's uint8 output (no
DequantizeLinear/QuantizeLinear pair between them), and both engines reproduce the native
converted model within one output step on >= 99% of the elements. Tests that need an engine
skip when its extra is not installed; the EngineUnavailable tests run without them.

Activations use the x86 default qconfig (reduce_range, 0..127): ONNX Runtime's and OpenVINO's
u8s8 kernels saturate int16 pair sums on AVX2 CPUs without VNNI just as fbgemm's do when
activations use the full 0..255 range, so full-range qconfigs would make the agreement depend
on the machine.
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.backends.onnx import OnnxExportError
from fxquant.compile import EngineUnavailable
from fxquant.errors import FxQuantError
from fxquant.meta import qinfo
from tests.util import output_scale


class SmallCNN(nn.Module):
    """conv-bn-relu, conv-relu6 (with 7-bit x86 activations the bound 6 is not the kernel's
    saturation, so the int8 output is clipped: a clamp node, or a clamping conv module), a
    residual add, cat, max pool, global average pool, flatten, linear."""

    def __init__(self, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu6 = nn.ReLU6()
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        b = self.relu6(self.conv2(a))  # own output qparams: not a cat input (cat shares)
        c = self.conv3(torch.cat([a, self.conv4(b)], 1))
        if self.residual:
            c = c + a
        return self.fc(torch.flatten(self.gap(self.pool(c)), 1))


class MLP(nn.Module):
    """Linear-ReLU, Linear, a head fxquant keeps float (QConfigMapping: head -> None), and a
    3-D input (the linear runs on (batch, tokens, features))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.fc2(F.relu(self.fc1(x)))))


def _calibrated(model: nn.Module, shape: tuple[int, ...], mapping: fxquant.QConfigMapping
                ) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model.eval()
    for m in model.modules():  # weights large enough that conv2's output passes 6
        if isinstance(m, nn.Conv2d):
            nn.init.uniform_(m.weight, -0.6, 0.6)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    example = torch.randn(shape)
    prepared = fxquant.prepare_fx(model, mapping, (example,))
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(shape) * 2)
    return prepared, example


def _convert(model: nn.Module, shape: tuple[int, ...], mapping: fxquant.QConfigMapping
             ) -> tuple[nn.Module, torch.Tensor]:
    prepared, example = _calibrated(model, shape, mapping)
    return fxquant.convert_fx(prepared), example


def _seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """The model built under a fixed seed: its Linear layers keep their default init, and an
    unseeded head made the agreement figures differ from run to run (0.76-1.00 before the
    OpenVINO sum rounding was kept)."""
    torch.manual_seed(seed)
    return make()


@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, torch.Tensor]:
    return _convert(_seeded(SmallCNN), (2, 3, 16, 16), fxquant.get_default_qconfig_mapping("x86"))


@pytest.fixture(scope="module")
def cnn_no_residual() -> tuple[nn.Module, torch.Tensor]:
    return _convert(_seeded(lambda: SmallCNN(residual=False)), (2, 3, 16, 16),
                    fxquant.get_default_qconfig_mapping("x86"))


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, torch.Tensor]:
    mapping = fxquant.get_default_qconfig_mapping("x86").set_module_name("head", None)
    return _convert(_seeded(MLP), (2, 6, 16), mapping)


def _agree_within_one_step(native: torch.Tensor, other: torch.Tensor, scale: float) -> float:
    """Fraction of elements whose integer step (of the output scale) differs by at most 1."""
    assert native.shape == other.shape and other.dtype == native.dtype
    steps = torch.round((other - native) / scale).abs()
    return float((steps <= 1).float().mean())


CASES = [
    pytest.param("onnxruntime", "onnxruntime", "cnn", id="onnxruntime-cnn"),
    pytest.param("onnxruntime", "onnxruntime", "mlp", id="onnxruntime-mlp"),
    pytest.param("openvino", "openvino", "cnn", id="openvino-cnn"),
    pytest.param("openvino", "openvino", "cnn_no_residual", id="openvino-cnn_no_residual"),
    pytest.param("openvino", "openvino", "mlp", id="openvino-mlp"),
]


@pytest.mark.parametrize("backend,package,which", CASES)
def test_engine_agrees_with_native(backend: str, package: str, which: str,
                                   request: pytest.FixtureRequest) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip(package)
    qmodel, example = request.getfixturevalue(which)
    engine = fxquant.compile(qmodel, (example,), backend=backend, threads=1)
    assert isinstance(engine, nn.Module)
    scale = output_scale(qmodel)
    if which == "mlp":  # the float head: compare in the last quantized layer's steps
        scale = float(qmodel.fc2.scale)
    torch.manual_seed(1)
    natives, others = [], []
    # the example's batch, then a new batch size (exported and compiled again): >= 100 output
    # elements in all, so that "99% within one step" means something
    for batch in (example.shape[0], 32):
        x = torch.randn((batch, *example.shape[1:])) * 2
        natives.append(qmodel(x).flatten())
        others.append(engine(x).flatten())
    native, other = torch.cat(natives), torch.cat(others)
    frac = _agree_within_one_step(native, other, scale)
    assert frac >= 0.99, f"{backend} {which}: {frac:.4f} of {native.numel()} within one step"
    assert torch.allclose(native, other, atol=8 * scale), (native - other).abs().max() / scale


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_openvino_residual_add_keeps_native_rounding(seed: int) -> None:
    """OpenVINO's CPU plugin fuses a residual Add into the conv before it (oneDNN's sum
    post-op) and then skips the rounding of the conv's output to its uint8 grid, which the
    native quantized add sees: 3-24% of this CNN's logits were more than one native step
    away (seeds 0-5 of the head). The OpenVINO export repeats the QDQ pair on the conv
    operand (exact), and the fused sum keeps the rounding: the issue's 99% on other heads."""
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    qmodel, example = _convert(_seeded(SmallCNN, seed), (2, 3, 16, 16),
                               fxquant.get_default_qconfig_mapping("x86"))
    engine = fxquant.compile(qmodel, (example,), backend="openvino", threads=1)
    torch.manual_seed(seed + 100)
    x = torch.randn((32, *example.shape[1:])) * 2
    native, other = qmodel(x), engine(x)
    assert _agree_within_one_step(native, other, output_scale(qmodel)) >= 0.99


def test_sum_rounding_only_in_the_openvino_graph(cnn: tuple[nn.Module, torch.Tensor]) -> None:
    """The repeated QDQ pair is in the OpenVINO graph only (export_onnx and ONNX Runtime get
    the plain QDQ form), on both operands of the residual add: conv3's output and conv1's
    (through its ReLU's uint8 Clip), the two convs OpenVINO could fuse the sum into."""
    onnx = pytest.importorskip("onnx")
    from fxquant.backends.onnx import build

    qmodel, example = cnn
    plain, _ = build(qmodel, (example,))
    rounded, _ = build(qmodel, (example,), round_sum_inputs=True)

    def add_operand_chains(model: "onnx.ModelProto") -> list[list[str]]:
        producer = {o: node for node in model.graph.node for o in node.output}
        chains = []
        for add in (n for n in model.graph.node if n.op_type == "Add"):
            for name in add.input:
                ops, node = [], producer.get(name)
                while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
                    ops.append(node.op_type)
                    node = producer.get(node.input[0])
                chains.append(ops)
        return chains

    assert add_operand_chains(plain) == [["DequantizeLinear", "QuantizeLinear"],
                                         ["DequantizeLinear"]]
    assert add_operand_chains(rounded) == [["DequantizeLinear", "QuantizeLinear"] * 2,
                                           ["DequantizeLinear", "QuantizeLinear", "DequantizeLinear"]]
    assert len(rounded.graph.node) == len(plain.graph.node) + 4


def test_openvino_fuse_sums_opt_out(cnn: tuple[nn.Module, torch.Tensor]) -> None:
    """fuse_sums=True (speed over agreement) runs the plain QDQ graph; the default the rounded
    one, and both compute the same model within a few steps."""
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    qmodel, example = cnn
    exact = fxquant.compile(qmodel, (example,), backend="openvino", threads=1)
    fused = fxquant.compile(qmodel, (example,), backend="openvino", threads=1, fuse_sums=True)
    assert len(exact.onnx_model().graph.node) == len(fused.onnx_model().graph.node) + 4
    assert not any(n.op_type == "QuantizeLinear" and n.input[0].startswith("add_")
                   for n in fused.onnx_model().graph.node if "dequantizelinear" in n.input[0])
    x = torch.randn(8, *example.shape[1:]) * 2
    assert float(((exact(x) - fused(x)) / output_scale(qmodel)).round().abs().max()) <= 4


def _model_qparams(qmodel: nn.Module) -> set[tuple[float, int]]:
    """(scale as float32, zero point) of every quantized activation the converted model makes:
    its quantized modules and QParams holders, and the quantized:: kernels' output qparams."""
    out = set()
    for m in qmodel.modules():
        if hasattr(m, "scale") and hasattr(m, "zero_point") and type(m).__name__ != "Module":
            out.add((float(np.float32(float(m.scale))), int(m.zero_point)))
    for n in qmodel.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverloadPacket) \
                and len(n.args) >= 4 and isinstance(n.args[2], float):
            out.add((float(np.float32(n.args[2])), int(n.args[3])))
    return out


def _graph_index(model):
    import onnx.numpy_helper as nh

    inits = {i.name: nh.to_array(i) for i in model.graph.initializer}
    producer = {o: node for node in model.graph.node for o in node.output}
    return inits, producer


def test_export_carries_fxquant_qparams(cnn: tuple[nn.Module, torch.Tensor], tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    qmodel, example = cnn
    path = tmp_path / "cnn.onnx"
    returned = fxquant.export_onnx(qmodel, path, (example,))
    model = onnx.load(str(path))
    assert model == returned
    onnx.checker.check_model(model)
    inits, _ = _graph_index(model)
    quantizes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    # averages are written in integer units (scale 1, even zero point; the native integers,
    # see test_averages_round_like_the_native_kernel): the global average pool here
    units = [n for n in quantizes if float(inits[n.input[1]]) == 1.0]
    assert [n.name for n in units] == ["adaptive_avg_pool2d_1_QuantizeLinear"]
    assert int(inits[units[0].input[2]]) % 2 == 0
    got = {(float(inits[n.input[1]]), int(inits[n.input[2]])) for n in quantizes
           if n not in units}
    want = _model_qparams(qmodel)
    assert got == want, (got ^ want)
    # int8 weights and their scales are the converted modules' own, per channel on axis 0
    dq_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                  and inits.get(n.input[0], np.zeros(0)).dtype == np.int8]
    modules = [m for m in qmodel.modules() if hasattr(m, "_packed_params")]
    assert len(dq_weights) == len(modules) == 5
    for m in modules:
        w = m.weight()
        match = [n for n in dq_weights if inits[n.input[0]].shape == tuple(w.shape)
                 and np.array_equal(inits[n.input[0]], w.int_repr().numpy())]
        assert len(match) == 1, type(m).__name__
        axis = next(a.i for a in match[0].attribute if a.name == "axis")
        assert axis == w.q_per_channel_axis() == 0
        np.testing.assert_array_equal(inits[match[0].input[1]],
                                      w.q_per_channel_scales().float().numpy())


@pytest.mark.parametrize("reduce_range", [True, False], ids=["7bit", "8bit"])
def test_relu6_is_a_clip_on_the_conv_output(reduce_range: bool, tmp_path) -> None:
    """ReLU6 after a conv, exported: with 7-bit activations (reduce_range headroom) the conv's
    uint8 output is clipped by a Clip at [zp, zp + 6/scale]; with 8-bit ones the bound is in
    the output qparams (the QuantizeLinear saturates at or below 6) and no bounded Clip is
    needed. Both ranges are pinned, so both are checked on every CPU."""
    onnx = pytest.importorskip("onnx")
    qmodel, example = _convert(SmallCNN(), (2, 3, 16, 16),
                               fxquant.get_default_qconfig_mapping("x86", reduce_range=reduce_range))
    # natively the int8 output of conv2 is clipped: a relu6 node on it, the clamping conv, or
    # (8-bit) a fused ReLU whose output range ends at 6
    clamps = [n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == "relu6"]
    top = qmodel.conv2.scale * (255 - qmodel.conv2.zero_point)
    assert getattr(qmodel.conv2, "clamp_max", None) == 6.0 or (
        clamps and clamps[0].args[0].target == "conv2") or (
        not reduce_range and top <= 6.0 + qmodel.conv2.scale / 2), qmodel.code
    model = fxquant.export_onnx(qmodel, tmp_path / "cnn.onnx", (example,))
    inits, producer = _graph_index(model)
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    # a fused ReLU whose output zero point is above 0 is a Clip at the zero point on the
    # conv's uint8 output too (a float Relu before the Q would keep ORT from fusing the conv)
    for relu in (n for n in clips if len(n.input) < 3 or not n.input[2]):
        q = producer[relu.input[0]]
        assert q.op_type == "QuantizeLinear" and producer[q.input[0]].op_type == "Conv"
        assert int(inits[relu.input[1]]) == int(inits[q.input[2]]) > 0
    bounded = [n for n in clips if len(n.input) > 2 and n.input[2]]
    if not reduce_range:
        assert bounded == []
        return
    assert len(bounded) == 1
    clip = bounded[0]
    q = producer[clip.input[0]]
    assert q.op_type == "QuantizeLinear"  # the conv's own output quantization, then the Clip
    assert producer[q.input[0]].op_type == "Conv"
    scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
    assert (scale, zp) == (float(np.float32(qmodel.conv2.scale)), qmodel.conv2.zero_point)
    lo, hi = inits[clip.input[1]], inits[clip.input[2]]
    assert lo.dtype == hi.dtype == np.uint8  # a Clip on the integers
    assert int(lo) == zp and int(hi) == min(255, zp + round(6.0 / scale))


def test_unsupported_op_names_node_module_and_line(tmp_path) -> None:
    pytest.importorskip("onnx")

    class Inner(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(x, dim=1)  # kept float; no ONNX form in the exporter

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(self.fc(x))

    qmodel, example = _convert(Outer(), (2, 8), fxquant.get_default_qconfig_mapping("x86"))
    with pytest.raises(OnnxExportError) as info:
        fxquant.export_onnx(qmodel, tmp_path / "m.onnx", (example,))
    msg = str(info.value)
    assert "cumsum" in msg and "module: inner" in msg, msg
    assert "test_onnx_engines.py" in msg and "torch.cumsum(x, dim=1)" in msg, msg
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_a_prepared_model(tmp_path) -> None:
    pytest.importorskip("onnx")
    x = torch.randn(2, 8)
    prepared = fxquant.prepare_fx(nn.Sequential(nn.Linear(8, 8)).eval(),
                                  fxquant.get_default_qconfig_mapping("x86"), (x,))
    with pytest.raises(fxquant.FxQuantError, match="prepared, not converted"):
        fxquant.export_onnx(prepared, tmp_path / "m.onnx", (x,))


@pytest.mark.parametrize("backend,missing,extra", [
    ("onnxruntime", "onnxruntime", "fxquant[onnx]"),
    ("onnxruntime", "onnx", "fxquant[onnx]"),
    ("openvino", "openvino", "fxquant[openvino]"),
])
def test_engine_unavailable_names_the_extra(backend: str, missing: str, extra: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` raises ImportError
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(EngineUnavailable, match=extra.replace("[", r"\[")):
        fxquant.compile(model, (torch.randn(1, 4),), backend=backend)


def test_export_unavailable_without_onnx(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(EngineUnavailable, match=r"fxquant\[onnx\]"):
        fxquant.export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx", (torch.randn(1, 2),))


def test_float_bias_option(cnn: tuple[nn.Module, torch.Tensor], tmp_path) -> None:
    """bias="float": the converted modules' float biases as they are, no int32 initializer;
    the default int32 bias has scale input scale x weight scale."""
    pytest.importorskip("onnx")
    qmodel, example = cnn
    model = fxquant.export_onnx(qmodel, tmp_path / "f.onnx", (example,), bias="float")
    inits, _ = _graph_index(model)
    assert not any(a.dtype == np.int32 for a in inits.values())
    for m in (m for m in qmodel.modules() if hasattr(m, "_packed_params")):
        b = m.bias().detach().numpy()
        assert sum(a.shape == b.shape and np.array_equal(a, b) for a in inits.values()) >= 1
    model = fxquant.export_onnx(qmodel, tmp_path / "i.onnx", (example,))
    inits, producer = _graph_index(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bias_dq, x_dq = producer[conv.input[2]], producer[conv.input[0]]
    assert inits[bias_dq.input[0]].dtype == np.int32
    w_scale = inits[producer[conv.input[1]].input[1]]
    np.testing.assert_allclose(inits[bias_dq.input[1]], inits[x_dq.input[1]] * w_scale, rtol=1e-6)
    with pytest.raises(OnnxExportError, match="bias="):
        fxquant.export_onnx(qmodel, tmp_path / "x.onnx", (example,), bias="int8")


class _Averages(nn.Module):
    """One average that keeps its input's qparams, on the quantized input itself (so that
    nothing before it can differ): a global or a 2x2 average pool, or a spatial mean."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "adaptive_avg_pool2d":
            return F.adaptive_avg_pool2d(x, 1)
        if self.op == "avg_pool2d":
            return F.avg_pool2d(x, 2)
        return torch.mean(x, (2, 3), keepdim=True)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("op", ["adaptive_avg_pool2d", "avg_pool2d", "mean"])
@pytest.mark.parametrize("zero_point", [66, 67])
def test_averages_round_like_the_native_kernel(backend: str, op: str, zero_point: int) -> None:
    """Native average pools and means round the mean of the raw integers half to even;
    QuantizeLinear rounds (mean - zero point) half to even: for an odd zero point every tie
    (1 average of 64 integers in 64) came out one step off. The export writes those averages
    with an even zero point on both sides: the integers are the native ones, all of them."""
    pytest.importorskip("onnx")
    pytest.importorskip(backend)
    qmodel, example = _convert(_Averages(op), (2, 3, 16, 16),
                               fxquant.get_default_qconfig_mapping("x86"))
    qparams = qmodel.x_qparams  # the input's; the average shares them
    qparams.zero_point.fill_(zero_point)
    engine = fxquant.compile(qmodel, (example,), backend=backend, threads=1)
    torch.manual_seed(5)
    x = torch.randn((64, 3, 16, 16)) * 2
    native, other = qmodel(x), engine(x)
    scale = float(qparams.scale)
    assert native.numel() >= 192
    steps = torch.round((other - native) / scale).abs()
    assert int(steps.max()) == 0, f"{int((steps > 0).sum())} of {steps.numel()} off"


def _prepared_cnn(residual: bool, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """The test CNN of ``seed``, prepared and calibrated as _convert does (not converted)."""
    return _calibrated(_seeded(lambda: SmallCNN(residual), seed), (2, 3, 16, 16),
                       fxquant.get_default_qconfig_mapping("x86"))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_engine_agreement_pooled_over_seeds(backend: str) -> None:
    """The issue's ">= 99% of elements within one native step" over more than one model: both
    test CNNs under 8 seeds each (weights, head, data), pooled (2560 logits). One seed's 160
    logits are a coarse measure (one logit is 0.6%). Measured over 12 seeds of each CNN:
    OpenVINO 100% on every seed (AVX-512 VNNI, and AVX2 kernels); ONNX Runtime, whose fused
    convs need the bias rounded to int32 accumulator units, 99.4-99.8% pooled, 96.9% on its
    worst seed under AVX2 kernels, 98.1% on VNNI."""
    pytest.importorskip("onnx")
    pytest.importorskip(backend)
    fractions, total = [], 0
    for residual in (True, False):
        for seed in range(8):
            qmodel, example = _convert(_seeded(lambda: SmallCNN(residual), seed), (2, 3, 16, 16),
                                       fxquant.get_default_qconfig_mapping("x86"))
            engine = fxquant.compile(qmodel, (example,), backend=backend, threads=1)
            torch.manual_seed(seed + 100)
            x = torch.randn((32, 3, 16, 16)) * 2
            native, other = qmodel(x), engine(x)
            fractions.append(_agree_within_one_step(native, other, output_scale(qmodel)))
            total += native.numel()
    assert total == 2560  # 160 logits per case: the mean of the fractions is the pooled one
    pooled = sum(fractions) / len(fractions)
    assert pooled >= 0.99, f"{backend}: {pooled:.4f} of {total} within one native step"


def _accumulator_units(qmodel: nn.Module) -> list[tuple[str, np.ndarray]]:
    """(module path, bias / (input scale x weight scale)) of each quantized conv / linear."""
    from fxquant.backends.onnx_export import record

    values = record(qmodel, (torch.randn(2, 3, 16, 16),))
    out = []
    for node in qmodel.graph.nodes:
        mod = qmodel.get_submodule(str(node.target)) if node.op == "call_module" else None
        if mod is None or not hasattr(mod, "_packed_params") or mod.bias() is None:
            continue
        w = mod.weight()
        scales = w.q_per_channel_scales().double().numpy()
        unit = (values[node.args[0]].q.scale * scales).astype(np.float32).astype(np.float64)
        out.append((str(node.target), mod.bias().detach().double().numpy() / unit))
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int32_bias_convert_agrees_with_the_engines_on_every_seed(backend: str) -> None:
    """convert_fx(..., bias="int32") rounds each conv / linear bias to its int32 accumulator
    units at convert: the native model, its reference graph and the engines then add the same
    bias, and the engines agree with the native model on every seed, not only pooled (ONNX
    Runtime with its int32 bias was 96.9-98.1% on its worst seed with the float-bias convert)."""
    pytest.importorskip("onnx")
    pytest.importorskip(backend)
    for residual in (True, False):
        for seed in range(6):
            prepared, example = _prepared_cnn(residual, seed)
            qmodel = fxquant.convert_fx(prepared, bias="int32")
            units = _accumulator_units(qmodel)
            assert len(units) == 5  # four convs and the linear head
            for path, u in units:
                assert np.abs(u - np.rint(u)).max() < 1e-3, path
            engine = fxquant.compile(qmodel, (example,), backend=backend, threads=1)
            torch.manual_seed(seed + 100)
            x = torch.randn((32, 3, 16, 16)) * 2
            frac = _agree_within_one_step(qmodel(x), engine(x), output_scale(qmodel))
            assert frac == 1.0, (residual, seed, frac)


def test_int32_bias_convert_is_recorded_and_checked() -> None:
    """The default convert keeps the float biases (bit-for-bit torch.ao's); "int32" moves each
    by at most half a unit and says so on the node; the reference graph rounds the same way;
    an unknown mode is an error naming the choices."""
    prepared, example = _prepared_cnn(True, 0)
    floats = fxquant.convert_fx(prepared)
    assert any(np.abs(u - np.rint(u)).max() > 0.01 for _, u in _accumulator_units(floats))
    qmodel = fxquant.convert_fx(prepared, bias="int32")
    for (path, u), (_, f) in zip(_accumulator_units(qmodel), _accumulator_units(floats)):
        assert np.abs(u - f).max() <= 0.5 + 1e-3, path
    notes = [d.reason for n in qmodel.graph.nodes for d in qinfo(n).decisions
             if "accumulator units" in d.reason]
    assert len(notes) == 5 and all("at most" in t for t in notes)
    reference = fxquant.convert_to_reference_fx(prepared, bias="int32")
    torch.manual_seed(3)
    x = torch.randn((8, 3, 16, 16)) * 2
    assert _agree_within_one_step(qmodel(x), reference(x), output_scale(qmodel)) >= 0.99
    with pytest.raises(FxQuantError, match="bias"):
        fxquant.convert_fx(prepared, bias="int8")


def test_openvino_auto_bias_is_int32_only_where_exact() -> None:
    """OpenVINO's default bias="auto": float biases (as the native kernels add them) for a
    float-bias convert, the faster int32 form where it is exact (an int32-bias convert)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    prepared, example = _prepared_cnn(True, 0)
    for bias, int32_count in (("float", 0), ("int32", 5)):
        qmodel = fxquant.convert_fx(prepared, bias=bias)
        engine = fxquant.compile(qmodel, (example,), backend="openvino", threads=1)
        inits = {i.name: onnx.numpy_helper.to_array(i)
                 for i in engine.onnx_model(example).graph.initializer}
        assert sum(a.dtype == np.int32 and name.endswith("_bias_int32")
                   for name, a in inits.items()) == int32_count, bias


def test_onnx_engines_example_runs() -> None:
    """examples/onnx_engines.py: export, ONNX Runtime and OpenVINO on an int32-bias convert,
    each engine within one native step on >= 99% of the outputs (every one, measured)."""
    pytest.importorskip("onnx")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "onnx_engines.py"
    spec = importlib.util.spec_from_file_location("onnx_engines_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    agreement = example.run(size=32)
    installed = [b for b, pkg in example.ENGINES.items() if importlib.util.find_spec(pkg)]
    installed += ["openvino fuse_sums"] if "openvino" in installed else []
    assert sorted(agreement) == sorted(installed) and installed
    assert all(f >= 0.99 for f in agreement.values()), agreement


@pytest.mark.parametrize("snippets", ["enable", "disable"])
def test_openvino_snippets_modes_agree(snippets: str, cnn) -> None:
    """OpenVINO's snippets on or off is a speed choice only: both within one native step, and
    "auto" records which it measured faster."""
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    qmodel, example = cnn
    engine = fxquant.compile(qmodel, (example,), backend="openvino", snippets=snippets)
    assert engine.snippets_choices == [{"mode": snippets.upper()}]
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert _agree_within_one_step(qmodel(x), engine(x), output_scale(qmodel)) >= 0.99
    auto = fxquant.compile(qmodel, (example,), backend="openvino")
    (choice,) = auto.snippets_choices
    assert set(choice["ms"]) == {"ENABLE", "DISABLE"}
    assert choice["mode"] == min(choice["ms"], key=choice["ms"].get)
    with pytest.raises(FxQuantError, match="snippets"):
        fxquant.compile(qmodel, (example,), backend="openvino", snippets="off")
