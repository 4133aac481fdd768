"""propagate_qconfig: every op node gets the QConfig its QConfigMapping resolves to, with the
winning rule as the reason. The graph itself never changes."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant.errors import PassFailed
from fxquant.meta import qinfo
from fxquant.passes import Fuse, Normalize, PropagateQConfig
from fxquant.qconfig import QConfigMapping, get_default_qconfig, get_default_qconfig_mapping
from tests.passes.graphs import (assert_every_call_decided, call_nodes, decisions, run_passes,
                                 structure, traced)

QC = get_default_qconfig("x86")
QC2 = get_default_qconfig("qnnpack")


class Sub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.act(torch.cumsum(self.fc(x), 1)).relu()  # (cumsum: nothing fuses here)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.sub = Sub()
        self.head = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())

    def forward(self, x, y):
        a = self.fc(x) + y
        b = torch.add(self.sub(a), y)
        return self.head(b) * 2


X, Y = torch.randn(3, 4), torch.randn(3, 4)


def propagate(mapping, model=None):
    model = (model or Net()).eval()
    gm = traced(model, X, Y)
    prefix, _ = run_passes(gm, [Normalize(), Fuse()])
    before = structure(prefix.gm)
    r, ctx = run_passes(prefix.gm, [PropagateQConfig()], {"qconfig_mapping": mapping},
                        facts={"fused"})
    assert structure(r.gm) == before  # the graph never changes
    assert r.modified is False
    assert_every_call_decided(r.gm, "propagate_qconfig")
    for n in call_nodes(r.gm):
        (d,) = decisions(n, "propagate_qconfig")
        assert d.action == "assign_qconfig" and qinfo(n).has_qconfig
        assert d.reason.startswith(qinfo(n).qconfig_reason)
    return r


def by_target(gm, target):
    return [n for n in call_nodes(gm) if n.target == target]


def of_module(gm, path):
    """The call of module ``path``: the module itself, or the function normalize rewrote a
    stateless module into (nn.Sigmoid → torch.sigmoid), which keeps the module's path."""
    return [n for n in call_nodes(gm) if n.target == path or (
        n.op == "call_function" and qinfo(n).module_path == path
        and isinstance(qinfo(n).original, type))]


def reason(node):
    return qinfo(node).qconfig_reason


def test_before_expected_and_stats_with_global_only():
    r = propagate(QConfigMapping().set_global(QC))
    # Before/Expected: structure identical (checked in propagate); every node got QC from global
    assert structure(r.gm) == ["placeholder", "placeholder", "call_module:Linear",
                               "call_function:torch.add", "call_module:Linear",
                               "call_function:torch.cumsum", "call_function:F.relu6",
                               "call_function:F.relu",
                               "call_function:torch.add", "call_module:Linear",
                               "call_function:torch.sigmoid", "call_function:torch.mul", "output"]
    assert all(qinfo(n).qconfig is QC and reason(n) == "global" for n in call_nodes(r.gm))
    assert r.stats == {"quantizable": 10}
    assert "global → QConfig(activation=HistogramObserver(quint8" in \
        decisions(call_nodes(r.gm)[0], "propagate_qconfig")[0].reason


def test_no_placeholder_or_output_gets_a_qconfig_decision():
    r = propagate(QConfigMapping().set_global(QC))
    for n in r.gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            assert not decisions(n, "propagate_qconfig") and not qinfo(n).has_qconfig


def test_empty_mapping_leaves_everything_float():
    r = propagate(QConfigMapping())
    assert r.stats == {"float": 10}
    for n in call_nodes(r.gm):
        assert qinfo(n).qconfig is None
        assert decisions(n, "propagate_qconfig")[0].reason == "global → None"


def test_module_name_wins_over_global_and_covers_children():
    r = propagate(QConfigMapping().set_global(QC).set_module_name("head", None))
    lin, sig = of_module(r.gm, "head.0") + of_module(r.gm, "head.1")
    for n, child in ((lin, "head.0"), (sig, "head.1")):
        assert qinfo(n).qconfig is None
        assert reason(n) == f"module_name 'head' (parent of '{child}') → None"
    mul = by_target(r.gm, torch.mul)[0]  # called in the root's forward: global
    assert qinfo(mul).qconfig is QC and reason(mul) == "global"
    assert r.stats == {"quantizable": 8, "float": 2}


def test_module_name_reaches_function_calls_inside_the_module():
    r = propagate(QConfigMapping().set_global(QC).set_module_name("sub", QC2))
    relu = by_target(r.gm, F.relu)[0]  # x.relu() in Sub.forward, normalized
    assert qinfo(relu).module_path == "sub"
    assert qinfo(relu).qconfig is QC2 and reason(relu) == "module_name 'sub'"
    outer_add = by_target(r.gm, torch.add)
    assert all(qinfo(n).qconfig is QC for n in outer_add)


def test_object_type_for_module_class():
    r = propagate(QConfigMapping().set_global(QC).set_object_type(nn.Linear, QC2))
    for n in call_nodes(r.gm):
        if n.op == "call_module" and isinstance(r.gm.get_submodule(n.target), nn.Linear):
            assert qinfo(n).qconfig is QC2 and reason(n) == "object_type nn.Linear"
        else:
            assert reason(n) == "global"


@pytest.mark.parametrize("key", [operator.add, torch.add], ids=["operator.add", "torch.add"])
def test_object_type_matches_written_and_canonical_spelling(key):
    """``self.fc(x) + y`` is operator.add as written and torch.add after normalize: a rule for
    either spelling applies to it."""
    r = propagate(QConfigMapping().set_global(QC).set_object_type(key, None))
    first, second = by_target(r.gm, torch.add)
    assert qinfo(first).original is operator.add and qinfo(second).original is torch.add
    assert qinfo(first).qconfig is None
    assert (qinfo(second).qconfig is None) == (key is torch.add)


def test_object_type_of_original_module_class_after_normalize():
    """x.relu() is F.relu after normalize: "relu" (method) and F.relu
    rules both reach it."""
    for key in ("relu", F.relu):
        r = propagate(QConfigMapping().set_global(QC).set_object_type(key, None))
        (relu,) = by_target(r.gm, F.relu)
        assert qinfo(relu).qconfig is None, key


def test_object_type_of_fused_module_is_its_first_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, y):
            return F.relu(self.fc(x)) + y

    r = propagate(QConfigMapping().set_global(QC).set_object_type(nn.Linear, None), M())
    (fused,) = [n for n in call_nodes(r.gm) if n.op == "call_module"]
    assert type(r.gm.get_submodule(fused.target)).__name__ == "LinearReLU"
    assert qinfo(fused).qconfig is None and reason(fused) == "object_type nn.Linear → None"


def test_regex():
    r = propagate(QConfigMapping().set_global(QC).set_module_name_regex(r"sub\..*", QC2))
    fc, act = of_module(r.gm, "sub.fc") + of_module(r.gm, "sub.act")
    assert qinfo(fc).qconfig is QC2 and reason(fc) == r"module_name_regex 'sub\\..*'"
    assert qinfo(act).qconfig is QC2
    assert qinfo(of_module(r.gm, "fc")[0]).qconfig is QC


def test_module_name_object_type_order_for_functions():
    mapping = QConfigMapping().set_global(QC).set_module_name_object_type_order(
        "", operator.add, 0, QC2)
    r = propagate(mapping)
    first, second = by_target(r.gm, torch.add)
    assert qinfo(first).qconfig is QC2
    assert reason(first) == "module_name_object_type_order ('', operator.add, 0)"
    assert qinfo(second).qconfig is QC


def test_order_index_counts_calls_as_written():
    mapping = QConfigMapping().set_global(QC).set_module_name_object_type_order(
        "", torch.add, 0, None)
    r = propagate(mapping)
    first, second = by_target(r.gm, torch.add)  # x + y, then torch.add(...)
    assert qinfo(first).qconfig is QC
    assert qinfo(second).qconfig is None


def test_precedence_module_name_over_regex_over_object_type():
    mapping = (QConfigMapping().set_global(QC).set_object_type(nn.Linear, None)
               .set_module_name_regex("sub.*", QC2).set_module_name("sub.fc", QC))
    r = propagate(mapping)
    assert reason(of_module(r.gm, "sub.fc")[0]) == "module_name 'sub.fc'"
    assert reason(of_module(r.gm, "sub.act")[0]) == "module_name_regex 'sub.*'"
    assert reason(of_module(r.gm, "fc")[0]) == "object_type nn.Linear → None"


def test_default_mapping_object_types():
    r = propagate(get_default_qconfig_mapping("x86"))
    (sig,) = of_module(r.gm, "head.1")
    assert reason(sig) == "object_type nn.Sigmoid"
    assert "FixedQParamsObserver" in decisions(sig, "propagate_qconfig")[0].reason


def test_none_reason_says_none_once():
    r = propagate(QConfigMapping().set_global(QC).set_module_name("head", None))
    d = decisions(of_module(r.gm, "head.0")[0], "propagate_qconfig")[0]
    assert d.reason.count("→ None") == 1


def test_missing_mapping_option_fails_naming_pass_and_option():
    gm = traced(Net().eval(), X, Y)
    prefix, _ = run_passes(gm, [Normalize(), Fuse()])
    with pytest.raises(PassFailed) as e:
        run_passes(prefix.gm, [PropagateQConfig()], {}, facts={"fused"})
    msg = str(e.value)
    assert "propagate_qconfig" in msg and "qconfig_mapping" in msg
    assert e.value.pass_name == "propagate_qconfig"


def test_requires_fused():
    from fxquant.errors import FxQuantError
    from fxquant.pipeline import PassManager

    with pytest.raises(FxQuantError, match="propagate_qconfig.*fused"):
        PassManager([Normalize(), PropagateQConfig()], initial_facts={"traced"})


def test_unchanged_graph_rerun_only_adds_decisions():
    mapping = QConfigMapping().set_global(QC)
    r = propagate(mapping)
    code = r.gm.code
    again, _ = run_passes(r.gm, [PropagateQConfig()], {"qconfig_mapping": mapping},
                          facts={"fused"})
    assert again.modified is False and again.gm.code == code
    assert again.stats == {"quantizable": 10}
