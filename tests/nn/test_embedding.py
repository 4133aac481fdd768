"""fxquant.nn.embedding against torch.ao's quantized Embedding / EmbeddingBag on the same tables.

Sums are compared with torch.equal (same qparams, same packing, same kernel). torch.ao's bag
kernels always sum, so ``mode="mean"``/``"max"`` are checked against torch.ao's sums / rows
(exactly) and against the float module (within the quantization error).
"""
import copy
import io
from typing import Any, Optional

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.nn import embedding as E

tq = pytest.importorskip("torch.ao.quantization")
import torch.ao.nn.quantized as ao_nnq  # noqa: E402  (oracle only)
from torch.ao.quantization import observer as ao_obs  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
]

SUPPORTED = torch.backends.quantized.supported_engines
ENGINES = [e for e in ("x86", "fbgemm", "qnnpack") if e in SUPPORTED]
DTYPES = [torch.quint8, torch.quint4x2]
DTYPE_IDS = ["8bit", "4bit"]
# max |quantized - float| per element: half a step of a row's range (2.5 / 255 or 2.5 / 15 for
# N(0,1) rows of width 8), times the bag size (4 at most here), plus float rounding.
FLOAT_BOUND = {torch.quint8: 4 * 0.5 * 8.0 / 255 + 1e-5, torch.quint4x2: 4 * 0.5 * 8.0 / 15 + 1e-5}

IDX = torch.tensor([1, 2, 3, 4, 5, 2, 7, 0, 9])
OFFSETS = torch.tensor([0, 2, 2, 5])  # bags of 2, 0, 3, 4 entries


@pytest.fixture
def engine_guard():
    before = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = before


def ao_bag(fm: nn.EmbeddingBag, dtype: torch.dtype) -> nn.Module:
    return tq.quantize_dynamic(nn.Sequential(copy.deepcopy(fm)), {nn.EmbeddingBag},
                               dtype=dtype)[0]


def ao_embedding(weight: torch.Tensor) -> nn.Module:
    ref = ao_nnq.Embedding(weight.shape[0], weight.shape[1], dtype=weight.dtype)
    ref.set_weight(weight)
    return ref


def float_bag(n: int = 10, dim: int = 8, **kwargs: Any) -> nn.EmbeddingBag:
    torch.manual_seed(0)
    return nn.EmbeddingBag(n, dim, **kwargs)


def bag_sizes(offsets: torch.Tensor, n: int) -> torch.Tensor:
    return torch.diff(torch.cat([offsets, torch.tensor([n])]))


def save_load(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def one_module_graph(mod: nn.Module, n_inputs: int) -> fx.GraphModule:
    root = nn.Module()
    root.m = mod
    g = fx.Graph()
    args = [g.placeholder(f"x{i}") for i in range(n_inputs)]
    g.output(g.call_module("m", tuple(args)))
    return fx.GraphModule(root, g)


# ------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weights_identical_to_torch_ao(dtype):
    fm = float_bag(mode="sum")
    ours_mod, ref_mod = E.EmbeddingBag.from_float(fm, dtype=dtype), ao_bag(fm, dtype)
    # keep ref_mod alive: torch's unpacked qparams borrow its packed object's memory
    ours, ref = ours_mod.weight(), ref_mod.weight()
    assert ours.dtype == dtype and ours.qscheme() == torch.per_channel_affine_float_qparams
    assert torch.equal(ours.int_repr(), ref.int_repr())
    assert torch.equal(ours.q_per_channel_scales(), ref.q_per_channel_scales())
    assert torch.equal(ours.q_per_channel_zero_points(), ref.q_per_channel_zero_points())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_read_back_is_exact_for_a_wide_table(dtype):
    torch.manual_seed(3)
    table = torch.randn(300, 16) * torch.logspace(-3, 3, 300).unsqueeze(1) + 7.0
    fm = nn.Embedding(300, 16, _weight=table)
    ours = E.Embedding.from_float(fm, dtype=dtype)
    obs = (ao_obs.default_float_qparams_observer if dtype == torch.quint8
           else ao_obs.default_float_qparams_observer_4bit)()
    obs(table)
    scale, zero_point = obs.calculate_qparams()
    direct = torch.quantize_per_channel(table, scale, zero_point, 0, dtype)
    got = ours.weight()
    assert torch.equal(got.int_repr(), direct.int_repr())
    assert torch.equal(got.q_per_channel_scales(), direct.q_per_channel_scales())
    assert torch.equal(got.q_per_channel_zero_points(), direct.q_per_channel_zero_points())


def test_explicit_observer_factory_is_used():
    fm = float_bag(mode="sum")
    factory = ao_obs.PerChannelMinMaxObserver.with_args(
        dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams, ch_axis=0)
    a = E.EmbeddingBag.from_float(fm, factory)
    b = E.EmbeddingBag.from_float(fm)
    assert torch.equal(a(IDX, OFFSETS), b(IDX, OFFSETS))


# ------------------------------------------------------------------------------------------
# Embedding
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_embedding_identical_to_torch_ao(engine_guard, engine, dtype):
    torch.backends.quantized.engine = engine
    torch.manual_seed(1)
    fm = nn.Embedding(10, 8, padding_idx=0)
    ours = E.Embedding.from_float(fm, dtype=dtype)
    if dtype == torch.quint8:
        ref = tq.quantize_dynamic(nn.Sequential(copy.deepcopy(fm)), {nn.Embedding},
                                  dtype=torch.quint8)[0]
        assert torch.equal(ours.weight().int_repr(), ref.weight().int_repr())
    else:  # quantize_dynamic has no default 4-bit nn.Embedding mapping; use torch.ao's module
        ref = ao_embedding(ours.weight())
    idx = torch.tensor([[0, 1, 9], [3, 3, 2]])
    out = ours(idx)
    assert out.shape == (2, 3, 8)
    assert torch.equal(out, ref(idx))
    assert torch.equal(ours(idx.int()), out)
    assert torch.equal(out[0, 0], torch.zeros(8))  # the zero padding row stays exactly zero
    assert (out - fm(idx)).abs().max() <= FLOAT_BOUND[dtype] / 4


# ------------------------------------------------------------------------------------------
# EmbeddingBag
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_bag_sum_identical_to_torch_ao(engine_guard, engine, dtype, include_last_offset,
                                       weighted):
    torch.backends.quantized.engine = engine
    fm = float_bag(mode="sum", include_last_offset=include_last_offset)
    ours, ref = E.EmbeddingBag.from_float(fm, dtype=dtype), ao_bag(fm, dtype)
    offsets = torch.cat([OFFSETS, torch.tensor([IDX.numel()])]) if include_last_offset else OFFSETS
    psw = torch.rand(IDX.numel()) if weighted else None
    out = ours(IDX, offsets, psw)
    assert out.shape == (4, 8)
    assert torch.equal(out, ref(IDX, offsets, per_sample_weights=psw))
    assert torch.equal(out[1], torch.zeros(8))  # empty bag
    assert (out - fm(IDX, offsets, per_sample_weights=psw)).abs().max() <= FLOAT_BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bag_2d_input_identical_to_torch_ao(dtype):
    fm = float_bag(mode="sum")
    ours, ref = E.EmbeddingBag.from_float(fm, dtype=dtype), ao_bag(fm, dtype)
    idx = torch.tensor([[1, 2, 3], [4, 4, 0]])
    assert torch.equal(ours(idx), ref(idx))
    assert torch.equal(ours(idx), ours(idx.reshape(-1), torch.tensor([0, 3])))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_2d_input_with_include_last_offset_keeps_every_row(mode):
    """Float gives one bag per row; torch.ao's kernel call drops the last one (we don't)."""
    fm = float_bag(mode=mode, include_last_offset=True)
    ours = E.EmbeddingBag.from_float(fm)
    idx = torch.tensor([[1, 2], [3, 4], [5, 6]])
    out = ours(idx)
    assert out.shape == fm(idx).shape == (3, 8)
    assert (out - fm(idx)).abs().max() <= FLOAT_BOUND[torch.quint8] / 2
    if mode == "sum":
        ref = ao_bag(fm, torch.quint8)
        assert ref(idx).shape == (2, 8)
        assert torch.equal(out[:2], ref(idx))


def test_weight_and_state_dict_outlive_the_module():
    fm = float_bag(mode="sum")
    expected = E.EmbeddingBag.from_float(fm, dtype=torch.quint4x2)(IDX, OFFSETS)
    weight = E.EmbeddingBag.from_float(fm, dtype=torch.quint4x2).weight()
    state = E.EmbeddingBag.from_float(fm, dtype=torch.quint4x2).state_dict()
    _ = [torch.randn(64) for _ in range(64)]  # reuse freed memory
    new = E.EmbeddingBag(10, 8, dtype=torch.quint4x2)
    new.load_state_dict(state)
    assert torch.equal(new(IDX, OFFSETS), expected)
    new.set_weight(weight)
    assert torch.equal(new(IDX, OFFSETS), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_bag_mean_is_torch_ao_sum_over_bag_size(dtype, include_last_offset):
    fm = float_bag(mode="mean", include_last_offset=include_last_offset)
    ours, ref = E.EmbeddingBag.from_float(fm, dtype=dtype), ao_bag(fm, dtype)
    offsets = torch.cat([OFFSETS, torch.tensor([IDX.numel()])]) if include_last_offset else OFFSETS
    sizes = bag_sizes(OFFSETS, IDX.numel())
    out = ours(IDX, offsets)
    assert torch.equal(out, ref(IDX, offsets) / sizes.clamp(min=1).unsqueeze(1).float())
    assert torch.equal(out[1], torch.zeros(8))
    assert (out - fm(IDX, offsets)).abs().max() <= FLOAT_BOUND[dtype] / 2
    two_bags = torch.tensor([0, 2, 4]) if include_last_offset else torch.tensor([0, 2])
    assert torch.equal(ours(torch.tensor([[1, 2], [3, 9]])),
                       ours(torch.tensor([1, 2, 3, 9]), two_bags))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bag_max_is_max_of_torch_ao_rows(dtype):
    fm = float_bag(mode="max")
    ours = E.EmbeddingBag.from_float(fm, dtype=dtype)
    rows = ao_embedding(ours.weight())(IDX)
    out = ours(IDX, OFFSETS)
    starts, sizes = OFFSETS.tolist(), bag_sizes(OFFSETS, IDX.numel()).tolist()
    for bag, (start, size) in enumerate(zip(starts, sizes)):
        expected = rows[start:start + size].amax(0) if size else torch.zeros(8)
        assert torch.equal(out[bag], expected)
    assert (out - fm(IDX, OFFSETS)).abs().max() <= FLOAT_BOUND[dtype] / 4


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_padding_idx_excluded_like_float(mode):
    fm = float_bag(mode=mode, padding_idx=2)
    ours = E.EmbeddingBag.from_float(fm)
    assert ours.padding_idx == 2
    deq = ours.weight().dequantize()
    out = ours(IDX, OFFSETS)
    # float semantics on the dequantized table: padding entries do not count (rounding only:
    # the kernel computes scale * q + bias, dequantize computes (q - zero_point) * scale)
    expected = F.embedding_bag(IDX, deq, OFFSETS, mode=mode, padding_idx=2)
    assert (out - expected).abs().max() <= 1e-5
    if mode == "sum":  # a zero padding row adds exact zeros: same bits as torch.ao's sum
        assert torch.equal(out, ao_bag(fm, torch.quint8)(IDX, OFFSETS))


def test_bag_padding_idx_with_a_nonzero_padding_row():
    fm = float_bag(mode="mean", padding_idx=-1)
    with torch.no_grad():
        fm.weight[9] = 5.0  # float excludes padding entries whatever the row holds
    ours = E.EmbeddingBag.from_float(fm)
    assert ours.padding_idx == 9
    expected = F.embedding_bag(IDX, ours.weight().dequantize(), OFFSETS, mode="mean",
                               padding_idx=9)
    assert (ours(IDX, OFFSETS) - expected).abs().max() <= 1e-5
    assert (ours(IDX, OFFSETS) - fm(IDX, OFFSETS)).abs().max() <= FLOAT_BOUND[torch.quint8]


def test_bag_padding_with_per_sample_weights_and_2d_input():
    fm = float_bag(mode="sum", padding_idx=0)
    ours = E.EmbeddingBag.from_float(fm)
    idx = torch.tensor([[0, 1, 2], [3, 0, 0]])
    psw = torch.rand(2, 3)
    expected = F.embedding_bag(idx, ours.weight().dequantize(), mode="sum", padding_idx=0,
                               per_sample_weights=psw)
    assert (ours(idx, None, psw) - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------
# repr, state_dict, pickling, TorchScript, GraphModule
# ------------------------------------------------------------------------------------------

def _modules():
    fm_bag = float_bag(mode="mean", include_last_offset=True, padding_idx=1)
    torch.manual_seed(2)
    fm_emb = nn.Embedding(10, 8)
    offsets = torch.cat([OFFSETS, torch.tensor([IDX.numel()])])
    cases = []
    for dtype, tag in zip(DTYPES, DTYPE_IDS):
        cases.append((E.Embedding.from_float(fm_emb, dtype=dtype), (IDX,),
                      lambda d=dtype: E.Embedding(10, 8, dtype=d)))
        cases.append((E.EmbeddingBag.from_float(fm_bag, dtype=dtype), (IDX, offsets),
                      lambda d=dtype: E.EmbeddingBag(10, 8, "mean", True, 1, dtype=d)))
    return cases


CASE_IDS = ["Embedding-8bit", "EmbeddingBag-8bit", "Embedding-4bit", "EmbeddingBag-4bit"]


@pytest.mark.parametrize("case", range(4), ids=CASE_IDS)
def test_state_dict_round_trip(case):
    mod, inputs, fresh = _modules()[case]
    new = fresh()
    assert not torch.equal(new(*inputs), mod(*inputs))
    result = new.load_state_dict(mod.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert list(mod.state_dict()) == ["weight"]
    assert torch.equal(new(*inputs), mod(*inputs))
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    fresh().load_state_dict(torch.load(buf, weights_only=True))


@pytest.mark.parametrize("case", range(4), ids=CASE_IDS)
def test_save_load_module_and_graph_module(case):
    mod, inputs, _ = _modules()[case]
    expected = mod(*inputs)
    assert torch.equal(save_load(mod)(*inputs), expected)
    assert torch.equal(copy.deepcopy(mod)(*inputs), expected)
    gm = one_module_graph(mod, len(inputs))
    assert torch.equal(save_load(gm)(*inputs), expected)


@pytest.mark.parametrize("case", range(4), ids=CASE_IDS)
def test_torchscript_module_and_graph_module(case):
    mod, inputs, _ = _modules()[case]
    expected = mod(*inputs)
    assert torch.equal(torch.jit.script(mod)(*inputs), expected)
    scripted = torch.jit.script(one_module_graph(mod, len(inputs)))
    assert torch.equal(scripted(*inputs), expected)


def _jit_round_trip(mod: nn.Module, n_inputs: int, path: str) -> torch.jit.ScriptModule:
    torch.jit.save(torch.jit.script(one_module_graph(mod, n_inputs)), path)
    return torch.jit.load(path)


@pytest.mark.parametrize("case", [0, 1], ids=CASE_IDS[:2])
def test_torchscript_save_load_8bit(case, tmp_path):
    mod, inputs, _ = _modules()[case]
    loaded = _jit_round_trip(mod, len(inputs), str(tmp_path / "m.pt"))
    assert torch.equal(loaded(*inputs), mod(*inputs))


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="torch cannot reload quint4x2 tensors from a TorchScript archive "
                          "(storage size check); torch.ao's 4-bit modules fail the same way")
@pytest.mark.parametrize("case", [2, 3], ids=CASE_IDS[2:])
def test_torchscript_save_load_4bit_is_a_torch_limitation(case, tmp_path):
    mod, inputs, _ = _modules()[case]
    loaded = _jit_round_trip(mod, len(inputs), str(tmp_path / "m.pt"))
    assert torch.equal(loaded(*inputs), mod(*inputs))


def test_torch_ao_4bit_has_the_same_torchscript_limitation(tmp_path):
    ref = ao_bag(float_bag(mode="sum"), torch.quint4x2)
    torch.jit.save(torch.jit.script(ref), str(tmp_path / "ao.pt"))
    with pytest.raises(RuntimeError, match="storage"):
        torch.jit.load(str(tmp_path / "ao.pt"))


def test_scripted_bag_modes_match_eager():
    for mode in ("sum", "mean", "max"):
        mod = E.EmbeddingBag.from_float(float_bag(mode=mode, padding_idx=3))
        scripted = torch.jit.script(mod)
        assert torch.equal(scripted(IDX, OFFSETS), mod(IDX, OFFSETS))


def test_reprs_name_sizes_dtype_and_qscheme():
    emb = E.Embedding.from_float(nn.Embedding(10, 8, padding_idx=0))
    assert repr(emb) == ("QuantizedEmbedding(num_embeddings=10, embedding_dim=8, padding_idx=0, "
                         "dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams)")
    bag = E.EmbeddingBag.from_float(float_bag(mode="max", include_last_offset=True),
                                    dtype=torch.quint4x2)
    assert repr(bag) == ("QuantizedEmbeddingBag(num_embeddings=10, embedding_dim=8, "
                         "dtype=torch.quint4x2, qscheme=torch.per_channel_affine_float_qparams, "
                         "mode=max, include_last_offset=True)")


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="embedding_dim must be even"):
        E.EmbeddingBag.from_float(nn.EmbeddingBag(10, 7), dtype=torch.quint4x2)
    with pytest.raises(ValueError, match="supports dtype"):
        E.Embedding(10, 8, dtype=torch.qint8)
    with pytest.raises(ValueError, match="float_qparams"):
        E.Embedding.from_float(nn.Embedding(10, 8), ao_obs.PerChannelMinMaxObserver.with_args(
            dtype=torch.quint8, qscheme=torch.per_channel_affine))
    with pytest.raises(ValueError, match="pass dtype=torch.quint8"):
        E.Embedding.from_float(nn.Embedding(10, 8), dtype=torch.quint4x2,
                               weight_observer_factory=ao_obs.default_float_qparams_observer)
    with pytest.raises(TypeError, match="expects nn.EmbeddingBag"):
        E.EmbeddingBag.from_float(nn.Embedding(10, 8))
    with pytest.raises(ValueError, match="mode must be one of"):
        E.EmbeddingBag(10, 8, mode="median")
    with pytest.raises(RuntimeError, match="per_sample_weights need mode='sum'"):
        E.EmbeddingBag(10, 8, mode="mean")(IDX, OFFSETS, torch.rand(IDX.numel()))
    with pytest.raises(RuntimeError, match="offsets must be None"):
        E.EmbeddingBag(10, 8, mode="max")(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="build it with the weight's dtype"):
        E.Embedding(10, 8, dtype=torch.quint4x2).load_state_dict(
            E.Embedding(10, 8).state_dict())
    with pytest.warns(UserWarning, match="max_norm"):
        E.Embedding.from_float(nn.Embedding(10, 8, max_norm=1.0))
