"""Models torch.fx cannot trace: the error names the submodule, source line, cause and fix;
with fallback (the default) they quantize anyway, the traceable conv/linear layers int8, and
every fallback decision is recorded. Three kinds (control flow in the root forward, in a
submodule, in a helper function) and a BERT-style encoder written with Hugging Face's
untraceable idioms (shape-dependent slicing, ``zip(*tuple_of_proxies)``, ``**kwargs``
forwarding, dict outputs), differential against eager ``torch.ao`` ``quantize_dynamic``.

SQNR floors (measured in brackets, the same with FBGEMM_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2: x86's default activations use reduce_range, which int16 pair sums do
not saturate): static >= 20 dB [35.7-40.7 dB], dynamic >= 30 dB [44.7-49.4 dB]."""
from __future__ import annotations

import copy
import inspect
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.fallback import FallbackRecord, fallback_records, units
from fxquant.measure import sqnr_db
from fxquant.meta import qinfo
from fxquant.nn import dynamic as nnqd
from fxquant.nn import quantized as nnq
from fxquant.trace import TraceFailed

HERE = os.path.basename(__file__)


def _line(obj, text: str) -> int:
    """Line number of the first statement of ``obj``'s source that starts with ``text``."""
    lines, start = inspect.getsourcelines(obj)
    return start + next(i for i, line in enumerate(lines) if line.strip().startswith(text))


# ----------------------------------------------------------------------------- models
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Right-pad the last dimension to a multiple: ``if pad:`` on a traced int."""
    pad = (-x.size(-1)) % multiple
    if pad:
        x = F.pad(x, (0, pad))
    return x


class RootFlow(nn.Module):
    """Data-dependent control flow in the root forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.mean() > 5.0:
            x = x * 0.5
        return self.head(self.body(x).mean((2, 3)))


class Gate(nn.Module):
    """Data-dependent control flow in a submodule that holds two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.skip = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.abs().mean() > 10:
            y = y / 2
        return F.relu(y) + self.skip(x)


class SubmoduleFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.gate = Gate()
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.stem(x)).mean((2, 3)))


class PadConv(nn.Module):
    """Calls the untraceable helper function, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_to_multiple(x, 8))


class HelperFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, 4, 1)
        self.pad = PadConv()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pad(F.relu(self.stem(x))).mean(-1))


class RootHelper(nn.Module):
    """The helper function called in the root forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_to_multiple(x, 8))


# kind: (model, input shape, int8 conv count, int8 linear count, what fallback did, the line)
KINDS = {
    "root": (RootFlow, (2, 3, 12, 12), 3, 1, "eager", (RootFlow.forward, "if x.mean() > 5.0")),
    "submodule": (SubmoduleFlow, (2, 3, 12, 12), 3, 1, "leaf",
                  (Gate.forward, "if y.abs().mean() > 10")),
    "helper": (HelperFlow, (2, 4, 13), 2, 1, "leaf", (pad_to_multiple, "if pad:")),
}


def _int8_counts(model: nn.Module) -> tuple[int, int]:
    mods = list(model.modules())
    convs = sum(isinstance(m, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)) for m in mods)
    return convs, sum(isinstance(m, nnq.Linear) for m in mods)


def _static(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"),
                                  (torch.randn(*shape),), backend="x86")
    for _ in range(8):
        prepared(torch.randn(*shape))
    return prepared


# ----------------------------------------------------------------------------- three kinds
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_static_ptq_quantizes_the_traceable_layers(kind):
    cls, shape, convs, linears, action, (where, text) = KINDS[kind]
    torch.manual_seed(0)
    model = cls().eval()
    quantized = fxquant.convert_fx(_static(model, shape))
    assert _int8_counts(quantized) == (convs, linears)
    x = torch.randn(*shape)
    with torch.no_grad():
        db = sqnr_db(model(x), quantized(x))
    assert db >= 20, f"{kind}: {db:.1f} dB"
    (first, *_) = [r for r in fallback_records(quantized) if r.action == action]
    assert first.location == f"{HERE}:{_line(where, text)}", first


@pytest.mark.parametrize("with_inputs", [False, True])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_quantize_dynamic_fx_quantizes_every_linear(kind, with_inputs):
    cls, shape, _, linears, _, _ = KINDS[kind]
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(*shape)
    quantized = fxquant.quantize_dynamic_fx(model, example_inputs=(x,) if with_inputs else None)
    assert sum(isinstance(m, nnqd.Linear) for m in quantized.modules()) == linears
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    with torch.no_grad():
        db = sqnr_db(model(x), quantized(x))
    assert db >= 30, f"{kind}: {db:.1f} dB"
    assert fallback_records(quantized), "fallback left no record"


def test_root_forward_runs_eagerly_and_each_child_is_a_unit():
    torch.manual_seed(0)
    prepared = _static(RootFlow().eval(), (2, 3, 12, 12))
    assert type(prepared) is RootFlow  # the user's class, children prepared
    assert sorted(path for path, _ in units(prepared)) == ["body", "head", "stem"]
    (root,) = [r for r in fallback_records(prepared) if r.module_path == ""]
    assert root.action == "eager" and "data-dependent control flow" in root.reason
    assert root.source.endswith("in forward: if x.mean() > 5.0:")
    converted = fxquant.convert_fx(prepared)
    assert type(converted) is RootFlow and fallback_records(converted) == fallback_records(prepared)
    # the module paths in the pieces are the user's, for the qconfig mapping and the reports
    paths = {qinfo(n).module_path for _, gm in units(converted) for n in gm.graph.nodes
             if n.op == "call_module"}
    assert {"stem.0", "body.0", "body.2", "head"} <= paths


@pytest.mark.parametrize("kind,leaf,children", [("submodule", "gate", "conv, skip"),
                                                ("helper", "pad", "conv")])
def test_leaf_call_nodes_record_cause_and_line(kind, leaf, children):
    cls, shape, _, _, _, (where, text) = KINDS[kind]
    torch.manual_seed(0)
    quantized = fxquant.convert_fx(_static(cls().eval(), shape))
    assert isinstance(quantized, torch.fx.GraphModule)
    (node,) = [n for n in quantized.graph.nodes if n.op == "call_module" and n.target == leaf]
    decision = qinfo(node).last("leaf")
    assert decision is not None and decision.pass_name == "trace"
    assert str(decision).startswith("[trace] leaf: data-dependent control flow")
    assert decision.reason.endswith(f" at {HERE}:{_line(where, text)}")
    inner = qinfo(node).last("quantize_children")
    assert inner is not None and inner.reason == f"quantized on their own: {children}"
    (record,) = [r for r in fallback_records(quantized) if r.action == "leaf"]
    assert record == FallbackRecord(leaf, type(quantized.get_submodule(leaf)).__name__, "leaf",
                                    record.reason, f"{HERE}:{_line(where, text)}", record.source)


@pytest.mark.parametrize("kind,name", [("root", "body.2"), ("submodule", "gate.skip")])
def test_module_names_of_the_mapping_reach_into_the_pieces(kind, name):
    """Pieces carry the user's module paths: set_module_name(path, None) leaves that conv
    float whether it sits in a piece traced on its own (body.2) or alone under a leaf."""
    cls, shape, convs, linears, _, _ = KINDS[kind]
    torch.manual_seed(0)
    mapping = fxquant.get_default_qconfig_mapping("x86").set_module_name(name, None)
    x = torch.randn(*shape)
    prepared = fxquant.prepare_fx(cls().eval(), mapping, (x,), backend="x86")
    prepared(x)
    quantized = fxquant.convert_fx(prepared)
    assert _int8_counts(quantized) == (convs - 1, linears)
    (float_conv,) = [m for path, m in quantized.named_modules()
                     if path.endswith(name.split(".")[-1]) and type(m) is nn.Conv2d]
    assert float_conv.weight.dtype == torch.float32


def test_reference_conversion_of_an_eager_root():
    torch.manual_seed(0)
    model = RootFlow().eval()
    prepared = _static(model, (2, 3, 12, 12))
    reference = fxquant.convert_to_reference_fx(prepared)
    assert type(reference) is RootFlow and _int8_counts(reference) == (0, 0)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert sqnr_db(model(x), reference(x)) >= 20
        assert sqnr_db(model(x), prepared(x)) > 60  # observers pass data through unchanged


def test_traceable_model_is_one_graph_without_records():
    torch.manual_seed(0)
    model = SubmoduleFlow().eval()
    x = torch.randn(2, 3, 12, 12)
    mapping = fxquant.get_default_qconfig_mapping("x86")
    prepared = fxquant.prepare_fx(model, mapping, (x,), backend="x86", leaf_names=["gate"])
    assert isinstance(prepared, torch.fx.GraphModule) and fallback_records(prepared) == []
    assert [path for path, _ in units(prepared)] == [""]  # the user's leaf stays one float call


def test_user_model_is_not_modified():
    torch.manual_seed(0)
    model = RootFlow().eval()
    model.body.register_forward_hook(lambda m, i, o: None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = {n: len(m._forward_pre_hooks) + len(m._forward_hooks) for n, m in model.named_modules()}
    prepared = _static(model, (2, 3, 12, 12))
    fxquant.convert_fx(prepared)
    fxquant.quantize_dynamic_fx(model, example_inputs=(torch.randn(2, 3, 12, 12),))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {n: len(m._forward_pre_hooks) + len(m._forward_hooks)
            for n, m in model.named_modules()} == hooks
    assert all(type(m).__module__.startswith(("torch.nn", __name__)) for m in model.modules())


def test_prepared_pieces_keep_the_users_train_eval_flags():
    torch.manual_seed(0)
    model = SubmoduleFlow().train()
    model.gate.skip.eval()
    x = torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prepare_qat_fx warns about the eval-mode child
        prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("x86"),
                                          (x,), backend="x86")
    assert prepared.training and prepared.gate.training and prepared.gate.conv.training
    assert not prepared.gate.skip.training and not prepared.gate.skip.skip.training
    prepared(x).sum().backward()  # trains through the leaf's pieces
    assert prepared.gate.conv.get_submodule("conv").weight.grad is not None
    quantized = fxquant.convert_fx(prepared.eval())
    assert _int8_counts(quantized) == (3, 1)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        if scale is not None:
            y = y * scale
        return y


class _CallsScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Scaled()

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if x.sum() > 0:
            x = x + 1
        return self.block(x, scale)


def test_a_piece_traced_with_a_constant_argument_refuses_another_value():
    """``block`` was traced with scale=None (what its parent passed on example_inputs): called
    with a tensor it raises instead of silently ignoring the scale."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    prepared = fxquant.prepare_fx(_CallsScaled().eval(), fxquant.get_default_qconfig_mapping("x86"),
                                  (x,), backend="x86")
    prepared(x)
    quantized = fxquant.convert_fx(prepared)
    assert isinstance(quantized.block, torch.fx.GraphModule)
    quantized(x)
    with pytest.raises(AssertionError, match="scale has been specialized to have value None"):
        quantized(x, torch.tensor(2.0))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_error_without_fallback_names_place_line_cause_and_fix(kind):
    cls, shape, _, _, _, (where, text) = KINDS[kind]
    with pytest.raises(TraceFailed) as e:
        fxquant.prepare_fx(cls().eval(), fxquant.get_default_qconfig_mapping("x86"),
                           (torch.randn(*shape),), backend="x86", fallback=False)
    err, msg = e.value, str(e.value)
    assert f"source: {HERE}:{_line(where, text)} in {where.__name__}: {text}" in msg
    assert "data-dependent control flow" in msg and "fix: " in msg
    if kind == "root":
        assert err.module_path == "" and "the forward of the root module RootFlow" in msg
        assert "concrete_args" in err.hint and "torch.fx.wrap" in err.hint
        assert "leaf_names" not in err.hint and "leaf_modules" not in err.hint
    elif kind == "submodule":
        assert err.module_path == "gate" and "submodule 'gate' (Gate)" in msg
        assert "leaf_names=['gate']" in err.hint and "leaf_modules=[Gate]" in err.hint
    else:
        assert err.module_path == "pad"
        assert "function pad_to_multiple() called in submodule 'pad' (PadConv)" in msg
        assert err.hint.startswith("register the function so fx records it as one call: "
                                   f"torch.fx.wrap('pad_to_multiple') at the top level of {HERE}")
        assert "leaf_names=['pad']" in err.hint


def test_helper_in_root_forward_suggests_wrap_not_leaves():
    with pytest.raises(TraceFailed) as e:
        fxquant.quantize_dynamic_fx(RootHelper().eval(), fallback=False)
    err = e.value
    assert err.site.scope == "helper" and err.module_path == ""
    assert "function pad_to_multiple() called in the forward of the root module RootHelper" in str(err)
    assert "torch.fx.wrap('pad_to_multiple')" in err.hint and "leaf_names" not in err.hint
    assert err.source.startswith(f"{HERE}:{_line(pad_to_multiple, 'if pad:')} in pad_to_multiple")


# ----------------------------------------------------------------------------- BERT-style
class Config:
    vocab_size, hidden_size, num_attention_heads, intermediate_size = 100, 32, 4, 64
    num_hidden_layers, max_position_embeddings, type_vocab_size = 2, 24, 2
    chunk_size_feed_forward, layer_norm_eps, hidden_dropout_prob = 4, 1e-12, 0.1


def apply_chunking_to_forward(forward_fn, chunk_size, chunk_dim, *input_tensors):
    """As in transformers.pytorch_utils: ``zip(*tuple_of_proxies)`` does not trace."""
    if chunk_size > 0:
        num_chunks = input_tensors[0].shape[chunk_dim] // chunk_size
        chunks = tuple(t.chunk(num_chunks, dim=chunk_dim) for t in input_tensors)
        outputs = tuple(forward_fn(*chunk) for chunk in zip(*chunks))
        return torch.cat(outputs, dim=chunk_dim)
    return forward_fn(*input_tensors)


class Embeddings(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(c.max_position_embeddings)
                             .expand((1, -1)), persistent=False)

    def forward(self, input_ids, token_type_ids=None):
        position_ids = self.position_ids[:, : input_ids.size(1)]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        emb = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(emb + self.position_embeddings(position_ids)))


class SelfAttention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.num_attention_heads = c.num_attention_heads
        self.attention_head_size = c.hidden_size // c.num_attention_heads
        self.all_head_size = c.hidden_size
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def transpose_for_scores(self, x):
        shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, **kwargs):
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        context = context.view(context.size()[:-2] + (self.all_head_size,))
        return (context, probs) if output_attentions else (context,)


class Output(nn.Module):
    def __init__(self, c: Config, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = Output(c, c.hidden_size)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        self_outputs = self.self(hidden_states, attention_mask, **kwargs)
        return (self.output(self_outputs[0], hidden_states),) + self_outputs[1:]


class Intermediate(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.chunk_size_feed_forward, self.seq_len_dim = c.chunk_size_feed_forward, 1
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Output(c, c.intermediate_size)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        outputs = self.attention(hidden_states, attention_mask)
        layer_output = apply_chunking_to_forward(self.feed_forward_chunk,
                                                 self.chunk_size_feed_forward, self.seq_len_dim,
                                                 outputs[0])
        return (layer_output,) + outputs[1:]

    def feed_forward_chunk(self, attention_output):
        return self.output(self.intermediate(attention_output), attention_output)


class Encoder(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Layer(c) for _ in range(c.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=False, **kwargs):
        all_hidden_states = () if output_hidden_states else None
        for layer_module in self.layer:
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            hidden_states = layer_module(hidden_states, attention_mask, **kwargs)[0]
        return {"last_hidden_state": hidden_states, "hidden_states": all_hidden_states}


class Pooler(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class BertModel(nn.Module):
    def __init__(self, c: Config = Config()) -> None:
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.pooler = Pooler(c)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=True,
                **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extended = attention_mask[:, None, None, :].to(torch.float32)
        extended = (1.0 - extended) * torch.finfo(torch.float32).min
        embedding_output = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        encoder_outputs = self.encoder(embedding_output, attention_mask=extended, **kwargs)
        sequence_output = encoder_outputs["last_hidden_state"]
        pooled_output = self.pooler(sequence_output)
        if not return_dict:
            return (sequence_output, pooled_output)
        return {"last_hidden_state": sequence_output, "pooler_output": pooled_output}


def _bert_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, Config.vocab_size, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padding in the second sequence
    return ids, mask


@pytest.mark.parametrize("with_inputs", [False, True])
def test_bert_style_encoder_dynamic_matches_eager_quantize_dynamic(with_inputs):
    torch.manual_seed(0)
    model = BertModel().eval()
    ids, mask = _bert_inputs()
    ours = fxquant.quantize_dynamic_fx(model, example_inputs=(ids, mask) if with_inputs else None)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert n_linear == 13
    assert sum(isinstance(m, nnqd.Linear) for m in ours.modules()) == n_linear
    with torch.no_grad():
        out, ref = ours(ids, mask), model(ids, mask)
    assert sqnr_db(ref["last_hidden_state"], out["last_hidden_state"]) >= 30
    try:
        import torch.ao.quantization as ao
    except ImportError:
        return
    from fxquant.api import _DYNAMIC_DEFAULT_TYPES
    from fxquant.backends.dynamic_defaults import dynamic_weights_per_channel

    # fxquant's default dynamic weights are per-channel where the engine takes them (torch.ao's
    # default is per-tensor): give torch.ao its own per-channel qconfig there
    spec = None
    if dynamic_weights_per_channel(torch.backends.quantized.engine).per_channel:
        spec = {t: ao.per_channel_dynamic_qconfig for t in _DYNAMIC_DEFAULT_TYPES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ao.quantize_dynamic(copy.deepcopy(model), spec)
    assert sum(type(m).__name__ == "Linear" and "dynamic" in type(m).__module__
               for m in theirs.modules()) == n_linear
    with torch.no_grad():
        expected = theirs(ids, mask)
    for key in ("last_hidden_state", "pooler_output"):
        assert torch.equal(out[key], expected[key]), (key, (out[key] - expected[key]).abs().max())


def test_bert_style_encoder_fallback_records_name_each_idiom():
    model = BertModel().eval()
    ids, mask = _bert_inputs()
    quantized = fxquant.quantize_dynamic_fx(model, example_inputs=(ids, mask))
    records = {r.module_path: r for r in fallback_records(quantized)}
    expect = {
        "": (BertModel.forward, "encoder_outputs = self.encoder(", "iteration over a traced"),
        "embeddings": (Embeddings.forward, "position_ids = self.position_ids[:, :",
                       "shape-dependent slicing"),
        "encoder": (Encoder.forward, "hidden_states = layer_module(", "iteration over"),
        "encoder.layer.1": (apply_chunking_to_forward, "outputs = tuple(forward_fn(*chunk) for chunk in zip(*chunks))",
                            "iteration over a traced value"),
        "encoder.layer.0.attention": (Attention.forward, "self_outputs = self.self(", "**kwargs"),
    }
    for path, (fn, text, cause) in expect.items():
        r = records[path]
        assert r.action == "eager" and cause in r.reason, r
        assert r.location == f"{HERE}:{_line(fn, text)}", r
    assert records["encoder.layer.0.attention.self"].action == "alone"


def test_bert_style_encoder_static_ptq_runs_every_linear_int8():
    torch.manual_seed(0)
    model = BertModel().eval()
    ids, mask = _bert_inputs()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (ids, mask),
                                  backend="x86")
    for seed in range(2, 6):
        prepared(*_bert_inputs(seed))
    quantized = fxquant.convert_fx(prepared)
    assert _int8_counts(quantized) == (0, 13)
    with torch.no_grad():
        out, ref = quantized(ids, mask), model(ids, mask)
    # measured 24 dB: the additive mask (finfo.min) dominates the attention scores' observer
    assert sqnr_db(ref["last_hidden_state"], out["last_hidden_state"]) >= 15


def test_bert_style_error_without_fallback():
    with pytest.raises(TraceFailed) as e:
        fxquant.quantize_dynamic_fx(BertModel().eval(), fallback=False)
    err = e.value
    assert err.module_path == "embeddings" and "shape-dependent slicing" in str(err)
    line = _line(Embeddings.forward, "position_ids = self.position_ids[:, :")
    assert err.source == (f"{HERE}:{line} in forward: "
                          "position_ids = self.position_ids[:, : input_ids.size(1)]")
    assert "leaf_names=['embeddings']" in err.hint


def test_example_script():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "untraceable.py")
    spec = importlib.util.spec_from_file_location("untraceable_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.static_gated_net() >= 20  # measured 41.2 dB
    assert example.dynamic_text_encoder() >= 30  # measured 42.8 dB
