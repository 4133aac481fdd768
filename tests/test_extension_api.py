"""fxquant.extend: pass insertion, composed backends, keep-float marks, explain_match."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.extend import (SHARED, Chain, Op, Rule, compose_backend, explain_match,
                            insert_after, insert_before, keep_float, register_backend,
                            registered_backends, unregister_backend, with_fusions,
                            GroupFusion)
from fxquant.passes import prepare_pipeline


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y) + y  # bn has two users: conv-bn fuses, bn-relu cannot


def test_insert_before_and_after():
    pipe = prepare_pipeline()
    names = [p.name for p in pipe]
    marker = type("M", (), {"name": "mine"})()
    assert [p.name for p in insert_before(pipe, "annotate", marker)] == \
        names[:names.index("annotate")] + ["mine"] + names[names.index("annotate"):]
    assert [p.name for p in insert_after(pipe, "fuse", marker)][names.index("fuse") + 1] == "mine"
    with pytest.raises(fxquant.FxQuantError, match="no pass named"):
        insert_before(pipe, "nope", marker)


def test_with_fusions_prepends_to_fuse():
    g = GroupFusion(Chain(Op(torch.sub), Op(F.relu)), "sub_relu", "sub + ReLU")
    fuse = next(p for p in with_fusions(prepare_pipeline(), group_fusions=[g]) if p.name == "fuse")
    assert fuse.group_fusions[0] is g and len(fuse.group_fusions) > 1


def test_compose_backend_registers_and_unregisters():
    rule = Rule("my_identity", Op(nn.Identity), SHARED, "identity on the int8 tensor")
    b = compose_backend("x86", rule, name="x86+test")
    assert b.rules[0] is rule and b.engine == "x86"
    try:
        register_backend(b)
        assert "x86+test" in registered_backends()
    finally:
        unregister_backend("x86+test")
    assert "x86+test" not in registered_backends()


def test_keep_float_sets_none_qconfig():
    m = keep_float(fxquant.get_default_qconfig_mapping("x86"), "conv", nn.Linear)
    prepared = fxquant.prepare_fx(_Net().eval(), m, (torch.randn(1, 3, 8, 8),), backend="x86")
    from fxquant.meta import qinfo
    conv = next(n for n in prepared.graph.nodes if n.target == "conv")
    assert qinfo(conv).last("keep_float") is not None


def test_explain_match_gives_the_matchers_reason():
    gm = fx.symbolic_trace(_Net().eval())
    chain = Chain(Op(nn.BatchNorm2d), Op(F.relu))
    out = {e.node: e for e in explain_match(gm, chain)}
    assert not out["relu"].matched and "2 users" in out["relu"].reason
    assert explain_match(gm, Chain(Op(nn.Conv2d), Op(nn.BatchNorm2d)), "bn")[0].matched
    add = explain_match(gm, Op(nn.Conv2d), node="add")[0]
    assert not add.matched and "is not nn.Conv2d" in add.reason
    rule = Rule("r", Op(nn.Conv2d, check=lambda n, m: False), SHARED, "k")
    assert "fails the check" in explain_match(gm, rule, "conv")[0].reason
    backend_says = explain_match(gm, fxquant.extend.get_backend("x86"), "conv")[0]
    assert backend_says.matched


# ------------------------------------------------------------------ examples on the public API
import ast
import importlib.util
import os
import sys
from pathlib import Path

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_ALLOWED = {"fxquant", "fxquant.extend"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_EXTENSION_EXAMPLES = ("ext_*.py", "custom_pass_and_rule.py")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for each import statement of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
    return found


def test_examples_import_only_public_names():
    """The extension examples use fxquant and fxquant.extend only (besides torch and the
    standard library); every example imports no private fxquant module or name."""
    extension = sorted({p for pat in _EXTENSION_EXAMPLES for p in _EXAMPLES.glob(pat)})
    assert len(extension) >= 4
    for path in extension:
        for mod, _ in _imports(path):
            top = mod.split(".")[0]
            ok = mod in _ALLOWED or top == "torch" or top in sys.stdlib_module_names \
                or mod == "__future__"
            assert ok, f"{path.name} imports {mod}"
    every = sorted(_EXAMPLES.glob("*.py"))
    assert len(every) > len(extension)
    for path in every:
        for mod, names in _imports(path):
            if mod.split(".")[0] != "fxquant":
                continue
            private = [part for part in mod.split(".") + names if part.startswith("_")]
            assert not private, f"{path.name} imports private {private} from {mod}"


def test_gelu_pass_example():
    ex = _load("ext_gelu_pass")
    torch.manual_seed(0)
    model = ex.Net().eval()
    q = ex.quantize(model)
    gelus = [n for n in q.graph.nodes if n.op == "call_function" and "gelu" in str(n.target)]
    assert len(gelus) == 1 and gelus[0].kwargs.get("approximate") == "tanh"
    assert gelus[0].args[0].op == "call_module"  # runs on fc1's quantized output, no dequantize
    x = torch.randn(64, 16)
    ref, out = model(x), q(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert sqnr > 25, float(sqnr)  # the example states 25 dB


def test_custom_module_example():
    ex = _load("ext_custom_module")
    torch.manual_seed(0)
    model = ex.Net().eval()
    register_backend(compose_backend("x86", ex.MISH_RULE, name="x86+mish"))
    try:
        q = ex.quantize(model, "x86+mish")
    finally:
        unregister_backend("x86+mish")
    assert type(q.act).__name__ == "QuantizedMish"
    act = next(n for n in q.graph.nodes if n.target == "act")
    assert act.args[0].target == "conv1" and next(iter(act.users)).target == "conv2"  # int8 path
    x = torch.randn(8, 3, 12, 12)
    ref, out = model(x), q(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert sqnr > 25, float(sqnr)  # the example states 25 dB (measured 32.1)
    plain = ex.quantize(model, "x86")  # without the rule the leaf stays float
    assert isinstance(plain.act, ex.Mish)


# ------------------------------------------------ conv + add (+ relu) on onednn's fused kernel
import json
import subprocess

from fxquant.backends import cpu
from fxquant.backends.engine import engine, supported_engines

_ONEDNN = pytest.mark.skipif("onednn" not in supported_engines(),
                             reason="quantized::conv2d_add runs on the onednn engine only")
_FUSED = ["quantized::conv2d_add_relu", "quantized::conv2d_add_relu", "quantized::conv2d_add"]


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def _conv_add(ex, rule, **kw):
    torch.manual_seed(0)
    model = ex.Net().eval()
    register_backend(compose_backend("onednn", rule, name=ex.BACKEND))
    try:
        return model, ex.quantize(model, **kw)
    finally:
        unregister_backend(ex.BACKEND)


@pytest.fixture(scope="module")
def conv_add():
    ex = _load("ext_conv_add")
    model, q = _conv_add(ex, ex.CONV_ADD_RULE)
    return ex, model, q


@_ONEDNN
def test_conv_add_example(conv_add):
    from fxquant.meta import qinfo

    ex, model, q = conv_add
    # the module copies `other` (no in-place hazard on any CPU); the conv input saturates
    # onednn's int16 pair sums unless the kernels accumulate in int32 (VNNI / AMX) or the
    # activations are 7-bit, which the default qconfig of onednn picks on such CPUs
    act = cpu.default_activation_range("onednn")
    exact = act.reduce_range or cpu.full_range_activations_safe("onednn")
    assert ex.fused_kernels(q) == (_FUSED if exact else []), (cpu.cpu_features(), act.reason)
    for n in q.graph.nodes:
        if n.op == "call_module" and isinstance(q.get_submodule(n.target), ex.QuantizedConvAdd2d):
            check = qinfo(n).last("lower").detail["check"]
            assert check.startswith(("max 0 step", "max 1 step")), check  # checked, not skipped
    x = torch.randn(8, 3, 16, 16)
    other = next(e for e in supported_engines() if e != "onednn")
    with torch.no_grad(), engine(other):  # the module selects onednn for its kernel itself
        sqnr = _sqnr(model(x), q(x))
    assert sqnr > 25, sqnr  # the example states 25 dB (measured 36.2 VNNI, 30.3 AVX2)


@_ONEDNN
def test_conv_add_module_leaves_other_intact(conv_add):
    ex, _, q = conv_add
    x = torch.quantize_per_tensor(torch.rand(2, 16, 16, 16), 0.01, 0, torch.quint8)
    other = x.contiguous(memory_format=torch.channels_last)  # as a quantized conv returns it
    before = other.int_repr().clone()
    out = q.head(other, other)  # a residual: the conv's input is the added tensor
    assert torch.equal(other.int_repr(), before)
    assert out.data_ptr() != other.data_ptr()


@_ONEDNN
def test_conv_add_rule_without_the_fusions_lowers_plain_convs(conv_add):
    ex = conv_add[0]
    model, q = _conv_add(ex, ex.CONV_ADD_RULE, fusions=())
    assert ex.fused_kernels(q) == []
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert _sqnr(model(x), q(x)) > 25


_AVX2_CHILD = r"""
import importlib.util, json, sys
import torch
from fxquant.backends import cpu
from fxquant.extend import compose_backend, register_backend, unregister_backend
from fxquant.meta import qinfo
spec = importlib.util.spec_from_file_location("ext_conv_add", sys.argv[1])
ex = importlib.util.module_from_spec(spec); sys.modules["ext_conv_add"] = ex
spec.loader.exec_module(ex)
out = {"cpu": cpu.cpu_features(), "int32": cpu.full_range_activations_safe("onednn")}
for copy_other in (True, False):
    torch.manual_seed(0)
    model = ex.Net().eval()
    name = ex.BACKEND + ("" if copy_other else "-naive")
    register_backend(compose_backend("onednn", ex.conv_add_rule(copy_other), name=name))
    q = ex.quantize(model, name)
    unregister_backend(name)
    x = torch.randn(8, 3, 16, 16)
    ref, got = model(x), q(x)
    refused = [d.reason for n in q.graph.nodes for d in qinfo(n).decisions
               if str(d.action) == "keep_float" and d.pass_name == "lower_to_backend"]
    out[str(copy_other)] = {"fused": ex.fused_kernels(q), "refused": refused,
                            "sqnr": float(10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()))}
print(json.dumps(out))
"""


@_ONEDNN
@pytest.mark.skipif("avx2" not in cpu.host_flags(), reason="needs an x86 CPU with AVX2")
def test_conv_add_on_avx2_kernels():
    """ONEDNN_MAX_CPU_ISA=AVX2 runs onednn's AVX2 kernels (what last session's AMD CPU ran).
    There the default qconfig uses 7-bit activations and the example stays fused and exact;
    the naive lowering (the kernel writing into the conv's own input, head(x) + x) is refused
    by the check."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONWARNINGS": "ignore"}
    expect_int32 = cpu.engine_accumulates_int32("onednn", cpu.host_flags(), env)
    assert not expect_int32
    run = subprocess.run([sys.executable, "-c", _AVX2_CHILD, str(_EXAMPLES / "ext_conv_add.py")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["cpu"] == "avx2" and out["int32"] is False
    assert out["True"]["fused"] == _FUSED and not out["True"]["refused"]
    assert out["True"]["sqnr"] > 25, out["True"]
    naive = out["False"]
    assert naive["fused"] == _FUSED[:2], naive  # head(x) + x stays float between q/dq
    assert len(naive["refused"]) == 1 and "quantized::conv2d_add:" in naive["refused"][0] \
        and "channels-last input" in naive["refused"][0], naive["refused"]
