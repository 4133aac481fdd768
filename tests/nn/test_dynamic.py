"""fxquant.nn.dynamic against torch.ao.quantization.quantize_dynamic on the same float modules.

Outputs are compared with torch.equal: same qparams, same packing, same kernels → same bits.
"""
import copy
import io
import itertools
from typing import Any, Callable, List, Optional

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_leaves

from fxquant.nn import dynamic as D

tq = pytest.importorskip("torch.ao.quantization")
from torch.ao.nn import intrinsic as nni  # noqa: E402  (oracle only)
from torch.ao.quantization import observer as ao_obs  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*"),
    pytest.mark.filterwarnings("ignore:.*qnnpack incorrectly ignores reduce_range.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    # torch's own code: fx.GraphModule.__init__ under torch.jit.script, and quantized-tensor loading
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
]

SUPPORTED = torch.backends.quantized.supported_engines
INT8_ENGINES = [e for e in ("x86", "fbgemm", "qnnpack") if e in SUPPORTED]
FP16_ENGINES = [e for e in ("x86", "fbgemm") if e in SUPPORTED]
PER_CHANNEL = ao_obs.PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                        qscheme=torch.per_channel_symmetric)
FP16_PLACEHOLDER = ao_obs.PlaceholderObserver.with_args(dtype=torch.float16)


@pytest.fixture
def engine_guard():
    before = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = before


def use_engine(engine: str) -> None:
    torch.backends.quantized.engine = engine


def ao_dynamic(mod: nn.Module, dtype: torch.dtype, weight: Optional[Callable] = None) -> nn.Module:
    """torch.ao's dynamic module for ``mod`` (the oracle)."""
    if weight is None:
        spec: Any = {type(mod)}
    else:
        act = ao_obs.PlaceholderObserver.with_args(dtype=torch.float16, is_dynamic=True) \
            if dtype == torch.float16 else ao_obs.default_dynamic_quant_observer
        spec = {type(mod): tq.QConfig(activation=act, weight=weight)}
    return tq.quantize_dynamic(nn.Sequential(copy.deepcopy(mod)), spec, dtype=dtype)[0]


def assert_same(a: Any, b: Any) -> None:
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb) and len(la) > 0
    for x, y in zip(la, lb):
        assert x.shape == y.shape
        assert torch.equal(x, y), (x - y).abs().max()


def one_module_graph(mod: nn.Module, n_inputs: int) -> fx.GraphModule:
    """A GraphModule whose only op calls ``mod`` (built by hand, so ``mod`` is a leaf)."""
    root = nn.Module()
    root.m = mod
    g = fx.Graph()
    args = [g.placeholder(f"x{i}") for i in range(n_inputs)]
    g.output(g.call_module("m", tuple(args)))
    return fx.GraphModule(root, g)


def save_load(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------------------------------------
# Linear / LinearReLU
# ------------------------------------------------------------------------------------------

LINEAR_CASES = ([(e, "per_tensor") for e in INT8_ENGINES]
                + [(e, "per_channel") for e in INT8_ENGINES]
                + [(e, "fp16") for e in FP16_ENGINES])


def _linear_config(kind: str):
    if kind == "per_tensor":
        return torch.qint8, None, None
    if kind == "per_channel":
        return torch.qint8, PER_CHANNEL, PER_CHANNEL
    return torch.float16, None, FP16_PLACEHOLDER


@pytest.mark.parametrize("engine,kind", LINEAR_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_identical_to_torch_ao(engine_guard, engine, kind, bias):
    use_engine(engine)
    torch.manual_seed(0)
    fm = nn.Linear(7, 5, bias=bias)
    dtype, ours_obs, ao_weight = _linear_config(kind)
    ours = D.Linear.from_float(fm, ours_obs, dtype=dtype)
    ref = ao_dynamic(fm, dtype, ao_weight)
    for x in (torch.randn(4, 7), torch.randn(2, 3, 7) * 5):
        assert_same(ours(x), ref(x))
    if dtype == torch.qint8:
        assert torch.equal(ours.weight().int_repr(), ref.weight().int_repr())
    assert (ours.bias() is None) == (not bias)
    assert ours.engine == engine


@pytest.mark.parametrize("engine,kind", LINEAR_CASES)
def test_linear_relu_identical_to_torch_ao(engine_guard, engine, kind):
    use_engine(engine)
    torch.manual_seed(1)
    lin = nn.Linear(6, 8)
    dtype, ours_obs, ao_weight = _linear_config(kind)
    ao_weight = ao_weight or ao_obs.default_weight_observer
    act = ao_obs.PlaceholderObserver.with_args(dtype=torch.float16, is_dynamic=True) \
        if dtype == torch.float16 else ao_obs.default_dynamic_quant_observer
    fused = nn.Sequential(nni.LinearReLU(copy.deepcopy(lin), nn.ReLU()))
    ref = tq.quantize_dynamic(fused, {nni.LinearReLU: tq.QConfig(activation=act, weight=ao_weight)},
                              dtype=dtype)[0]
    x = torch.randn(5, 6) * 3
    from_pair = D.LinearReLU.from_float(nn.Sequential(lin, nn.ReLU()), ours_obs, dtype=dtype)
    from_linear = D.LinearReLU.from_float(lin, ours_obs, dtype=dtype)
    assert_same(from_pair(x), ref(x))
    assert_same(from_linear(x), ref(x))
    assert (from_pair(x) >= 0).all() and (from_pair(x) == 0).any()


def test_linear_weight_observer_quant_range_is_clamped_like_torch_ao():
    torch.manual_seed(2)
    fm = nn.Linear(9, 4)
    obs = ao_obs.weight_observer_range_neg_127_to_127
    ours = D.Linear.from_float(fm, obs)
    ref = ao_dynamic(fm, torch.qint8, obs)
    assert ours.weight().int_repr().min() >= -127
    assert torch.equal(ours.weight().int_repr(), ref.weight().int_repr())
    x = torch.randn(3, 9)
    assert_same(ours(x), ref(x))


def test_default_weight_observer_is_torch_default():
    torch.manual_seed(3)
    fm = nn.Linear(6, 3)
    a = D.Linear.from_float(fm)
    b = D.Linear.from_float(fm, ao_obs.default_weight_observer)
    assert a.weight().q_scale() == b.weight().q_scale()
    assert torch.equal(a.weight().int_repr(), b.weight().int_repr())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=24),
       st.sampled_from(["qint8", "quint8", "quint4x2"]))
def test_private_default_observer_matches_torch(values, which):
    x = torch.tensor(values, dtype=torch.float32).reshape(1, -1).repeat(2, 1)
    x[1] = x[1] * 0.5 - 1.0
    dtype = getattr(torch, which)
    ours = D._default_weight_observer_factory(dtype)()
    ref = {"qint8": ao_obs.default_weight_observer,
           "quint8": ao_obs.default_float_qparams_observer,
           "quint4x2": ao_obs.default_float_qparams_observer_4bit}[which]()
    ours(x)
    ref(x)
    (s1, z1), (s2, z2) = ours.calculate_qparams(), ref.calculate_qparams()
    assert torch.equal(s1.reshape(-1), s2.reshape(-1))
    assert torch.equal(z1.reshape(-1).to(z2.dtype), z2.reshape(-1))


# ------------------------------------------------------------------------------------------
# LSTM / GRU
# ------------------------------------------------------------------------------------------

RNN_GRID = list(itertools.product([1, 2, 3], [False, True], [False, True], [False, True]))


def _rnn_case(cls: type, layers: int, bidir: bool, batch_first: bool, with_state: bool):
    torch.manual_seed(layers * 8 + bidir * 4 + batch_first * 2 + with_state)
    float_cls = nn.LSTM if cls is D.LSTM else nn.GRU
    fm = float_cls(5, 4, num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    seq, batch = 6, 3
    x = torch.randn(batch, seq, 5) if batch_first else torch.randn(seq, batch, 5)
    hx = None
    if with_state:
        h = torch.randn(layers * (2 if bidir else 1), batch, 4)
        hx = (h, torch.randn_like(h)) if cls is D.LSTM else h
    return fm, x, hx


def _rnn_engine_dtype() -> List[tuple]:
    return [(e, torch.qint8) for e in INT8_ENGINES] + [(e, torch.float16) for e in FP16_ENGINES]


@pytest.mark.parametrize("cls", [D.LSTM, D.GRU], ids=["LSTM", "GRU"])
@pytest.mark.parametrize("engine,dtype", _rnn_engine_dtype())
@pytest.mark.parametrize("layers,bidir,batch_first,with_state", RNN_GRID)
def test_rnn_identical_to_torch_ao(engine_guard, cls, engine, dtype, layers, bidir, batch_first,
                                   with_state):
    use_engine(engine)
    fm, x, hx = _rnn_case(cls, layers, bidir, batch_first, with_state)
    ours = cls.from_float(fm, dtype=dtype)
    ref = ao_dynamic(fm, dtype)
    out = ours(x, hx)
    assert_same(out, ref(x, hx))
    assert out[0].shape[-1] == 4 * (2 if bidir else 1)


@pytest.mark.parametrize("cls", [D.LSTM, D.GRU], ids=["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
@pytest.mark.parametrize("with_state", [False, True])
def test_rnn_packed_sequence_identical_to_torch_ao(cls, dtype, with_state):
    fm, x, hx = _rnn_case(cls, 2, True, False, with_state)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
    ours = cls.from_float(fm, dtype=dtype)
    ref = ao_dynamic(fm, dtype)
    out = ours(packed, hx)
    assert type(out[0]).__name__ == "PackedSequence"
    assert_same(out, ref(packed, hx))


def test_rnn_per_channel_observer_identical_to_torch_ao():
    fm, x, hx = _rnn_case(D.LSTM, 2, True, False, True)
    ours = D.LSTM.from_float(fm, PER_CHANNEL)
    ref = ao_dynamic(fm, torch.qint8, PER_CHANNEL)
    assert_same(ours(x, hx), ref(x, hx))
    assert ours.get_weight_bias()["weight_hh_l1_reverse"].qscheme() == torch.per_channel_affine


@pytest.mark.parametrize("float_cls,cls", [(nn.LSTM, D.LSTM), (nn.GRU, D.GRU)])
def test_rnn_without_bias_equals_zero_bias(float_cls, cls):
    """torch.ao refuses bias=False; ours packs no bias, which must equal packing zero biases."""
    torch.manual_seed(5)
    no_bias = float_cls(5, 4, num_layers=2, bias=False)
    zero_bias = float_cls(5, 4, num_layers=2)
    with torch.no_grad():
        for name, p in zero_bias.named_parameters():
            p.copy_(getattr(no_bias, name) if name.startswith("weight") else torch.zeros_like(p))
    x = torch.randn(6, 3, 5)
    ours = cls.from_float(no_bias)
    assert "bias_ih_l0" not in ours.state_dict()
    assert_same(ours(x), ao_dynamic(zero_bias, torch.qint8)(x))


# ------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------

CELLS = [
    (nn.LSTMCell, D.LSTMCell, {}),
    (nn.GRUCell, D.GRUCell, {}),
    (nn.RNNCell, D.RNNCell, {"nonlinearity": "tanh"}),
    (nn.RNNCell, D.RNNCell, {"nonlinearity": "relu"}),
]
CELL_IDS = ["LSTMCell", "GRUCell", "RNNCell-tanh", "RNNCell-relu"]


def _cell_case(float_cls: type, kwargs: dict, with_state: bool):
    torch.manual_seed(7)
    fm = float_cls(5, 4, **kwargs)
    x = torch.randn(3, 5)
    hx = None
    if with_state:
        h = torch.randn(3, 4)
        hx = (h, torch.randn(3, 4)) if float_cls is nn.LSTMCell else h
    return fm, x, hx


@pytest.mark.parametrize("float_cls,cls,kwargs", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("engine,dtype", _rnn_engine_dtype())
@pytest.mark.parametrize("with_state", [False, True])
def test_cell_identical_to_torch_ao(engine_guard, float_cls, cls, kwargs, engine, dtype,
                                    with_state):
    use_engine(engine)
    fm, x, hx = _cell_case(float_cls, kwargs, with_state)
    ours = cls.from_float(fm, dtype=dtype)
    ref = ao_dynamic(fm, dtype)
    assert_same(ours(x, hx), ref(x, hx))
    if kwargs.get("nonlinearity") == "relu":
        assert (ours(x, hx) >= 0).all()


@pytest.mark.parametrize("float_cls,cls,kwargs", CELLS, ids=CELL_IDS)
def test_cell_without_bias_equals_zero_bias(float_cls, cls, kwargs):
    torch.manual_seed(8)
    no_bias = float_cls(5, 4, bias=False, **kwargs)
    zero_bias = float_cls(5, 4, **kwargs)
    with torch.no_grad():
        zero_bias.weight_ih.copy_(no_bias.weight_ih)
        zero_bias.weight_hh.copy_(no_bias.weight_hh)
        zero_bias.bias_ih.zero_()
        zero_bias.bias_hh.zero_()
    x = torch.randn(3, 5)
    assert_same(cls.from_float(no_bias)(x), ao_dynamic(zero_bias, torch.qint8)(x))


# ------------------------------------------------------------------------------------------
# repr, state_dict, pickling, TorchScript, GraphModule
# ------------------------------------------------------------------------------------------

def _module_specs() -> dict:
    """name -> (float module, quantized class, constructor kwargs, example input shape)."""
    specs = {}
    for dtype, tag in ((torch.qint8, "qint8"), (torch.float16, "fp16")):
        specs.update({
            f"Linear-{tag}": (lambda: nn.Linear(5, 4), D.Linear, {}, (3, 5)),
            f"LinearReLU-{tag}": (lambda: nn.Linear(5, 4), D.LinearReLU, {}, (3, 5)),
            f"LSTM-{tag}": (lambda: nn.LSTM(5, 4, 2, bidirectional=True), D.LSTM,
                            {"num_layers": 2, "bidirectional": True}, (6, 3, 5)),
            f"GRU-{tag}": (lambda: nn.GRU(5, 4, 2, batch_first=True), D.GRU,
                           {"num_layers": 2, "batch_first": True}, (3, 6, 5)),
            f"LSTMCell-{tag}": (lambda: nn.LSTMCell(5, 4), D.LSTMCell, {}, (3, 5)),
            f"GRUCell-{tag}": (lambda: nn.GRUCell(5, 4), D.GRUCell, {}, (3, 5)),
            f"RNNCell-{tag}": (lambda: nn.RNNCell(5, 4, nonlinearity="relu"), D.RNNCell,
                               {"nonlinearity": "relu"}, (3, 5)),
        })
    return specs


SPECS = _module_specs()
ALL_IDS = list(SPECS)


def build(name: str):
    """(quantized module, example inputs, fresh same-shape constructor) for ``name``."""
    make_float, cls, kwargs, shape = SPECS[name]
    dtype = torch.qint8 if name.endswith("qint8") else torch.float16
    torch.manual_seed(9)
    mod = cls.from_float(make_float(), dtype=dtype)
    return mod, (torch.randn(shape),), lambda: cls(5, 4, dtype=dtype, **kwargs)


@pytest.mark.parametrize("name", ALL_IDS)
def test_state_dict_round_trip(name):
    mod, inputs, fresh = build(name)
    new = fresh()
    before = new(*inputs)
    result = new.load_state_dict(mod.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert_same(new(*inputs), mod(*inputs))
    assert not torch.equal(tree_leaves(before)[0], tree_leaves(new(*inputs))[0])
    sd = mod.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    if name.endswith("qint8"):
        assert any(v.is_quantized for v in sd.values())


@pytest.mark.parametrize("name", ["Linear-qint8", "LSTM-qint8", "GRU-fp16", "LSTMCell-qint8"])
def test_state_dict_survives_weights_only_load(name):
    mod, inputs, fresh = build(name)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    new = fresh()
    new.load_state_dict(sd)
    assert_same(new(*inputs), mod(*inputs))


@pytest.mark.parametrize("name", ALL_IDS)
def test_save_load_module_and_graph_module(name):
    mod, inputs, _ = build(name)
    assert_same(save_load(mod)(*inputs), mod(*inputs))
    assert_same(copy.deepcopy(mod)(*inputs), mod(*inputs))
    gm = one_module_graph(mod, len(inputs))
    assert_same(gm(*inputs), mod(*inputs))
    assert_same(save_load(gm)(*inputs), mod(*inputs))


@pytest.mark.parametrize("name", ALL_IDS)
def test_torchscript_module_and_graph_module(name, tmp_path):
    mod, inputs, _ = build(name)
    scripted = torch.jit.script(mod)
    assert_same(scripted(*inputs), mod(*inputs))
    gm_scripted = torch.jit.script(one_module_graph(mod, len(inputs)))
    assert_same(gm_scripted(*inputs), mod(*inputs))
    torch.jit.save(gm_scripted, str(tmp_path / "m.pt"))
    assert_same(torch.jit.load(str(tmp_path / "m.pt"))(*inputs), mod(*inputs))


def test_symbolic_trace_with_leaf_module():
    class Wrapper(nn.Module):
        def __init__(self, lstm: nn.Module) -> None:
            super().__init__()
            self.lstm = lstm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return out.relu()

    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, D.LSTM) or super().is_leaf_module(m, qualname)

    wrapper = Wrapper(D.LSTM.from_float(nn.LSTM(5, 4)))
    gm = fx.GraphModule(wrapper, LeafTracer().trace(wrapper))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lstm"]
    x = torch.randn(6, 2, 5)
    assert_same(gm(x), wrapper(x))
    assert_same(save_load(gm)(x), wrapper(x))
    assert_same(torch.jit.script(gm)(x), wrapper(x))


def test_reprs_name_sizes_dtype_and_qscheme():
    lin = D.Linear.from_float(nn.Linear(5, 4), PER_CHANNEL)
    assert repr(lin) == ("DynamicQuantizedLinear(in_features=5, out_features=4, bias=True, "
                         "dtype=torch.qint8, qscheme=torch.per_channel_affine)")
    lstm = D.LSTM.from_float(nn.LSTM(5, 4, 2, bidirectional=True, batch_first=True))
    assert repr(lstm) == ("DynamicQuantizedLSTM(5, 4, num_layers=2, batch_first=True, "
                          "bidirectional=True, dtype=torch.qint8, qscheme=torch.per_tensor_affine)")
    gru = D.GRU.from_float(nn.GRU(5, 4), dtype=torch.float16)
    assert repr(gru) == "DynamicQuantizedGRU(5, 4, num_layers=1, dtype=torch.float16)"
    cell = D.RNNCell.from_float(nn.RNNCell(5, 4, bias=False, nonlinearity="relu"))
    assert repr(cell) == ("DynamicQuantizedRNNCell(5, 4, bias=False, dtype=torch.qint8, "
                          "qscheme=torch.per_tensor_affine, nonlinearity=relu)")
    assert "LinearReLU(in_features=5" in repr(D.LinearReLU(5, 4))


# ------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif("qnnpack" not in SUPPORTED, reason="needs the qnnpack engine")
def test_load_repacks_for_current_engine(engine_guard):
    torch.manual_seed(10)
    fm = nn.LSTM(5, 4, 2)
    use_engine(INT8_ENGINES[0])
    sd = D.LSTM.from_float(fm).state_dict()
    use_engine("qnnpack")
    new = D.LSTM(5, 4, 2)
    new.load_state_dict(sd)
    assert new.engine == "qnnpack"
    x = torch.randn(6, 3, 5)
    assert_same(new(x), ao_dynamic(fm, torch.qint8)(x))
    lin = D.Linear.from_float(nn.Linear(5, 4))
    use_engine(INT8_ENGINES[0])
    assert lin.engine == "qnnpack" and save_load(lin).engine == INT8_ENGINES[0]
    lin.repack()
    assert lin.engine == INT8_ENGINES[0]


@pytest.mark.skipif("qnnpack" not in SUPPORTED, reason="needs the qnnpack engine")
def test_fp16_on_qnnpack_says_what_to_do(engine_guard):
    use_engine("qnnpack")
    with pytest.raises(RuntimeError, match="fbgemm/x86"):
        D.Linear.from_float(nn.Linear(3, 2), dtype=torch.float16)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="pass dtype=torch.qint8"):
        D.Linear.from_float(nn.Linear(3, 2), PER_CHANNEL, dtype=torch.float16)
    with pytest.raises(ValueError, match="supports dtype"):
        D.Linear(3, 2, dtype=torch.quint8)
    with pytest.raises(TypeError, match="expects nn.Linear"):
        D.Linear.from_float(nn.Conv1d(3, 2, 1))
    with pytest.raises(TypeError, match="expects nn.LSTM"):
        D.LSTM.from_float(nn.GRU(3, 2))
    with pytest.raises(ValueError, match="proj_size"):
        D.LSTM.from_float(nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(ValueError, match="per-tensor or per-channel"):
        D.Linear.from_float(nn.Linear(3, 2), ao_obs.PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_affine_float_qparams))
    with pytest.raises(ValueError, match="nonlinearity"):
        D.RNNCell(3, 2, nonlinearity="gelu")
    with pytest.raises(RuntimeError, match="input_size=3"):
        D.LSTM(3, 2)(torch.randn(4, 1, 5))
    with pytest.raises(RuntimeError, match=r"h0 must have size \[1, 1, 2\]"):
        D.GRU(3, 2)(torch.randn(4, 1, 3), torch.randn(1, 2, 2))
    with pytest.raises(RuntimeError, match="unsqueeze"):
        D.GRUCell(3, 2)(torch.randn(3))


def test_load_state_dict_with_wrong_dtype_or_keys_explains():
    qint8_state = D.Linear.from_float(nn.Linear(3, 2)).state_dict()
    with pytest.raises(RuntimeError, match="build it with the dtype"):
        D.Linear(3, 2, dtype=torch.float16).load_state_dict(qint8_state)
    with pytest.raises(RuntimeError, match="Missing key"):
        D.Linear(3, 2).load_state_dict({"weight": qint8_state["weight"]})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        D.Linear(3, 2, bias=False).load_state_dict(qint8_state)
    result = D.LSTM(3, 2).load_state_dict({}, strict=False)
    assert "weight_ih_l0" in result.missing_keys
