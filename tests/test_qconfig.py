"""fxquant.qconfig: QConfig, QConfigMapping precedence (against torch.ao's FX resolution),
default qconfigs and default mappings per backend."""

from __future__ import annotations

import operator
import pickle
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant import observers as O
from fxquant import qconfig as Q

tq = pytest.importorskip("torch.ao.quantization")
tq_utils = pytest.importorskip("torch.ao.quantization.fx.qconfig_mapping_utils")
tq_tracer = pytest.importorskip("torch.ao.quantization.fx.tracer")

BACKENDS = ["fbgemm", "x86", "qnnpack", "onednn"]


def normalized(qconfig):
    """(class name, kwargs) per factory: comparable across fxquant and torch.ao."""
    if qconfig is None:
        return None
    out = []
    for factory in (qconfig.activation, qconfig.weight):
        if factory is None:
            out.append(None)
            continue
        cls, kwargs = O.factory_parts(factory)
        out.append((cls.__name__, kwargs))
    return out


# -- QConfig -------------------------------------------------------------------------------


def test_qconfig_rejects_instances_with_a_fix():
    with pytest.raises(ValueError, match=r"observer instance \(MinMaxObserver\).*MinMaxObserver.with_args"):
        Q.QConfig(activation=O.MinMaxObserver(), weight=None)
    with pytest.raises(ValueError, match="QConfig weight got an observer instance"):
        Q.QConfig(activation=None, weight=O.MinMaxObserver())
    with pytest.raises(ValueError, match="must be an observer class or factory"):
        Q.QConfig(activation="minmax", weight=None)


def test_qconfig_accepts_factories_classes_and_none():
    qc = Q.QConfig(activation=O.MinMaxObserver, weight=None)
    assert qc.activation is O.MinMaxObserver and qc.weight is None
    assert qc == Q.QConfig(O.MinMaxObserver, None)
    assert pickle.loads(pickle.dumps(Q.default_qconfig)) == Q.default_qconfig


def test_qconfig_equals():
    a = Q.QConfig(O.MinMaxObserver.with_args(dtype=torch.qint8), O.default_weight_observer)
    b = Q.QConfig(O.MinMaxObserver.with_args(dtype=torch.qint8), O.default_weight_observer)
    assert Q.qconfig_equals(a, b)
    assert not Q.qconfig_equals(a, Q.QConfig(O.MinMaxObserver.with_args(dtype=torch.quint8), O.default_weight_observer))
    assert not Q.qconfig_equals(a, Q.QConfig(O.HistogramObserver.with_args(dtype=torch.qint8), O.default_weight_observer))
    assert Q.qconfig_equals(Q.QConfig(O.MinMaxObserver, None), Q.QConfig(O.MinMaxObserver.with_args(), None))
    assert Q.qconfig_equals(None, None) and not Q.qconfig_equals(a, None)


READY = [
    "default_qconfig", "default_dynamic_qconfig", "per_channel_dynamic_qconfig", "float16_dynamic_qconfig",
    "float16_static_qconfig", "float_qparams_weight_only_qconfig", "float_qparams_weight_only_qconfig_4bit",
    "default_per_channel_qconfig", "default_reuse_input_qconfig", "default_quint8_weight_qconfig",
]


@pytest.mark.parametrize("name", READY)
def test_ready_qconfigs_match_torch(name):
    assert normalized(getattr(Q, name)) == normalized(getattr(tq.qconfig, name))


def test_float16_dynamic_qconfig_contents():
    act, weight = Q.float16_dynamic_qconfig.activation(), Q.float16_dynamic_qconfig.weight()
    assert (type(act), act.dtype, act.is_dynamic) == (O.PlaceholderObserver, torch.float16, True)
    assert (type(weight), weight.dtype, weight.is_dynamic) == (O.PlaceholderObserver, torch.float16, False)


def test_reuse_input_qconfig_marker():
    assert Q.is_reuse_input_qconfig(Q.default_reuse_input_qconfig)
    assert not Q.is_reuse_input_qconfig(Q.default_qconfig)
    assert not Q.is_reuse_input_qconfig(None)


# -- backends ------------------------------------------------------------------------------


def torch_reduce_range(backend: str) -> bool:
    """torch.ao's activation range for a backend: fixed by backend name (7-bit on fbgemm/x86,
    8-bit on onednn/qnnpack), whatever the CPU. fxquant's default follows the CPU instead
    (tests/test_hw_range.py); pinned to torch's choice, the qconfigs must be identical."""
    return bool(tq.get_default_qconfig(backend).activation().reduce_range)


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_default_qconfig_matches_torch(backend):
    pinned = Q.get_default_qconfig(backend, reduce_range=torch_reduce_range(backend))
    assert normalized(pinned) == normalized(tq.get_default_qconfig(backend))
    ours = Q.get_default_qconfig(backend)
    act = ours.activation()
    assert isinstance(act, O.HistogramObserver)
    assert act.reduce_range is Q.activation_range(backend).reduce_range  # this CPU's choice
    assert normalized(ours)[1] == normalized(pinned)[1]  # only the activation range may differ
    weight = ours.weight()
    assert weight.dtype == torch.qint8
    expected_weight_scheme = torch.per_tensor_symmetric if backend == "qnnpack" else torch.per_channel_symmetric
    assert weight.qscheme == expected_weight_scheme


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown quantization backend 'tensorrt'.*fbgemm.*x86.*qnnpack.*onednn"):
        Q.get_default_qconfig("tensorrt")
    with pytest.raises(ValueError, match="unknown quantization backend"):
        Q.get_default_qconfig_mapping("fbgemm2")


@pytest.mark.parametrize(
    ("machine", "expected"), [("x86_64", "x86"), ("AMD64", "x86"), ("arm64", "qnnpack"), ("aarch64", "qnnpack")]
)
def test_resolve_backend_auto(monkeypatch, machine, expected):
    monkeypatch.setattr(Q.platform, "machine", lambda: machine)
    assert Q.resolve_backend("auto") == expected
    assert Q.get_default_qconfig_mapping().backend == expected
    assert normalized(Q.get_default_qconfig("auto")) == normalized(Q.get_default_qconfig(expected))


def test_resolve_backend_unknown_machine(monkeypatch):
    monkeypatch.setattr(Q.platform, "machine", lambda: "riscv64")
    with pytest.raises(ValueError, match="machine 'riscv64'.*pass backend="):
        Q.resolve_backend("auto")
    assert Q.resolve_backend("onednn") == "onednn"


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_qconfig_mapping_matches_torch(backend):
    """Pinned to torch.ao's activation range the mapping is torch.ao's; the default differs at
    most in that range (chosen by the CPU: tests/test_hw_range.py)."""
    default = Q.get_default_qconfig_mapping(backend)
    assert default.global_qconfig.activation().reduce_range is default.activation_range.reduce_range
    ours = Q.get_default_qconfig_mapping(backend, reduce_range=torch_reduce_range(backend))
    ref = tq.get_default_qconfig_mapping(backend)
    assert ours.backend == backend
    assert normalized(ours.global_qconfig) == normalized(ref.global_qconfig)
    assert list(ours.object_type_qconfigs) == list(ref.object_type_qconfigs)
    for key, qconfig in ref.object_type_qconfigs.items():
        assert normalized(ours.object_type_qconfigs[key]) == normalized(qconfig), key
    assert not ours.module_name_qconfigs and not ours.module_name_regex_qconfigs


def test_default_qconfig_mapping_special_entries():
    mapping = Q.get_default_qconfig_mapping("x86")
    transpose = mapping.object_type_qconfigs[nn.ConvTranspose2d].weight()
    assert transpose.qscheme == torch.per_tensor_symmetric  # no per-channel transposed conv on x86
    onednn = Q.get_default_qconfig_mapping("onednn").object_type_qconfigs[nn.ConvTranspose2d].weight()
    assert onednn.qscheme == torch.per_channel_symmetric
    sigmoid = mapping.object_type_qconfigs[torch.sigmoid].activation().calculate_qparams()
    assert (sigmoid[0].item(), sigmoid[1].item()) == (1 / 256, 0)
    tanh = mapping.object_type_qconfigs["tanh"].activation().calculate_qparams()
    assert (tanh[0].item(), tanh[1].item()) == (2 / 256, 128)
    assert Q.is_reuse_input_qconfig(mapping.object_type_qconfigs["reshape"])
    assert isinstance(mapping.object_type_qconfigs[nn.LayerNorm].weight(), O.PlaceholderObserver)
    text = repr(mapping)
    assert "backend='x86'" in text and "nn.ConvTranspose2d" in text and "F.conv_transpose2d" in text


# -- precedence ----------------------------------------------------------------------------

G = Q.QConfig(O.MinMaxObserver, None)
T = Q.QConfig(O.HistogramObserver, None)
R = Q.QConfig(O.MovingAverageMinMaxObserver, None)
N = Q.QConfig(O.PerChannelMinMaxObserver.with_args(ch_axis=1), None)
ORD = Q.QConfig(O.FixedQParamsObserver.with_args(scale=0.5, zero_point=0), None)


def full_mapping():
    return (
        Q.QConfigMapping()
        .set_global(G)
        .set_object_type(nn.Linear, T)
        .set_object_type(F.linear, T)
        .set_module_name_regex(r"blocks\..*", R)
        .set_module_name("blocks.1", N)
        .set_module_name_object_type_order("blocks.1", F.linear, 0, ORD)
    )


def test_each_level_beats_the_lower_ones():
    m = full_mapping()
    assert m.resolve("other", nn.Conv2d) == (G, "global")
    assert m.resolve("other", nn.Linear) == (T, "object_type nn.Linear")
    assert m.resolve("blocks.0", nn.Linear) == (R, r"module_name_regex 'blocks\\..*'")
    assert m.resolve("blocks.1", nn.Linear) == (N, "module_name 'blocks.1'")
    assert m.resolve("blocks.1", F.linear, 0) == (ORD, "module_name_object_type_order ('blocks.1', F.linear, 0)")
    assert m.resolve("blocks.1", F.linear, 1) == (N, "module_name 'blocks.1'")


def test_module_name_walks_up_parents_and_none_means_float():
    m = Q.QConfigMapping().set_global(G).set_module_name("head", None).set_module_name("a.b", T)
    assert m.resolve("head", nn.Linear) == (None, "module_name 'head' → None")
    assert m.resolve("head.fc.x", nn.Linear) == (None, "module_name 'head' (parent of 'head.fc.x') → None")
    assert m.resolve("a.b.c", nn.Linear) == (T, "module_name 'a.b' (parent of 'a.b.c')")
    assert m.resolve("a", nn.Linear) == (G, "global")
    assert m.resolve("a.bc", nn.Linear) == (G, "global")  # path components, not string prefixes
    assert Q.QConfigMapping().resolve("x", nn.Linear) == (None, "global → None")


def test_regex_first_registered_wins_and_uses_match():
    m = Q.QConfigMapping().set_module_name_regex("foo.*bar", T).set_module_name_regex("foo.*", R)
    assert m.resolve("foo.x.bar", nn.Linear)[0] is T
    assert m.resolve("foo.x", nn.Linear)[0] is R
    assert m.resolve("x.foo", nn.Linear)[0] is None  # re.match anchors at the start
    m.set_module_name_regex("foo.*bar", N)  # re-setting keeps the original position
    assert m.resolve("foo.x.bar", nn.Linear)[0] is N


def test_object_type_kinds_and_enclosing_module():
    m = Q.QConfigMapping().set_object_type(F.relu, T).set_object_type("reshape", R).set_object_type(nn.Sequential, N)
    assert m.resolve("", F.relu) == (T, "object_type F.relu")
    assert m.resolve("", "reshape") == (R, "object_type 'reshape'")
    assert m.resolve("seq", F.relu, scope_type=nn.Sequential) == (N, "object_type nn.Sequential (enclosing module)")
    assert m.resolve("", torch.add)[1] == "global → None"


def test_order_for_module_calls_is_keyed_by_the_parent():
    m = Q.QConfigMapping().set_module_name_object_type_order("sub", nn.Linear, 1, T)
    assert m.resolve("sub.fc2", nn.Linear, 1)[0] is T
    assert m.resolve("sub.fc2", nn.Linear, 0)[0] is None
    assert m.resolve("sub.fc2", nn.Linear)[0] is None


def test_setters_validate_and_chain():
    m = Q.QConfigMapping()
    assert m.set_global(None) is m
    with pytest.raises(ValueError, match="invalid regex"):
        m.set_module_name_regex("(", G)
    with pytest.raises(TypeError, match="expected a QConfig or None"):
        m.set_object_type(nn.Linear, O.default_observer)
    with pytest.raises(ValueError, match="use set_global"):
        m.set_module_name("", G)
    with pytest.raises(ValueError, match="index must be an int >= 0"):
        m.set_module_name_object_type_order("a", F.linear, -1, G)
    with pytest.raises(TypeError, match="module class, a function or a method name"):
        m.set_object_type(3, G)


def test_dict_roundtrip_matches_torch_format():
    m = full_mapping().set_module_name("head", None)
    d = m.to_dict()
    assert d[""] is G
    assert d["module_name"] == [("blocks.1", N), ("head", None)]
    assert d["module_name_object_type_order"] == [("blocks.1", F.linear, 0, ORD)]
    back = Q.QConfigMapping.from_dict(d)
    assert back.to_dict() == d
    ref = tq.QConfigMapping.from_dict(d)  # torch reads our dict, and we read torch's
    assert Q.QConfigMapping.from_dict(ref.to_dict()).to_dict() == d
    with pytest.raises(ValueError, match=r"unknown keys \['modules'\]"):
        Q.QConfigMapping.from_dict({"modules": []})


# -- differential: torch.ao's own FX qconfig assignment -------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.fc(x)
        y = F.linear(y, self.fc.weight)
        y = F.linear(y, self.fc.weight)
        y = torch.add(y, 1)
        return self.act(y).reshape(-1, 4)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.sub = Block()
        self.head = nn.Linear(4, 2)
        self.head2 = nn.Linear(4, 2)

    def forward(self, x):
        x = self.sub(self.blocks(x))
        x = F.relu(F.linear(x, self.head.weight))
        return self.head(x) + self.head2(x)


def _traced():
    model = Net()
    tracer = tq_tracer.QuantizationTracer([], [])
    graph = tracer.trace(model)
    return model, graph, dict(tracer.node_name_to_scope)


MODEL, GRAPH, SCOPES = _traced()
MODULES = dict(MODEL.named_modules())


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _our_assignment(mapping: Q.QConfigMapping) -> dict[str, object]:
    """What a propagate_qconfig pass computes with resolve(), node by node (as torch counts)."""
    counts: dict[str, dict[object, int]] = defaultdict(lambda: defaultdict(int))
    out = {}
    for node in GRAPH.nodes:
        if node.op == "get_attr":
            owner = _parent(node.target)
            out[node.name] = mapping.resolve(owner, type(MODULES[owner]))[0]
        elif node.op == "call_function":
            path, scope_type = SCOPES[node.name]
            index = counts[path][node.target]
            counts[path][node.target] += 1
            out[node.name] = mapping.resolve(path, node.target, index, scope_type=scope_type)[0]
        elif node.op == "call_method":
            path, scope_type = SCOPES[node.name]
            out[node.name] = mapping.resolve(path, node.target, scope_type=scope_type)[0]
        elif node.op == "call_module":
            module_type = type(MODULES[node.target])
            parent = _parent(node.target)
            index = counts[parent][module_type]
            counts[parent][module_type] += 1
            out[node.name] = mapping.resolve(node.target, module_type, index)[0]
    return out


def _torch_assignment(mapping: Q.QConfigMapping) -> dict[str, object]:
    ref = tq.QConfigMapping.from_dict(mapping.to_dict())
    result = tq_utils._generate_node_name_to_qconfig(MODEL, dict(MODULES), GRAPH, ref, SCOPES)
    ops = {n.name for n in GRAPH.nodes if n.op not in ("placeholder", "output")}
    return {name: qc for name, qc in result.items() if name in ops}


def _sentinel(tag: int) -> Q.QConfig:
    # plain functions: torch leaves them unwrapped, so identity survives its device handling
    def make():
        return O.MinMaxObserver()

    make.__name__ = f"rule{tag}"
    return Q.QConfig(activation=make, weight=None)


OBJECT_TYPES = [nn.Linear, nn.ReLU, F.linear, torch.add, F.relu, "reshape", Block, nn.Sequential, operator.add]
REGEXES = [r"blocks.*", r"blocks\.0.*", r"sub", r".*fc", r"head", r"h", r""]
NAMES = ["blocks", "blocks.0", "blocks.1.fc", "sub", "sub.fc", "head", "head2"]
ORDERS = [
    ("blocks.0", F.linear, 0), ("blocks.0", F.linear, 1), ("sub", nn.Linear, 0), ("", nn.Linear, 0),
    ("", nn.Linear, 1), ("blocks", Block, 1), ("sub", torch.add, 0), ("", F.linear, 0), ("sub", nn.ReLU, 0),
]


@st.composite
def mappings(draw):
    tags = iter(range(1000))

    def value():
        return None if draw(st.integers(0, 4)) == 0 else _sentinel(next(tags))

    m = Q.QConfigMapping()
    if draw(st.booleans()):
        m.set_global(value())
    for t in draw(st.lists(st.sampled_from(OBJECT_TYPES), unique=True, max_size=4)):
        m.set_object_type(t, value())
    for r in draw(st.lists(st.sampled_from(REGEXES), unique=True, max_size=3)):
        m.set_module_name_regex(r, value())
    for n in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3)):
        m.set_module_name(n, value())
    for name, kind, index in draw(st.lists(st.sampled_from(ORDERS), unique=True, max_size=3)):
        m.set_module_name_object_type_order(name, kind, index, value())
    return m


def _activation(qconfig):
    return None if qconfig is None else qconfig.activation


@given(mappings())
@settings(max_examples=150, deadline=None)
def test_resolution_matches_torch_fx_on_a_traced_model(mapping):
    ours = _our_assignment(mapping)
    ref = _torch_assignment(mapping)
    assert ours.keys() == ref.keys()
    for name in ours:
        assert _activation(ours[name]) is _activation(ref[name]), (name, SCOPES.get(name))


def test_differential_covers_every_node_kind():
    ops = {n.op for n in GRAPH.nodes}
    assert {"get_attr", "call_function", "call_method", "call_module"} <= ops
    assert len(_our_assignment(Q.QConfigMapping())) >= 20
