"""fuse: pattern-match chains of ops and merge them.

Module chains (conv-bn-relu, linear-relu, bn-relu, convtranspose-bn, ...) become one fused
float module at the path of the first module; BatchNorm is folded in eval mode. Functional
chains that a backend runs as one kernel (add-relu) are marked as a group: the interior node
is not observed, the root (last) node carries the output quantization.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch.fx as fx
import torch.nn as nn

from fxquant.fusion import GroupFusion, ModuleFusion, default_group_fusions, default_module_fusions
from fxquant.graph_edit import del_submodule, set_submodule
from fxquant.meta import inherit, qinfo, record
from fxquant.patterns import Chain, NoMatch, find_matches
from fxquant.records import Action
from fxquant.pipeline import PassContext, PassResult

_group_ids = itertools.count(1)


@dataclass(frozen=True)
class Fuse:
    name: ClassVar[str] = "fuse"
    requires: ClassVar[frozenset[str]] = frozenset({"normalized"})
    provides: ClassVar[frozenset[str]] = frozenset({"fused"})
    module_fusions: tuple[ModuleFusion, ...] = field(default_factory=default_module_fusions)
    group_fusions: tuple[GroupFusion, ...] = field(default_factory=default_group_fusions)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        training = gm.training if ctx.options.is_qat is None else ctx.options.is_qat
        modules = dict(gm.named_modules())
        by_pattern = {f.pattern: f for f in self.module_fusions}
        built: dict[int, nn.Module] = {}

        def buildable(pattern, match) -> bool:
            module = _build(gm, by_pattern[pattern], match.nodes, modules, training)
            if module is not None:
                built[id(match.nodes[-1])] = module
            return module is not None

        for pattern, match in find_matches(gm.graph, list(by_pattern), modules, buildable,
                                           _record_declined):
            _replace(gm, by_pattern[pattern], match.nodes, built[id(match.nodes[-1])], training)
            stats["fused"] += 1
        modules = dict(gm.named_modules())
        by_group = {f.pattern: f for f in self.group_fusions}
        ungrouped = lambda pattern, match: all(qinfo(n).group is None for n in match.nodes)
        for pattern, match in find_matches(gm.graph, list(by_group), modules, ungrouped):
            _mark_group(by_group[pattern], match.nodes)
            stats["grouped"] += 1
        if stats:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, bool(stats), dict(stats))


def _module_call_count(graph: fx.Graph, target: str) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_module" and n.target == target)


def _record_declined(root: fx.Node, pattern: Chain, no: NoMatch) -> None:
    """Record, on the first node of the would-be chain, why it was not fused (once per
    pattern, kind of failure and node where it failed, however many roots lead there)."""
    node = root
    for _ in range(len(pattern.ops) - 1):
        if not (node.args and isinstance(node.args[0], fx.Node)):
            return
        node = node.args[0]
    why = {"pattern": pattern.name, "failure": no.kind, "at": no.node}
    if not any(d.action == Action.NOT_FUSED and all(d.detail.get(k) == v for k, v in why.items())
               for d in qinfo(node).decisions):
        record(node, Fuse.name, Action.NOT_FUSED, f"not fused as {pattern.name}: {no.reason}",
               **why)


def _build(gm: fx.GraphModule, fusion: ModuleFusion, nodes: tuple[fx.Node, ...],
           modules: dict[str, nn.Module], training: bool) -> Optional[nn.Module]:
    """The fused module for a match, or None (with a not_fused decision) when it can't be."""
    first = nodes[0]
    mods = [modules[n.target] for n in nodes if n.op == "call_module"]
    calls = [_module_call_count(gm.graph, n.target) for n in nodes if n.op == "call_module"]
    if any(c != 1 for c in calls):
        record(first, Fuse.name, Action.NOT_FUSED, f"{fusion.description}: a module of the "
               f"chain is called more than once, so it cannot be replaced by a fused module")
        return None
    try:
        if fusion.clamp_root:
            from fxquant.fusion import clamp_bounds

            fused = fusion.build(mods, training, clamp_bounds(nodes[-1], modules))
        else:
            fused = fusion.build(mods, training)
    except (ValueError, TypeError) as e:
        record(first, Fuse.name, Action.NOT_FUSED, f"{fusion.description}: {e}")
        return None
    if fused is None:
        record(first, Fuse.name, Action.NOT_FUSED, f"{fusion.description}: no fused module in "
               f"{'training' if training else 'eval'} mode")
    return fused


def _replace(gm: fx.GraphModule, fusion: ModuleFusion, nodes: tuple[fx.Node, ...],
             fused: nn.Module, training: bool) -> None:
    first = nodes[0]
    for n in nodes[1:]:
        if n.op == "call_module":
            del_submodule(gm, str(n.target))  # lives on inside the fused module only
    set_submodule(gm, first.target, fused)
    root = nodes[-1]
    with gm.graph.inserting_before(root):
        new = gm.graph.call_module(first.target, (first.args[0],) + tuple(first.args[1:]),
                                   dict(first.kwargs))
    info = inherit(new, first)
    info.fused_from = tuple(_describe(n) for n in nodes)
    info.debug_handle = qinfo(root).debug_handle  # the node whose output the fused node gives
    folded = " (BatchNorm folded into the weights)" if (
        "BatchNorm" in fusion.description and not training
        and not fusion.description.startswith("BatchNorm")) else ""
    record(new, Fuse.name, Action.FUSE, f"{fusion.description} → {type(fused).__name__}{folded}",
           pattern=fusion.pattern.name, members=info.fused_from)
    root.replace_all_uses_with(new)
    for n in reversed(nodes):
        gm.graph.erase_node(n)


def _describe(node: fx.Node) -> str:
    info = qinfo(node)
    if node.op == "call_module":
        return str(node.target)
    return f"{info.module_path + ':' if info.module_path else ''}{node.name}"


def _mark_group(fusion: GroupFusion, nodes: tuple[fx.Node, ...]) -> None:
    gid = next(_group_ids)
    for i, n in enumerate(nodes):
        info = qinfo(n)
        info.group = gid
        info.group_root = i == len(nodes) - 1
    record(nodes[-1], Fuse.name, Action.FUSE,
           f"{fusion.description} run as one kernel ({fusion.kernel})",
           pattern=fusion.pattern.name, kernel=fusion.kernel)
    for n in nodes[:-1]:
        record(n, Fuse.name, Action.FUSE, f"part of {fusion.description}; its output stays "
               f"inside the fused kernel and is not quantized", pattern=fusion.pattern.name)
