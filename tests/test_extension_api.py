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
