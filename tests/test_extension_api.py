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


def test_examples_import_only_public_names():
    files = sorted(_EXAMPLES.glob("ext_*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                ok = mod in _ALLOWED or top == "torch" or top in sys.stdlib_module_names \
                    or mod == "__future__"
                assert ok, f"{path.name} imports {mod}"


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
