"""fxquant.freeze: a converted model as a frozen TorchScript module that computes exactly what
the GraphModule computes (static int8 on every backend, dynamic qint8 / float16 RNNs), saves and
loads as a TorchScript archive, and refuses what it cannot freeze with a FreezeError naming the
module."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.backends.engine import engine, supported_engines
from fxquant.errors import ExampleInputsError, ModelModeError
from fxquant.freeze import FreezeError, FreezeWarning
from fxquant.qconfig import default_dynamic_qconfig, float16_dynamic_qconfig
from tests.models import build, calibration_batches

STATIC_BACKENDS = [b for b in ("x86", "fbgemm", "onednn", "qnnpack") if b in supported_engines()]


class SmallCNN(nn.Module):
    """conv-bn-relu, conv + residual add, cat, max/avg pool, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.conv2(x) + x)
        z = self.pool(torch.cat([y, self.conv3(x)], 1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def _static(backend: str, factory=SmallCNN, shape=(2, 3, 8, 8), **prepare_kwargs):
    with engine(backend):
        prepared = fxquant.prepare_fx(build(factory), fxquant.get_default_qconfig_mapping(backend),
                                      (torch.randn(*shape),), backend=backend, **prepare_kwargs)
        with torch.no_grad():
            for batch in calibration_batches(shape, n=2):
                prepared(batch)
        return fxquant.convert_fx(prepared)


def _round_trip(frozen: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(frozen, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _packed_engines(model: nn.Module) -> set[str]:
    return {m.packed_engine for m in model.modules() if isinstance(getattr(m, "packed_engine", None), str)}


@pytest.mark.parametrize("backend", STATIC_BACKENDS)
def test_static_cnn_frozen_is_identical(backend):
    qmodel = _static(backend)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen = fxquant.freeze(qmodel, (x,))
    assert isinstance(frozen, torch.jit.ScriptModule)
    assert "prim::PythonOp" not in str(frozen.graph)
    assert "quantized::" in str(frozen.graph)  # the int8 kernels, inlined
    other = (torch.randn(2, 3, 8, 8) * 3, torch.randn(5, 3, 12, 12))  # new values, batch and size
    with engine(backend), torch.no_grad():
        for inp in (x, *other):
            assert torch.equal(frozen(inp), qmodel(inp))
        loaded = _round_trip(frozen)
        mixed = _packed_engines(qmodel) - {backend}
        if not mixed:  # every weight packed for the backend's engine: the file is exact
            assert torch.equal(loaded(x), qmodel(x))
            assert not [w for w in caught if issubclass(w.category, FreezeWarning)]
        else:  # a kernel check packed some weights for another engine (AVX2: qnnpack)
            msgs = [str(w.message) for w in caught if issubclass(w.category, FreezeWarning)]
            assert msgs and "torch.jit.load re-packs" in msgs[0] and mixed.pop() in msgs[0]
            assert loaded(x).shape == qmodel(x).shape


def test_static_trace_and_script_agree_and_leave_qmodel_alone():
    qmodel = _static("x86")
    code = qmodel.code
    x = torch.randn(3, 3, 8, 8)
    with engine("x86"), torch.no_grad():
        want = qmodel(x)
        for method in ("script", "trace"):
            assert torch.equal(fxquant.freeze(qmodel, (x,), method=method)(x), want)
    assert qmodel.code == code and isinstance(qmodel, torch.fx.GraphModule)


def test_optimize_keeps_numerics():
    qmodel = _static("x86")
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreezeWarning)  # dropped when it would change outputs
        frozen = fxquant.freeze(qmodel, x, optimize=True)
    with engine("x86"), torch.no_grad():
        assert torch.equal(frozen(x), qmodel(x))


# ------------------------------------------------------------------------------ dynamic

class LstmNet(nn.Module):
    def __init__(self, bidirectional: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(16 if bidirectional else 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x)
        return self.fc(out) + h.sum(0, keepdim=True).transpose(0, 1).sum(-1, keepdim=True)


class GruNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 8)  # (seq, batch, feature)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.gru(x)
        return self.fc(out), h


class CellNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm_cell = nn.LSTMCell(6, 8)
        self.rnn_cell = nn.RNNCell(8, 8, nonlinearity="relu")
        self.gru_cell = nn.GRUCell(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, c = self.lstm_cell(x)
        return self.gru_cell(self.rnn_cell(h + c))


def _dynamic(model: nn.Module, dtype: torch.dtype, x: torch.Tensor, types=(nn.LSTM, nn.Linear)):
    qconfig = default_dynamic_qconfig if dtype == torch.qint8 else float16_dynamic_qconfig
    torch.manual_seed(0)
    return fxquant.quantize_dynamic_fx(model.eval(), {t: qconfig for t in types}, dtype, (x,))


def _assert_same(a, b) -> None:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u, v), f"max diff {(u - v).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
def test_dynamic_lstm_linear_frozen_is_identical(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    qmodel = _dynamic(LstmNet(bidirectional=dtype == torch.qint8), dtype, x)
    frozen = fxquant.freeze(qmodel, (x,))
    loaded = _round_trip(frozen)
    graph = str(frozen.graph)
    assert "aten::quantized_lstm" in graph and "linear_dynamic" in graph
    with torch.no_grad():
        for inp in (x, torch.randn(4, 9, 6), torch.randn(1, 1, 6)):  # batch and sequence vary
            want = qmodel(inp)
            _assert_same(frozen(inp), want)
            _assert_same(loaded(inp), want)


def test_dynamic_gru_frozen_is_identical():
    torch.manual_seed(0)
    x = torch.randn(7, 2, 6)
    qmodel = _dynamic(GruNet(), torch.qint8, x, (nn.GRU, nn.Linear))
    frozen = fxquant.freeze(qmodel, (x,), method="trace")
    with torch.no_grad():
        for inp in (x, torch.randn(3, 5, 6)):
            _assert_same(frozen(inp), qmodel(inp))
            _assert_same(_round_trip(frozen)(inp), qmodel(inp))


def test_dynamic_cells_frozen_is_identical():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    qmodel = _dynamic(CellNet(), torch.qint8, x, (nn.LSTMCell, nn.RNNCell, nn.GRUCell))
    assert "DynamicQuantizedLSTMCell" in str(qmodel)
    frozen = fxquant.freeze(qmodel, (x,))
    graph = str(frozen.graph)
    assert "quantized_lstm_cell_dynamic" in graph and "quantized_gru_cell_dynamic" in graph
    with torch.no_grad():
        for inp in (x, torch.randn(8, 6)):
            _assert_same(frozen(inp), qmodel(inp))
            _assert_same(_round_trip(frozen)(inp), qmodel(inp))


def test_archive_holds_no_python_and_loads_without_fxquant(tmp_path):
    """The saved file is TorchScript code + tensors: a process that never imports fxquant
    loads and runs it, with the same outputs."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    qmodel = _dynamic(LstmNet(), torch.qint8, x)
    path = tmp_path / "lstm.pt"
    torch.jit.save(fxquant.freeze(qmodel, (x,)), str(path))
    torch.save({"x": x, "y": qmodel(x).detach()}, tmp_path / "io.pt")
    names = zipfile.ZipFile(path).namelist()
    assert not [n for n in names if "fxquant" in n.lower()], names  # no module of ours inside
    script = ("import sys, torch; d = torch.load(sys.argv[2], weights_only=True); "
              "m = torch.jit.load(sys.argv[1]); "
              "assert 'fxquant' not in sys.modules; "
              "assert torch.equal(m(d['x']), d['y']), 'outputs differ'; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------ errors

class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x * 2

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g * 2


class PyFnLeaf(nn.Module):
    """Calls a Python autograd Function: TorchScript can neither compile nor save it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Double.apply(x)


class WithPyFn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.post = PyFnLeaf()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.conv(x))


def test_python_function_is_refused_naming_the_module():
    qmodel = _static("x86", WithPyFn, leaf_modules=[PyFnLeaf])
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(FreezeError) as info:
        fxquant.freeze(qmodel, (x,))
    err = info.value
    assert err.module_path == "post", str(err)
    msg = str(err)
    assert "_Double" in msg and "script:" in msg and "trace:" in msg, msg
    assert "Traceback" not in msg and err.details  # the TorchScript text is kept aside


class FlattenByInt(nn.Module):
    """Reads the batch size as a Python int: a trace bakes it in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(int(x.shape[0]), -1)


class BakesBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.flat = FlattenByInt()
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.conv(x)))


def test_trace_that_bakes_a_shape_is_detected():
    qmodel = _static("x86", BakesBatch, leaf_modules=[FlattenByInt])
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(FreezeError) as info:
        fxquant.freeze(qmodel, (x,), method="trace")
    msg = str(info.value)
    assert "check input 2" in msg and "[3, 3, 8, 8]" in msg and "check_inputs=()" in msg, msg
    with pytest.warns(FreezeWarning, match="read a Python value"):  # fixed shape: frozen, said
        frozen = fxquant.freeze(qmodel, (x,), method="trace", check_inputs=())
    with engine("x86"), torch.no_grad():
        assert torch.equal(frozen(x), qmodel(x))
    # script keeps the shape arithmetic: any batch
    frozen = fxquant.freeze(qmodel, (x,))
    x5 = torch.randn(5, 3, 8, 8)
    with engine("x86"), torch.no_grad():
        assert torch.equal(frozen(x5), qmodel(x5))


def test_script_of_dynamic_lstm_names_the_module_and_auto_traces():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    qmodel = _dynamic(LstmNet(), torch.qint8, x)
    with pytest.raises(FreezeError) as info:
        fxquant.freeze(qmodel, (x,), method="script")
    assert info.value.module_path == "lstm" and "method='trace'" in str(info.value)


def test_bad_arguments():
    qmodel = _static("qnnpack") if "qnnpack" in STATIC_BACKENDS else _static("x86")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(FreezeError, match="unknown method"):
        fxquant.freeze(qmodel, (x,), method="compile")
    with pytest.raises(FreezeError, match="torch.nn.Module"):
        fxquant.freeze(lambda t: t, (x,))
    with pytest.raises(fxquant.FxQuantError, match="tuple"):
        fxquant.freeze(qmodel, {"x": x})
    with pytest.raises(ExampleInputsError, match="fails on example_inputs"):
        fxquant.freeze(qmodel, (torch.randn(2, 3),))  # 2-D: the quantized conv refuses
    qmodel.train()
    with pytest.raises(ModelModeError, match="eval"):
        fxquant.freeze(qmodel, (x,))
    qmodel.eval()
    prepared = fxquant.prepare_fx(build(SmallCNN), fxquant.get_default_qconfig_mapping("x86"),
                                  (x,), backend="x86")
    with pytest.raises(FreezeError, match="prepared, not converted"):
        fxquant.freeze(prepared, (x,))
