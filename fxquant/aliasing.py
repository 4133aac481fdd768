"""Alias analysis: which nodes of a graph share storage, and where that storage is written in
place.

A view (``x[:, :2]``, ``x.view(...)``, ``x.transpose(...)``) shares its input's storage; an
in-place op (``y.relu_()``, ``nn.ReLU(inplace=True)``, ``torch.add(a, b, out=y)``) writes the
storage of the tensor it mutates and returns it. Nodes linked that way form one *alias class*.
In eager mode every member of a class sees a mutation of any member; in a quantized graph
every quantize/dequantize pair is a copy, so a copy placed inside a class, or an observer
placed before a mutation that its reader comes after, hides the mutation.

:class:`AliasInfo` answers the two questions the passes ask: is a mutation *hidden* from a
reader (it reads a member of the class after a mutation, through another node than the
mutation's own result), and which nodes must therefore run on the float tensor as written.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch.fx as fx
import torch.nn as nn

# Methods / functions whose result may share its input's storage.
VIEW_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "squeeze", "unsqueeze",
    "expand", "expand_as", "narrow", "select", "t", "flatten", "unflatten", "detach",
    "contiguous", "as_strided", "movedim", "moveaxis", "diagonal", "unbind", "chunk", "split",
    "tensor_split", "hsplit", "vsplit", "dsplit", "swapaxes", "swapdims", "unfold",
    "__getitem__", "getitem", "real", "imag", "view_as_real", "view_as_complex", "T", "mT",
    "H", "mH", "data", "alias"})

# Python's in-place operators (``x += y`` on a tensor that fx did not rebind).
_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul})


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def is_view(node: fx.Node) -> bool:
    """Does ``node`` (possibly) return a view of one of its arguments (:func:`view_source`)?"""
    return view_source(node) is not None


def view_source(node: fx.Node) -> Optional[fx.Node]:
    """The node whose storage ``node``'s result may share as a view: the first argument of a
    view op; the only operand of ``torch.einsum`` (an einsum that only permutes or takes a
    diagonal, ``einsum('nchw->nhwc', x)``, returns a view); None otherwise."""
    if node.op not in ("call_method", "call_function") or not node.args:
        return None
    first = node.args[0]
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        view = node.args[1] in VIEW_OPS  # x.T, x.data ...
    elif _name(node) == "einsum":
        operands: list[fx.Node] = []
        fx.node.map_arg(node.args[1:], operands.append)  # einsum(eq, a, b) or (eq, [a, b])
        return operands[0] if len(operands) == 1 else None
    else:
        view = _name(node) in VIEW_OPS
    return first if view and isinstance(first, fx.Node) else None


def is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Does ``node`` mutate its first argument? (``x.sigmoid_()``, ``torch.tanh_``,
    ``F.elu(x, inplace=True)``, ``nn.Hardswish(inplace=True)``, ``operator.iadd``)"""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op not in ("call_method", "call_function"):
        return False
    name = _name(node)
    trailing = name.endswith("_") and not name.startswith("__")
    return trailing or node.target in _INPLACE_OPERATORS or bool(node.kwargs.get("inplace")) or (
        name == "relu" and len(node.args) > 1 and node.args[1] is True)


def mutated_by(node: fx.Node, modules: Mapping[str, nn.Module]) -> Optional[fx.Node]:
    """The node whose storage ``node`` writes: the first argument of an in-place op or of
    ``operator.setitem``, or the ``out=`` tensor; None when ``node`` writes nothing."""
    if node.op == "call_function" and node.target is operator.setitem:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    return node.args[0] if is_inplace(node, modules) else None


def alias_parent(node: fx.Node, modules: Mapping[str, nn.Module]) -> Optional[fx.Node]:
    """The node whose storage ``node``'s result shares (None: fresh storage, or not a node)."""
    written = mutated_by(node, modules)
    if written is not None:
        return written
    return view_source(node)


@dataclass
class AliasInfo:
    """The alias classes of one graph, its mutations and the node order, computed once."""

    root: dict[fx.Node, fx.Node] = field(default_factory=dict)
    mutations: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # class root -> writers
    members: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)
    pos: dict[fx.Node, int] = field(default_factory=dict)
    views: set[fx.Node] = field(default_factory=set)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "AliasInfo":
        modules = dict(gm.named_modules())
        info = cls()
        for i, node in enumerate(gm.graph.nodes):
            info.pos[node] = i
            parent = alias_parent(node, modules)
            base = info.root.get(parent, parent) if parent is not None else node
            info.root[node] = base
            info.members.setdefault(base, []).append(node)
            if mutated_by(node, modules) is not None:
                info.mutations.setdefault(base, []).append(node)
            elif parent is not None:
                info.views.add(node)
        return info

    def class_of(self, node: fx.Node) -> list[fx.Node]:
        return self.members.get(self.root.get(node, node), [node])

    def hidden_mutation(self, value: fx.Node, reader: fx.Node) -> Optional[fx.Node]:
        """A mutation of ``value``'s class that runs after ``value`` was produced and before
        ``reader`` reads it (None: ``reader`` sees ``value`` as it was produced)."""
        if value not in self.pos or reader not in self.pos:
            return None
        lo, hi = self.pos[value], self.pos[reader]
        for m in self.mutations.get(self.root.get(value, value), ()):
            if m is not reader and lo < self.pos[m] < hi:
                return m
        return None

    def has_hidden_reads(self, node: fx.Node) -> bool:
        """Does some node read a member of ``node``'s class after a mutation it does not
        read through? (Then a copy inside the class would change what it reads.)"""
        base = self.root.get(node, node)
        if not self.mutations.get(base):
            return False
        return any(self.hidden_mutation(v, r) is not None
                   for v in self.members[base] for r in v.users)

    def must_stay_as_written(self, node: fx.Node) -> Optional[fx.Node]:
        """For a view or a mutation in a class with hidden reads: the first mutation, to name
        in the reason. Such a node must run on the float tensor it aliases, uncopied."""
        if node not in self.views and node not in self.mutations.get(self.root.get(node), ()):
            return None
        if not self.has_hidden_reads(node):
            return None
        return self.mutations[self.root[node]][0]


def alias_class(value: fx.Node, modules: Mapping[str, nn.Module]) -> set[fx.Node]:
    """The nodes linked to ``value`` through views and in-place writes, as the graph is now
    (for passes that rewrite the graph as they go; :class:`AliasInfo` is a snapshot)."""
    seen: set[fx.Node] = set()
    stack = [value]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        parent = alias_parent(n, modules)
        if parent is not None:
            stack.append(parent)
        stack.extend(u for u in n.users if alias_parent(u, modules) is n)
    return seen


def has_view_alias(value: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Is ``value`` linked to a view (so that rewriting an in-place op on it out of place would
    hide the mutation from that view)?"""
    return any(is_view(n) for n in alias_class(value, modules))


def is_written(value: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Does some node write ``value``'s storage in place?"""
    return any(mutated_by(n, modules) is not None for n in alias_class(value, modules))
