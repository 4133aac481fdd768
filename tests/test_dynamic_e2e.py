"""Dynamic and weight-only quantization through the graph pipeline, differential against
torch.ao.quantization.quantize_dynamic (eager) on the same models: outputs identical."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import fxquant
from fxquant.qconfig import (QConfigMapping, default_dynamic_qconfig,
                             float_qparams_weight_only_qconfig,
                             float_qparams_weight_only_qconfig_4bit, per_channel_dynamic_qconfig)
from tests.util import ao_quantization, op_counts


class DemoModel(nn.Module):
    """The seeds' example: Conv2d -> ReLU -> Linear, quantized with qconfig_spec={nn.Linear}."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels=1, out_channels=1, kernel_size=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)))


class RNNModel(nn.Module):
    def __init__(self, kind: str, layers: int, bidirectional: bool, batch_first: bool) -> None:
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(6, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(8 * (2 if bidirectional else 1), 3)
        self.kind = kind

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.rnn(x) if h0 is None else self.rnn(x, h0)
        return self.head(out)


class CellModel(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell
        self.fc = nn.Linear(cell.hidden_size, 2)
        self.returns_tuple = isinstance(cell, nn.LSTMCell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cell(x)
        return self.fc(h[0] if self.returns_tuple else h)


def torch_spec(spec, dtype):
    """torch.ao's qconfig_spec for what fxquant's ``spec`` means: fxquant's qint8 default
    (None or a set of types) uses per-channel weights where the engine's dynamic kernels take
    them (fxquant.backends.dynamic_defaults), torch.ao's default per-tensor ones; so torch.ao
    gets its own per-channel qconfig for the same types there. A dict is used as given by both
    (tests/test_dynamic_per_channel.py compares the per-tensor default of torch.ao too)."""
    from fxquant.api import _DYNAMIC_DEFAULT_TYPES
    from fxquant.backends.dynamic_defaults import dynamic_weights_per_channel

    ao = ao_quantization()
    if dtype != torch.qint8 or isinstance(spec, dict):
        return spec
    if not dynamic_weights_per_channel(torch.backends.quantized.engine).per_channel:
        return spec
    return {t: ao.per_channel_dynamic_qconfig for t in (spec or _DYNAMIC_DEFAULT_TYPES)}


def _same_as_torch(model: nn.Module, inputs: tuple, spec, dtype) -> torch.nn.Module:
    ao = ao_quantization()
    ours = fxquant.quantize_dynamic_fx(model, spec, dtype, inputs,
                                       backend=torch.backends.quantized.engine)
    theirs = ao.quantize_dynamic(copy.deepcopy(model), torch_spec(spec, dtype), dtype)
    with torch.no_grad():
        a, b = ours(*inputs), theirs(*inputs)
    assert torch.equal(a, b), f"max diff {(a - b).abs().max()}"
    return ours


def test_seeds_demo_model():
    torch.manual_seed(0)
    model = DemoModel().eval()
    x = torch.randn(1, 1, 2, 2)
    ours = _same_as_torch(model, (x,), {nn.Linear}, torch.qint8)
    counts = op_counts(ours)
    assert counts["dynamic.Linear"] == 1
    assert counts["fused.ConvReLU2d"] == 1 and "quantize_per_tensor" not in counts  # float conv


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("layers,bidirectional,batch_first",
                         [(1, False, False), (2, True, True), (3, True, False), (3, False, True)])
def test_rnn_matches_torch(kind, layers, bidirectional, batch_first, dtype):
    torch.manual_seed(layers)
    model = RNNModel(kind, layers, bidirectional, batch_first).eval()
    x = torch.randn(4, 5, 6)
    ours = _same_as_torch(model, (x,), None, dtype)
    counts = op_counts(ours)
    assert counts[f"dynamic.{kind.upper()}"] == 1 and counts["dynamic.Linear"] == 1


def test_rnn_with_initial_state():
    torch.manual_seed(1)
    model = RNNModel("gru", 2, True, True).eval()
    x, h0 = torch.randn(3, 5, 6), torch.randn(4, 3, 8)
    _same_as_torch(model, (x, h0), None, torch.qint8)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
@pytest.mark.parametrize("cell", [nn.LSTMCell(6, 8), nn.GRUCell(6, 8), nn.RNNCell(6, 8),
                                  nn.RNNCell(6, 8, nonlinearity="relu")],
                         ids=["lstm_cell", "gru_cell", "rnn_tanh", "rnn_relu"])
def test_cells_match_torch(cell, dtype):
    torch.manual_seed(2)
    model = CellModel(copy.deepcopy(cell)).eval()
    _same_as_torch(model, (torch.randn(3, 6),), None, dtype)


def test_per_channel_linear_and_linear_relu_fused():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(5, 16)
    ours = fxquant.quantize_dynamic_fx(model, {nn.Linear: per_channel_dynamic_qconfig},
                                       torch.qint8, (x,))
    counts = op_counts(ours)
    assert counts["dynamic.LinearReLU"] == 1 and counts["dynamic.Linear"] == 1
    ao = ao_quantization()
    theirs = ao.quantize_dynamic(copy.deepcopy(model), {nn.Linear: ao.per_channel_dynamic_qconfig})
    # torch.ao does not fuse Linear+ReLU in eager quantize_dynamic: same weights, the ReLU is
    # applied after the (float) output, so results agree to float rounding.
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_prepare_convert_with_dynamic_mapping():
    torch.manual_seed(4)
    model = RNNModel("lstm", 2, False, True).eval()
    x = torch.randn(2, 5, 6)
    mapping = QConfigMapping().set_object_type(nn.LSTM, default_dynamic_qconfig) \
        .set_object_type(nn.Linear, default_dynamic_qconfig)
    prepared = fxquant.prepare_fx(model, mapping, (x,))
    assert not any(n.startswith("activation_post_process") for n, _ in prepared.named_modules())
    quantized = fxquant.convert_fx(prepared)  # no calibration needed
    per_tensor = {nn.LSTM: default_dynamic_qconfig, nn.Linear: default_dynamic_qconfig}
    expected = fxquant.quantize_dynamic_fx(model, per_tensor, torch.qint8, (x,))
    assert torch.equal(quantized(x), expected(x))


@pytest.mark.parametrize("qconfig,dtype", [(float_qparams_weight_only_qconfig, torch.quint8),
                                           (float_qparams_weight_only_qconfig_4bit, torch.quint4x2)])
def test_embedding_weight_only(qconfig, dtype):
    torch.manual_seed(5)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.bag = nn.EmbeddingBag(50, 16, mode="sum")
            self.fc = nn.Linear(16, 2)

        def forward(self, idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(idx).mean(1) + self.bag(idx.flatten(), offsets))

    model = M().eval()
    idx, offsets = torch.randint(0, 50, (4, 3)), torch.tensor([0, 3, 6, 9])
    spec = {nn.Embedding: qconfig, nn.EmbeddingBag: qconfig, nn.Linear: default_dynamic_qconfig}
    ours = fxquant.quantize_dynamic_fx(model, spec, torch.qint8, (idx, offsets))
    counts = op_counts(ours)
    assert counts["embedding.Embedding"] == 1 and counts["embedding.EmbeddingBag"] == 1
    if dtype == torch.quint4x2:
        # torch.ao's eager 4-bit EmbeddingBag.from_float is not a usable oracle here (its output
        # has the wrong shape); the module itself is compared bit for bit with torch.ao's in
        # tests/nn/test_embedding.py. Here: close to float.
        from fxquant.measure import sqnr_db

        assert sqnr_db(model(idx, offsets), ours(idx, offsets)) > 15  # 16 levels: ~20 dB
        return
    ao = ao_quantization()
    theirs = copy.deepcopy(model)
    theirs.emb = _ao_embedding(ao, model.emb, dtype)
    theirs.bag = _ao_embedding(ao, model.bag, dtype)
    theirs.fc = ao.quantize_dynamic(nn.Sequential(model.fc), {nn.Linear})[0]
    assert torch.equal(ours(idx, offsets), theirs(idx, offsets))


def _ao_qconfig(ao, dtype):
    return ao.float_qparams_weight_only_qconfig if dtype == torch.quint8 \
        else ao.float_qparams_weight_only_qconfig_4bit


def _ao_embedding(ao, float_module, dtype):
    import torch.ao.nn.quantized as nnq

    m = copy.deepcopy(float_module)
    m.qconfig = _ao_qconfig(ao, dtype)
    cls = nnq.Embedding if isinstance(m, nn.Embedding) and not isinstance(m, nn.EmbeddingBag) \
        else nnq.EmbeddingBag
    return cls.from_float(m)


class LSTMOnly(RNNModel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # no optional state: scriptable
        out, _ = self.rnn(x)
        return self.head(out)


def test_dynamic_models_serialize():
    torch.manual_seed(6)
    model = LSTMOnly("lstm", 2, True, True).eval()
    x = torch.randn(2, 5, 6)
    ours = fxquant.quantize_dynamic_fx(model, None, torch.qint8, (x,))
    expected = ours(x)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), expected)
    assert torch.equal(torch.jit.script(ours)(x), expected)
    fresh = fxquant.quantize_dynamic_fx(LSTMOnly("lstm", 2, True, True).eval(), None,
                                        torch.qint8, (x,))
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh(x), expected)


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(fxquant.FxQuantError, match="qint8 or torch.float16"):
        fxquant.quantize_dynamic_fx(DemoModel(), None, torch.quint8)
