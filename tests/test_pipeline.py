"""PassManager: requires/provides check, timings, verify after each pass, PassFailed naming the
pass / the passes before it / the node, user passes, dump_dir and PrintInstrument."""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.errors import FxQuantError, PassFailed
from fxquant.meta import qinfo, record
from fxquant.options import QuantOptions, options_of
from fxquant.passes import (Annotate, Fuse, InsertObservers, Normalize, PropagateQConfig,
                            prepare_pipeline)
from fxquant.pipeline import (Pass, PassContext, PassManager, PassResult, PrintInstrument,
                              dump_graph, graph_to_dot)
from fxquant.qconfig import get_default_qconfig_mapping
from fxquant.trace import record_values, trace


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.conv2(y) if hasattr(self, "conv2") else torch.flatten(y, 1)


X = torch.randn(2, 3, 6, 6)
OPTS = QuantOptions.build(backend="x86", qconfig_mapping=get_default_qconfig_mapping("x86"))


def gm_of(model=None):
    gm = trace((model or Small()).eval())
    record_values(gm, (X,))
    return gm


# ---------------------------------------------------------------------------- user passes


@dataclass(frozen=True)
class Tag:
    """A user pass: records on every call node that it ran, and its place in the order."""

    name: ClassVar[str] = "tag"
    requires: ClassVar[frozenset[str]] = frozenset({"fused"})
    provides: ClassVar[frozenset[str]] = frozenset({"tagged"})
    label: str = "x"
    order: list = field(default_factory=list, compare=False)  # where the run reached it

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.order.append(self.name)
        n = 0
        for node in gm.graph.nodes:
            if node.op.startswith("call_"):
                record(node, self.name, "tag", f"seen by the user pass ({self.label})")
                n += 1
        return PassResult(gm, False, {"tagged": n})


@dataclass(frozen=True)
class Spy:
    """Appends its name to ``order`` when it runs (a list it may share with a Tag)."""

    name: ClassVar[str] = "spy"
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    order: list = field(default_factory=list, compare=False)

    def __call__(self, gm, ctx):
        self.order.append(self.name)
        return PassResult(gm, False)


@dataclass(frozen=True)
class Breaks:
    """A bad pass: ``how`` says what it breaks."""

    name: ClassVar[str] = "breaks"
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    how: str = "target"
    broken: list = field(default_factory=list, compare=False)  # the name of the node it broke

    def __call__(self, gm, ctx):
        conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
        self.broken.append(conv.name)
        if self.how == "target":
            conv.target = "no_such_module"
        elif self.how == "meta":
            conv.meta["fxquant"] = {"decisions": ["not a Decision"]}
        elif self.how == "order":
            first = next(n for n in gm.graph.nodes if n.op == "placeholder")
            first.prepend(conv.next)  # the conv's user now runs before the conv
            # ... and before the placeholder
        elif self.how == "raise":
            raise KeyError("boom")
        return PassResult(gm, True)


def test_user_pass_is_a_pass():
    assert isinstance(Tag(), Pass) and isinstance(Normalize(), Pass)
    assert dataclasses.is_dataclass(Tag) and Tag.__dataclass_params__.frozen


def test_requires_missing_raises_naming_pass_and_what_is_missing():
    with pytest.raises(FxQuantError) as e:
        PassManager([Normalize(), Tag()], initial_facts={"traced"})
    msg = str(e.value)
    assert "pass 'tag' requires ['fused']" in msg
    assert "earlier passes: ['normalize']" in msg
    assert "fix:" in msg
    with pytest.raises(FxQuantError, match=r"pass 'normalize' requires \['traced'\].*none"):
        PassManager([Normalize()])


def test_requires_checked_before_anything_runs():
    ran = []

    @dataclass(frozen=True)
    class Marker:
        name: ClassVar[str] = "marker"
        requires: ClassVar[frozenset[str]] = frozenset()
        provides: ClassVar[frozenset[str]] = frozenset()

        def __call__(self, gm, ctx):
            ran.append(1)
            return PassResult(gm, False)

    with pytest.raises(FxQuantError, match="'annotate' requires"):
        PassManager([Marker(), Normalize(), Fuse(), Annotate()], initial_facts={"traced"})
    assert ran == []


def test_provides_accumulate_into_facts_and_initial_facts_count():
    ctx = PassContext(options=OPTS)
    pm = PassManager([PropagateQConfig(), Annotate()], initial_facts={"fused"})
    pm.run(gm_of(), ctx)
    assert ctx.facts == {"fused", "qconfig", "annotated"}


def test_timings_per_pass():
    ctx = PassContext(options=OPTS)
    passes = prepare_pipeline()
    PassManager(passes, initial_facts={"traced"}).run(gm_of(), ctx)
    assert list(ctx.timings) == [p.name for p in passes]
    assert all(isinstance(t, float) and t >= 0 for t in ctx.timings.values())
    assert set(ctx.stats) == set(ctx.timings)
    assert ctx.stats["fuse"] == {"fused": 1}


def test_run_result_aggregates_stats_and_modified():
    ctx = PassContext(options=OPTS)
    r = PassManager(prepare_pipeline(), initial_facts={"traced"}).run(gm_of(), ctx)
    assert r.modified is True
    assert r.stats == {name: sum(s.values()) for name, s in ctx.stats.items()}


def _broken(how):
    breaks = Breaks(how)
    pm = PassManager([Normalize(), Fuse(), breaks, PropagateQConfig()], initial_facts={"traced"})
    ctx = PassContext(options=OPTS)
    with pytest.raises(PassFailed) as e:
        pm.run(gm_of(), ctx)
    err = e.value
    assert err.pass_name == "breaks"
    assert err.before == ("normalize", "fuse")
    msg = str(err)
    assert "fxquant pass 'breaks' failed (after: normalize, fuse)" in msg
    assert "after pass 'breaks'" in msg
    return err, breaks.broken[0]


def test_verify_catches_bad_meta_naming_pass_before_node_module_and_source():
    err, node = _broken("meta")
    assert "is a dict, not QNodeInfo" in str(err)
    assert err.node_name == node
    assert f"node: {node}" in str(err)  # (its record is the broken part: no module path)
    assert "test_pipeline.py" in err.source and "self.conv(x)" in err.source
    assert "record()" in err.hint


def test_verify_catches_a_missing_submodule():
    err, node = _broken("target")
    assert "call_module target 'no_such_module' does not exist after pass 'breaks'" in str(err)
    assert err.node_name == node


def test_lint_failure_names_the_node_module_and_source():
    err, node = _broken("target")
    assert err.node_name == node
    assert err.module_path == "conv" and "self.conv(x)" in err.source


def test_verify_catches_a_graph_out_of_order():
    pm = PassManager([Normalize(), Breaks("order")], initial_facts={"traced"})
    with pytest.raises(PassFailed) as e:
        pm.run(gm_of(), PassContext())
    err = e.value
    assert err.pass_name == "breaks" and err.before == ("normalize",)
    assert "uses conv before it is defined after pass 'breaks'" in str(err)
    assert err.node_name == "bn"  # verify names the node that reads too early


def test_a_pass_that_raises_is_wrapped():
    pm = PassManager([Breaks("raise"), Normalize()], initial_facts={"traced"})
    with pytest.raises(PassFailed) as e:
        pm.run(gm_of(), PassContext())
    assert e.value.pass_name == "breaks" and e.value.before == ()
    assert "KeyError: 'boom'" in str(e.value) and "after: nothing" in str(e.value)
    assert isinstance(e.value.cause, KeyError)


def test_verify_off_lets_a_bad_pass_through():
    pm = PassManager([Breaks("meta")], verify=False)
    r = pm.run(gm_of(), PassContext())
    assert r.modified is True


def test_user_pass_runs_in_order_and_its_decisions_are_kept():
    order: list[str] = []
    passes = (Normalize(), Spy(order), Fuse(), Tag("mine", order), PropagateQConfig(),
              Annotate(), InsertObservers())
    ctx = PassContext(options=OPTS)
    r = PassManager(passes, initial_facts={"traced"}).run(gm_of(), ctx)
    assert order == ["spy", "tag"]
    assert list(ctx.timings) == [p.name for p in passes]
    assert ctx.stats["tag"] == {"tagged": 2}  # the fused conv and flatten
    assert "tagged" in ctx.facts
    conv = next(n for n in r.gm.graph.nodes if n.target == "conv")
    names = [d.pass_name for d in qinfo(conv).decisions]
    assert names.index("fuse") < names.index("tag") < names.index("propagate_qconfig")
    assert qinfo(conv).last("tag").reason == "seen by the user pass (mine)"


def test_user_pass_through_the_public_api():
    passes = prepare_pipeline()
    passes = passes[:2] + (Tag("api"),) + passes[2:]
    prepared = fxquant.prepare_fx(Small().eval(), get_default_qconfig_mapping("x86"), (X,),
                                  backend="x86", passes=passes)
    assert list(prepared.meta["fxquant_timings"]) == [p.name for p in passes]
    conv = next(n for n in prepared.graph.nodes if n.target == "conv")
    assert qinfo(conv).last("tag") is not None


def test_dump_dir_writes_txt_and_dot_per_pass(tmp_path):
    d = tmp_path / "dumps"
    passes = prepare_pipeline()
    PassManager(passes, initial_facts={"traced"}, dump_dir=str(d)).run(
        gm_of(), PassContext(options=OPTS))
    names = [f"{i:02d}_{p.name}" for i, p in enumerate(passes)]
    assert sorted(os.listdir(d)) == sorted([n + ".txt" for n in names] + [n + ".dot" for n in names])
    fuse_txt = (d / "01_fuse.txt").read_text()
    assert "graph():" in fuse_txt and "call_module[target=conv]" in fuse_txt
    assert "]: [fuse] fuse: Conv2d + BatchNorm2d + ReLU → ConvReLU2d" not in fuse_txt
    assert ": [fuse] fuse: Conv2d + BatchNorm2d + ReLU → ConvReLU2d" in fuse_txt
    assert "# conv_1: [fuse] fuse:" in fuse_txt  # one decision line per node, by node name
    assert "target=bn" not in fuse_txt  # the dump is the graph AFTER that pass
    assert "target=bn" in (d / "00_normalize.txt").read_text()
    dot = (d / "04_insert_observers.dot").read_text()
    assert dot.startswith("digraph G {") and dot.rstrip().endswith("}")
    assert '"x" -> "activation_post_process_0";' in dot
    assert "call_module: conv" in dot


def test_dump_through_the_public_api(tmp_path):
    fxquant.prepare_fx(Small().eval(), get_default_qconfig_mapping("x86"), (X,), backend="x86",
                       dump_dir=str(tmp_path))
    assert (tmp_path / "02_propagate_qconfig.txt").exists()
    assert (tmp_path / "04_insert_observers.dot").exists()


def test_dump_helpers_match_the_graph():
    gm = gm_of()
    assert dump_graph(gm).startswith(str(gm.graph))
    dot = graph_to_dot(gm)
    assert dot.count("->") == sum(len(n.all_input_nodes) for n in gm.graph.nodes)


def test_print_instrument(capsys):
    passes = (Normalize(), Fuse())
    PassManager(passes, initial_facts={"traced"}, instruments=[PrintInstrument()]).run(
        gm_of(), PassContext())
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[fxquant] 00 normalize") and "modified=False" in lines[0]
    assert lines[1].startswith("[fxquant] 01 fuse") and "modified=True" in lines[1]
    assert lines[1].endswith("{'fused': 1}") and " ms " in lines[1]


def test_passes_never_print(capsys):
    fxquant.prepare_fx(Small().eval(), get_default_qconfig_mapping("x86"), (X,), backend="x86")
    assert capsys.readouterr().out == ""


def test_instrument_hooks_called_around_each_pass():
    calls = []

    class Rec:
        def before_pass(self, p, gm, ctx):
            calls.append(("before", p.name, p.name in ctx.timings))

        def after_pass(self, p, result, ctx, index):
            calls.append(("after", p.name, index, p.name in ctx.timings))

    PassManager((Normalize(), Fuse()), initial_facts={"traced"}, instruments=[Rec()]).run(
        gm_of(), PassContext())
    assert calls == [("before", "normalize", False), ("after", "normalize", 0, True),
                     ("before", "fuse", False), ("after", "fuse", 1, True)]


def test_a_missing_mapping_names_the_option_and_the_pass():
    with pytest.raises(FxQuantError) as e:
        PassContext().options.require_mapping("propagate_qconfig")
    assert "option 'qconfig_mapping' is needed by pass 'propagate_qconfig'" in str(e.value)
    assert PassContext(options=OPTS).options.require_mapping("x") is OPTS.qconfig_mapping
    with pytest.raises(PassFailed, match="'qconfig_mapping' is needed by pass 'propagate_qconfig'"):
        PassManager([PropagateQConfig()], initial_facts={"fused"}).run(gm_of(), PassContext())


def test_options_are_typed_frozen_and_hold_the_resolved_backend():
    from fxquant.backends.registry import get_backend

    prepared = fxquant.prepare_fx(Small().eval(), get_default_qconfig_mapping("x86"), (X,),
                                  backend="x86")
    opts = options_of(prepared)
    assert isinstance(opts, QuantOptions) and opts.is_qat is False
    assert opts.backend is get_backend("x86") and opts.backend_name == "x86"
    assert opts.trace_config is not None and opts.observer_factory_wrapper is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.__setattr__("is_qat", True)
    assert not hasattr(PassContext(), "store")
    assert "example_inputs" not in {f.name for f in dataclasses.fields(QuantOptions)}


def test_an_options_dict_is_read_as_quant_options():
    from fxquant.backends.registry import get_backend

    ctx = PassContext(options={"backend": "x86", "is_qat": True, "example_inputs": None})
    assert isinstance(ctx.options, QuantOptions) and ctx.options.is_qat is True
    assert ctx.options.backend is get_backend("x86")
    assert PassContext().options.backend is get_backend("auto")  # as before: "auto"
    with pytest.raises(FxQuantError, match=r"unknown option\(s\) \['backnd'\]"):
        PassContext(options={"backnd": "x86"})
    with pytest.raises(FxQuantError, match="must be QuantOptions"):
        PassContext(options=["x86"])  # type: ignore[arg-type]


def test_options_pickle_the_backend_by_name_and_deepcopy_shares_it():
    import copy
    import pickle

    from fxquant.extend import compose_backend

    mine = compose_backend("x86", name="x86-not-registered")
    opts = QuantOptions.build(backend=mine, qconfig_mapping=OPTS.qconfig_mapping)
    assert opts.backend is mine and copy.deepcopy(opts).backend is mine
    again = pickle.loads(pickle.dumps(OPTS))
    assert again.resolved_backend is None and again.backend is OPTS.backend  # looked up
    with pytest.raises(FxQuantError, match="unknown backend 'x86-not-registered'"):
        pickle.loads(pickle.dumps(opts)).backend
    with pytest.raises(FxQuantError, match="is not the given backend"):
        QuantOptions(backend_name="qnnpack", resolved_backend=mine)


# the saturation warning keys on the backend's name (backend policy, issue 12 item 2)
@pytest.mark.filterwarnings("ignore::fxquant.errors.SaturationWarning")
def test_an_unregistered_backend_object_runs_prepare_and_convert():
    from fxquant.extend import compose_backend

    mine = compose_backend("x86", name="x86-not-registered")
    prepared = fxquant.prepare_fx(Small().eval(), get_default_qconfig_mapping("x86"), (X,),
                                  backend=mine)
    assert options_of(prepared).backend is mine
    prepared(X)
    quantized = fxquant.convert_fx(prepared)
    assert options_of(quantized).backend is mine
    assert torch.isfinite(quantized(X)).all()


@pytest.mark.parametrize("entry", [fxquant.prepare_fx, fxquant.prepare_qat_fx])
def test_prepare_entries_refuse_an_unknown_keyword(entry):
    with pytest.raises(TypeError, match=f"{entry.__name__}\\(\\) got an unexpected keyword "
                                        f"argument 'leaf_module'"):
        entry(Small(), get_default_qconfig_mapping("x86"), (X,), leaf_module=[nn.Conv2d])


def test_every_default_pass_declares_name_requires_provides():
    from fxquant.passes import Cleanup, Convert, LowerToBackend

    names = Counter()
    for cls in (Normalize, Fuse, PropagateQConfig, Annotate, InsertObservers, Convert,
                LowerToBackend, Cleanup):
        p = cls()
        assert isinstance(p, Pass)
        assert isinstance(cls.requires, frozenset) and isinstance(cls.provides, frozenset)
        names[p.name] += 1
        module = cls.__module__.rsplit(".", 1)[1]
        assert p.name == module  # == file stem
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.__setattr__("x", 1)
    assert max(names.values()) == 1


def test_a_pass_run_twice_keeps_both_stats():
    from fxquant.passes import Fuse, Normalize

    pm = PassManager([Normalize(), Fuse(), Fuse()], initial_facts={"traced"})
    ctx = PassContext()
    pm.run(gm_of(), ctx)
    assert "fuse" in ctx.stats and "fuse#2" in ctx.stats
    assert ctx.stats["fuse#2"] == {}  # nothing left to fuse the second time
