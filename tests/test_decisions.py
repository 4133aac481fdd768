"""Decisions live on the nodes: after prepare_fx and after convert_fx every call_* node carries at
least one Decision with its pass name and a reason; nodes kept float say why."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxquant
from fxquant.lint import verify
from fxquant.meta import qinfo
from fxquant.pipeline import Instrument
from tests.models import STATIC_CASES, MLPBnReLU, ReLUSpellings, build, calibration_batches

CASES = STATIC_CASES + [("relu_spellings", ReLUSpellings, (2, 4, 5, 5)),
                        ("mlp_bn_relu", MLPBnReLU, (8, 32))]
PREPARE_PASSES = ("normalize", "fuse", "propagate_qconfig", "annotate", "insert_observers")
CONVERT_PASSES = ("convert", "lower_to_backend", "cleanup")


def mapping_for(name):
    mapping = fxquant.get_default_qconfig_mapping("x86")
    if name == "float_head":
        mapping.set_module_name("head", None)
    return mapping


def check_decided(gm: fx.GraphModule, where: str) -> None:
    undecided = []
    for node in gm.graph.nodes:
        info = qinfo(node)
        for d in info.decisions:
            assert isinstance(d.pass_name, str) and d.pass_name, (where, node.name, d)
            assert isinstance(d.reason, str) and d.reason.strip(), (where, node.name, d)
            assert d.action, (where, node.name, d)
        if node.op.startswith("call_") and not info.decisions:
            undecided.append(node.format_node())
    assert not undecided, f"{where}: call nodes without a decision: {undecided}"


class CheckAfterEachPass(Instrument):
    """After each pass: every decision well formed; from propagate_qconfig on (where every op
    gets a qconfig decision) every call node carries one."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def after_pass(self, p, result, ctx, index):
        self.seen.append(p.name)
        verify(result.gm, after=p.name)  # (the PassManager verifies too; this proves it here)
        if p.name in ("normalize", "fuse"):
            for node in result.gm.graph.nodes:
                for d in qinfo(node).decisions:
                    assert d.pass_name and d.reason.strip(), (p.name, node.name, d)
        else:
            check_decided(result.gm, f"after {p.name}")


def quantize(name, factory, shape, instrument=None):
    model = build(factory)
    example = (torch.randn(*shape),)
    insts = [instrument] if instrument else []
    prepared = fxquant.prepare_fx(model, mapping_for(name), example, backend="x86",
                                  instruments=insts)
    for batch in calibration_batches(shape, n=2):
        prepared(batch)
    converted = fxquant.convert_fx(prepared, instruments=insts)
    return prepared, converted


@pytest.fixture(scope="module")
def quantized():
    out = {}
    for name, factory, shape in CASES:
        inst = CheckAfterEachPass()
        out[name] = quantize(name, factory, shape, inst) + (inst,)
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_every_call_node_decided_after_prepare_and_convert(quantized, name):
    prepared, converted, inst = quantized[name]
    check_decided(prepared, f"{name} prepared")
    check_decided(converted, f"{name} converted")
    assert inst.seen == list(PREPARE_PASSES + CONVERT_PASSES)  # checked after each pass


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_kernels_carry_the_history_of_every_pass(quantized, name):
    _, converted, _ = quantized[name]
    lowered = [n for n in converted.graph.nodes if qinfo(n).kernel]
    assert lowered
    for node in lowered:
        passes = [d.pass_name for d in qinfo(node).decisions]
        for p in ("propagate_qconfig", "annotate", "lower_to_backend"):
            assert p in passes, (node.name, passes)
        assert qinfo(node).last().action == "lower"


def test_float_head_says_module_name_head(quantized):
    prepared, converted, _ = quantized["float_head"]
    for gm in (prepared, converted):
        head = [n for n in gm.graph.nodes if n.op.startswith("call_")
                and qinfo(n).module_path.startswith("head")]
        assert len(head) == 2  # flatten (was nn.Flatten) and the Linear
        for node in head:
            keep = qinfo(node).last("keep_float")
            assert keep is not None and keep.pass_name == "annotate"
            assert "module_name 'head'" in keep.reason
            assign = qinfo(node).last("assign_qconfig")
            assert assign.reason.startswith("module_name 'head'")
            assert "→ None" in assign.reason
    assert type(converted.get_submodule("head.1")) is nn.Linear


def test_fused_relu_spellings_are_explained(quantized):
    _, converted, _ = quantized["relu_spellings"]
    convs = [n for n in converted.graph.nodes if n.op == "call_module"]
    assert len(convs) == 6
    for node in convs:
        fuse = qinfo(node).last("fuse")
        assert fuse is not None and fuse.reason.startswith("Conv2d + ReLU → ConvReLU2d")
        assert qinfo(node).kernel == "quantized::conv2d_relu"


# ------------------------------------------------------------------------- kept float: why


@fx.wrap
def user_fn(x):
    return x.clamp(-1, 1) * 0.5


class LeafBlock(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.leaf = LeafBlock()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        values, _ = torch.sort(y, dim=1)
        top = torch.topk(y, 2, dim=1).values
        z = user_fn(self.leaf(values))
        return self.fc(torch.cumsum(z, 1).sum((2, 3))), top


def test_kept_float_nodes_say_why():
    x = torch.randn(2, 3, 6, 6)
    prepared = fxquant.prepare_fx(Mixed().eval(), fxquant.get_default_qconfig_mapping("x86"),
                                  (x,), backend="x86", leaf_modules=[LeafBlock])
    prepared(x)
    converted = fxquant.convert_fx(prepared)
    # (the exact wording is pinned in tests/passes/test_annotate.py; here: the reason names
    # the op and why it stays float)
    want = {torch.sort: "sort", torch.topk: "topk", user_fn: "user_fn", "leaf": "LeafBlock",
            torch.cumsum: "cumsum"}
    for gm in (prepared, converted):
        check_decided(gm, "mixed")
        for target, op_name in want.items():
            (node,) = [n for n in gm.graph.nodes if n.target == target
                       and n.op.startswith("call_")]
            keep = qinfo(node).last("keep_float")
            assert keep is not None and keep.pass_name == "annotate", (target, qinfo(node))
            assert op_name in keep.reason, (target, keep.reason)
            assert "no quantized kernel" in keep.reason or "not a tensor" in keep.reason, \
                keep.reason
    torch.testing.assert_close(converted(x)[1], prepared(x)[1], atol=0.1, rtol=0.1)
