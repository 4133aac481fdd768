"""The shared vocabulary (fxquant.records) and the layering it allows:

1. the enum words are their text: they compare, hash, format and serialize as plain strings,
   and records built from text (a file saved before the enums, a user's test) get the members;
2. after the whole pipeline every decision the library recorded is an :class:`Action` (no word
   outside the vocabulary), every role a :class:`Role`, every qkind a :class:`QKind`;
3. a non-match carries its :class:`MatchFailure` kind, and fuse decides on it, not on the text;
   a qconfig rule's reason carries its :class:`QConfigRule` kind;
4. a save / load round trip gives the same records, with the members back;
5. no library code parses reason text; no library module imports a private name (``_x``) from
   another package layer, and the module-level imports of fxquant/ and passes/ have no cycle.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.meta import Decision, QNodeInfo, qinfo, qinfo_or_none, record
from fxquant.patterns import Chain, NoMatch, Op, find_matches
from fxquant.records import (STATUS_COLORS, STATUSES, Action, MatchFailure, QKind, Role, Stage,
                             Status)
from fxquant.report import rows
from fxquant.serialize import read_graph
from tests.models import TinyResNet, WithFloatHead, build, calibration_batches

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (2, 3, 8, 8)


# ------------------------------------------------------------------------------ the words
def test_words_are_their_text():
    assert Action.FUSE == "fuse" and "keep_float" == Action.KEEP_FLOAT
    assert f"{Action.FUSE}" == str(Action.FUSE) == "fuse" and f"{Status.INT8:>6}" == "  int8"
    assert json.dumps({"a": Action.LOWER, Role.OP: 1}) == '{"a": "lower", "op": 1}'
    assert {"fuse": 1}[Action.FUSE] == 1 and {Action.FUSE: 1}["fuse"] == 1
    assert Status.DYNAMIC == QKind.DYNAMIC == Action.DYNAMIC
    assert STATUSES[0] is Status.INT8 and set(STATUS_COLORS) == set(Status)


def test_records_from_text_get_the_members():
    d = Decision("fuse", "not_fused", "why")
    assert d.action is Action.NOT_FUSED and d == Decision("fuse", Action.NOT_FUSED, "why")
    assert str(d) == "[fuse] not_fused: why"
    own = Decision("my_pass", "tag", "a user pass's own word")
    assert own.action == "tag" and not isinstance(own.action, Action)
    info = QNodeInfo(role="observer", qkind="dynamic")
    assert info.role is Role.OBSERVER and info.qkind is QKind.DYNAMIC
    assert QNodeInfo().role is Role.OP and QNodeInfo().qkind is None


def test_qconfig_reasons_know_their_rule():
    import copy
    import pickle

    from fxquant.qconfig import QConfigMapping, get_default_qconfig
    from fxquant.records import QConfigRule, RuleReason, rule_of

    qc = get_default_qconfig("x86")
    m = (QConfigMapping().set_global(qc).set_object_type(nn.Linear, qc)
         .set_module_name_regex(r"blocks\..*", qc).set_module_name("blocks.1", None)
         .set_module_name_object_type_order("blocks.2", F.linear, 0, qc))
    cases = {("other", nn.Conv2d, None): QConfigRule.GLOBAL,
             ("other", nn.Linear, None): QConfigRule.OBJECT_TYPE,
             ("blocks.0", nn.Linear, None): QConfigRule.MODULE_NAME_REGEX,
             ("blocks.1", nn.Linear, None): QConfigRule.MODULE_NAME,
             ("blocks.2", F.linear, 0): QConfigRule.ORDER}
    for (path, kind, index), rule in cases.items():
        _, reason = m.resolve(path, kind, index)
        assert isinstance(reason, RuleReason) and rule_of(reason) is rule, (path, reason)
        assert rule_of(copy.deepcopy(reason)) is rule
        assert rule_of(pickle.loads(pickle.dumps(reason))) is rule
    assert m.resolve("blocks.1", nn.Linear) == (None, "module_name 'blocks.1' → None")
    assert rule_of("global") is None  # plain text (read back from a file) names no rule


# ------------------------------------------------------------------------------ the pipeline
def _static(factory=TinyResNet):
    mapping = fxquant.get_default_qconfig_mapping("x86")
    if factory is WithFloatHead:
        mapping.set_module_name("head", None)
    prepared = fxquant.prepare_fx(build(factory), mapping, (torch.randn(*SHAPE),), backend="x86")
    with torch.no_grad():
        for batch in calibration_batches(SHAPE, n=2):
            prepared(batch)
    return prepared, fxquant.convert_fx(prepared)


def _records(gm: fx.GraphModule) -> list[QNodeInfo]:
    return [info for info in map(qinfo_or_none, gm.graph.nodes) if info is not None]


@pytest.mark.parametrize("factory", [TinyResNet, WithFloatHead])
def test_library_records_only_words_of_the_vocabulary(factory):
    prepared, quantized = _static(factory)
    for gm in (prepared, quantized):
        for info in _records(gm):
            assert isinstance(info.role, Role), info
            assert info.qkind is None or isinstance(info.qkind, QKind), info
            for d in info.decisions:
                assert isinstance(d.action, Action), d
    assert isinstance(fxquant.report.graph_stage(quantized), Stage)
    statuses = {r.status for r in rows(quantized)}
    assert statuses and all(isinstance(s, Status) for s in statuses)
    if factory is WithFloatHead:
        assert Status.FLOAT in statuses and Status.INT8 in statuses


def test_dynamic_qkind_is_the_member():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    quantized = fxquant.quantize_dynamic_fx(model, example_inputs=(torch.randn(2, 8),))
    kinds = {info.qkind for info in _records(quantized) if info.qkind is not None}
    assert kinds == {QKind.DYNAMIC}
    assert any(d.action is Action.DYNAMIC for info in _records(quantized) for d in info.decisions)


# ------------------------------------------------------------------------------ NoMatch
class _TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) + y


def test_no_match_kinds():
    gm = fx.symbolic_trace(_TwoUsers())
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    conv_relu = Chain(Op(nn.Conv2d), Op(F.relu))
    m = conv_relu.match(nodes["relu"], modules)
    assert isinstance(m, NoMatch) and not m
    assert m.kind is MatchFailure.MULTIPLE_USERS and m.node == "conv"
    assert conv_relu.match(nodes["add"], modules).kind is MatchFailure.NOT_THIS_OP
    picky = Op(nn.Conv2d, check=lambda node, mods: False)
    assert picky.matches(nodes["conv"], modules).kind is MatchFailure.CHECK_FAILED
    declined = NoMatch("a rule's own words")
    assert declined.kind is MatchFailure.DECLINED and declined.reason == "a rule's own words"
    heard = []
    find_matches(gm.graph, [conv_relu], modules, declined=lambda r, p, no: heard.append(no.kind))
    assert heard == [MatchFailure.MULTIPLE_USERS]


def test_fuse_records_a_declined_chain_once_with_its_kind():
    prepared = fxquant.prepare_fx(_TwoUsers().eval(), fxquant.get_default_qconfig_mapping("x86"),
                                  (torch.randn(1, 3, 8, 8),), backend="x86")
    conv = next(n for n in prepared.graph.nodes if qinfo(n).module_path == "conv"
                and n.op == "call_module" and qinfo(n).role == Role.OP)
    declined = [d for d in qinfo(conv).decisions if d.action is Action.NOT_FUSED]
    assert declined, qinfo(conv).decisions
    keys = [(d.detail["pattern"], d.detail["failure"], d.detail["at"]) for d in declined]
    assert len(keys) == len(set(keys))
    assert all(d.detail["failure"] is MatchFailure.MULTIPLE_USERS for d in declined)


def test_explain_match_gives_the_kind():
    from fxquant.extend import explain_match

    gm = fx.symbolic_trace(_TwoUsers())
    (why,) = explain_match(gm, Chain(Op(nn.Conv2d), Op(F.relu)), "relu")
    assert not why.matched and why.kind is MatchFailure.MULTIPLE_USERS and "users" in why.reason


# ------------------------------------------------------------------------------ artifacts
def test_saved_records_read_back_identical(tmp_path):
    """read_graph gives back the records from the file's JSON (no model run): equal to the
    saved ones, with the enum members back, from words written as plain text."""
    _, quantized = _static()
    path = fxquant.save(quantized, tmp_path / "m.fxq")
    doc = torch.load(path, weights_only=True)["json"]
    assert '"keep_float"' in doc or '"lower"' in doc  # the words are written as their text
    assert "Action." not in doc and "Role." not in doc and "QKind." not in doc
    before, after = _records(quantized), _records(read_graph(path))
    assert [i.decisions for i in before] == [i.decisions for i in after]
    assert [(i.role, i.qkind) for i in before] == [(i.role, i.qkind) for i in after]
    for info in after:
        assert isinstance(info.role, Role)
        assert all(isinstance(d.action, Action) for d in info.decisions)


def test_a_user_pass_word_survives_save_and_read_back(tmp_path):
    _, quantized = _static()
    node = next(n for n in quantized.graph.nodes if n.op == "call_module")
    record(node, "my_pass", "tag", "a user pass's own word")
    path = fxquant.save(quantized, tmp_path / "m.fxq")
    tags = [d for info in _records(read_graph(path)) for d in info.decisions
            if d.pass_name == "my_pass"]
    assert [(d.action, d.reason) for d in tags] == [("tag", "a user pass's own word")]


# ------------------------------------------------------------------------------ layering
def _library_files() -> list[Path]:
    files = sorted((ROOT / "fxquant").rglob("*.py")) + sorted((ROOT / "passes").rglob("*.py"))
    assert len(files) > 40, files
    return files


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["fxquant", "passes"] + parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """The package a module belongs to: fxquant, fxquant.backends, fxquant.nn, fxquant.passes."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_private_import_across_package_layers():
    offenders = []
    for path in _library_files():
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _absolute(module, path.name == "__init__.py", node)
            if not source.startswith("fxquant") or _layer(source) == _layer(module):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                                     f"{alias.name} from {source}")
    assert not offenders, "private names imported across layers:\n" + "\n".join(offenders)


_REASONS = ("reason", "qconfig_reason")


def test_no_library_code_parses_reason_text():
    """Code decides on kinds (Action, MatchFailure, QConfigRule ...), never on the wording of a
    reason: no ``"..." in x.reason``, no ``x.reason.startswith(...)`` and the like."""
    offenders = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            parsed = None
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn))
                                                     for op in node.ops):
                parsed = next((c for c in node.comparators if isinstance(c, ast.Attribute)
                               and c.attr in _REASONS), None)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("startswith", "endswith", "split", "partition",
                                           "find", "index", "count") \
                    and isinstance(node.func.value, ast.Attribute) \
                    and node.func.value.attr in _REASONS:
                parsed = node.func.value
            if parsed is not None:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "reason text parsed:\n" + "\n".join(offenders)


def _module_level_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """fxquant modules imported when ``module`` is imported (top-level statements, not inside
    functions or ``if TYPE_CHECKING``)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path.name == "__init__.py", node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def test_no_import_cycles():
    paths = {_module_name(p): p for p in _library_files()}
    graph = nx.DiGraph()
    graph.add_nodes_from(paths)
    for module, path in paths.items():
        graph.add_edges_from((module, dep) for dep in _module_level_imports(path, module,
                                                                            set(paths)))
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "module-level import cycles:\n" + "\n".join(
        " -> ".join(c + [c[0]]) for c in cycles[:10])


def test_the_vocabulary_sits_at_the_bottom():
    """records and graph_edit import nothing from fxquant (every layer may use them); the node
    readers (status) only the records and the pattern names, never the report or viz."""
    paths = {_module_name(p): p for p in _library_files()}
    deps = {m: _all_imports(paths[m], m) for m in ("fxquant.records", "fxquant.graph_edit",
                                                   "fxquant.status", "fxquant.viz")}
    assert deps["fxquant.records"] == set() and deps["fxquant.graph_edit"] == set()
    assert deps["fxquant.status"] <= {"fxquant.meta", "fxquant.patterns", "fxquant.records"}
    assert "fxquant.report" not in deps["fxquant.viz"]


def _every_import(path: Path, module: str, modules: set[str]) -> set[str]:
    """fxquant modules ``module`` imports anywhere (functions included; ``if TYPE_CHECKING``
    blocks not): ``from a import b`` counts as ``a.b`` where that is a module, else ``a``."""
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path.name == "__init__.py", node)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            names = subs + ([base] if len(subs) < len(node.names) else [])
        else:
            continue
        out.update(n for n in names if n in modules and n != module)
    return out


def test_no_import_cycles_through_lazy_imports():
    """No cycle either among the imports made inside functions (they only postpone a cycle).
    Not counted: ``import fxquant`` of the package root (loaded before any submodule, which
    re-exports the API; used by the CLI, which nothing imports, and for ``__version__``). Counted as
    edges: the registry's loading of the built-in backend files by name."""
    paths = {_module_name(p): p for p in _library_files()}
    graph = nx.DiGraph()
    for module, path in paths.items():
        graph.add_edges_from((module, dep) for dep in _every_import(path, module, set(paths))
                             if dep != "fxquant")
    for builtin in ("x86", "fbgemm", "onednn", "qnnpack"):
        graph.add_edge("fxquant.backends.registry", f"fxquant.backends.{builtin}")
    cycles = [c for c in nx.simple_cycles(graph)][:10]
    assert not cycles, "import cycles (functions included):\n" + "\n".join(
        " -> ".join(c + [c[0]]) for c in cycles)


def _all_imports(path: Path, module: str) -> set[str]:
    """Every fxquant module named by an import anywhere in the file (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.add(_absolute(module, path.name == "__init__.py", node))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("fxquant")}
