"""The pattern DSL and matcher.

Patterns are data. An op matcher says what one node must be (a module class, a function, a
method name); a :class:`Chain` is a root-last sequence of op matchers where each node feeds
the next through its first argument and interior nodes have no other users:

    Chain(Op(nn.Conv2d), Op(nn.BatchNorm2d), Op(F.relu))

A non-match is a falsy :class:`NoMatch`: its ``kind`` (:class:`~fxquant.records.MatchFailure`)
is what code decides on, its ``reason`` what a person reads, so a declined fusion is explainable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch.fx as fx
import torch.nn as nn

from fxquant.records import MatchFailure


@dataclass(frozen=True, init=False)
class NoMatch:
    """Why a pattern or rule did not match. ``NoMatch(kind, reason, node=...)``; a rule's check
    or lowering may write ``NoMatch(reason)`` alone, which is :attr:`MatchFailure.DECLINED`.
    ``node``: the name of the node where matching stopped ("" when not one node)."""

    kind: MatchFailure
    reason: str
    node: str = ""

    def __init__(self, kind: Union[MatchFailure, str], reason: Optional[str] = None,
                 node: str = "") -> None:
        if reason is None:
            kind, reason = MatchFailure.DECLINED, str(kind)
        object.__setattr__(self, "kind", MatchFailure(kind))
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "node", node)

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Match:
    nodes: tuple[fx.Node, ...]  # in pattern order, root last
    names: Mapping[str, fx.Node] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return True

    @property
    def root(self) -> fx.Node:
        return self.nodes[-1]


Target = Union[type, Callable[..., Any], str]


@dataclass(frozen=True)
class Op:
    """One node: ``call_module`` of one of ``targets`` (classes), ``call_function`` of one of them
    (functions) or ``call_method`` of one of them (strings). ``check`` may refine."""

    targets: tuple[Target, ...]
    name: str = ""
    check: Optional[Callable[[fx.Node, Mapping[str, nn.Module]], bool]] = None

    def __init__(self, *targets: Target, name: str = "",
                 check: Optional[Callable[[fx.Node, Mapping[str, nn.Module]], bool]] = None) -> None:
        object.__setattr__(self, "targets", tuple(targets))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "check", check)

    def __or__(self, other: "Op") -> "Op":
        return Op(*(self.targets + other.targets), name=self.name or other.name)

    def matches(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> Union[bool, NoMatch]:
        if not op_is(node, self.targets, modules):
            return NoMatch(MatchFailure.NOT_THIS_OP, f"{node.name} is not {self.describe()}",
                           node.name)
        if self.check is not None and not self.check(node, modules):
            return NoMatch(MatchFailure.CHECK_FAILED,
                           f"{node.name} fails the check of {self.describe()}", node.name)
        return True

    def describe(self) -> str:
        return " | ".join(target_name(t) for t in self.targets)


def target_name(t: Any) -> str:
    if isinstance(t, str):
        return f".{t}()"
    qualified = getattr(t, "_qualified_op_name", None)
    if isinstance(qualified, str):
        return qualified  # torch.ops.quantized.add -> "quantized::add"
    if isinstance(t, type):
        return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    return name


def op_is(node: fx.Node, targets: Iterable[Target], modules: Mapping[str, nn.Module]) -> bool:
    """Does ``node`` call one of ``targets``?"""
    targets = tuple(targets)
    if node.op == "call_module":
        mod = modules.get(node.target)
        classes = tuple(t for t in targets if isinstance(t, type))
        return mod is not None and bool(classes) and type(mod) in classes
    if node.op == "call_function":
        return any(node.target is t for t in targets if not isinstance(t, (type, str)))
    if node.op == "call_method":
        return node.target in [t for t in targets if isinstance(t, str)]
    return False


@dataclass(frozen=True)
class Chain:
    """Root-last chain of ops connected through their first argument."""

    ops: tuple[Op, ...]
    name: str = ""

    def __init__(self, *ops: Op, name: str = "") -> None:
        object.__setattr__(self, "ops", tuple(ops))
        object.__setattr__(self, "name", name or "_".join(o.name or o.describe() for o in ops))

    def match(self, root: fx.Node, modules: Mapping[str, nn.Module]) -> Union[Match, NoMatch]:
        nodes: list[fx.Node] = []
        node: Any = root
        for i, op in enumerate(reversed(self.ops)):
            if not isinstance(node, fx.Node):
                return NoMatch(MatchFailure.NOT_A_NODE, f"input of {nodes[-1].name} is not a node",
                               nodes[-1].name)
            ok = op.matches(node, modules)
            if not ok:
                return ok if isinstance(ok, NoMatch) else NoMatch(
                    MatchFailure.CHECK_FAILED, f"{node.name} does not match", node.name)
            if i > 0 and len(node.users) != 1:
                return NoMatch(MatchFailure.MULTIPLE_USERS, f"{node.name} has {len(node.users)} "
                               f"users; fusing it would change what they see", node.name)
            nodes.append(node)
            node = node.args[0] if node.args else None
        ordered = tuple(reversed(nodes))
        names = {op.name: n for op, n in zip(self.ops, ordered) if op.name}
        return Match(ordered, names)


def find_matches(graph: fx.Graph, patterns: Sequence[Chain], modules: Mapping[str, nn.Module],
                 accept: Optional[Callable[[Chain, Match], bool]] = None,
                 declined: Optional[Callable[[fx.Node, Chain, NoMatch], None]] = None
                 ) -> list[tuple[Chain, Match]]:
    """Non-overlapping matches, longest pattern first at each root, roots in reverse graph order
    (so conv-bn-relu wins over conv-bn). ``accept`` may refuse a match (e.g. its fused module
    cannot be built), and the next pattern is tried. ``declined`` hears of each match that
    failed only because an interior node has other users."""
    taken: set[fx.Node] = set()
    found: list[tuple[Chain, Match]] = []
    ordered = sorted(patterns, key=lambda p: -len(p.ops))
    for node in reversed(list(graph.nodes)):
        if node in taken:
            continue
        for pat in ordered:
            m = pat.match(node, modules)
            if not m:
                if declined is not None and isinstance(m, NoMatch) \
                        and m.kind is MatchFailure.MULTIPLE_USERS:
                    declined(node, pat, m)
                continue
            if set(m.nodes) & taken or (accept is not None and not accept(pat, m)):
                continue
            taken |= set(m.nodes)
            found.append((pat, m))
            break
    found.reverse()
    return found
