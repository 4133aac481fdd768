"""Attention-aware defaults: in a transformer block, keep the mask path and softmax float.

Why: an additive attention mask holds huge constants (-1e4, -inf, ``finfo.min``). Observed
by an int8 observer, they swallow the range of the scores they are added to (every real
score rounds to one step), and the op that builds the mask (``(1 - mask) * finfo.min``)
gets a scale that overflows (9e74 on a BERT-style encoder). A 6-layer encoder with the
static default collapsed to cosine ~0 against float; keeping the mask path and softmax float
(matmul / Linear inputs int8) brought it to 0.994 (issue 11). Softmax itself is cheap next to
the matmuls, and its fixed 1/256 output scale cost attention models 5-7 dB.

What is recognised (:func:`attention_float_nodes`, a graph analysis with no side effects):

* **attention softmax**: a softmax whose input, walked back through mask applications,
  scalings by constants and shape-only ops, comes from a matmul (``q @ k.T``, bmm, einsum,
  baddbmm), or whose output feeds one (``attn @ v``);
* **mask application**: on that walk, ``scores + m`` / ``scores - m`` where ``m`` does not
  derive from any matmul or weighted module (so it is not data), ``scores.masked_fill(c, v)``
  and ``torch.where(c, scores, v)``;
* **mask construction**: the ops that compute those ``m`` / ``c`` / ``v``, back to the
  model's inputs and constants, as long as every use of their result is on the mask path
  (``x.size(1)`` that sizes a causal mask is used, ``x`` itself is not);
* **huge constants**: an op with a constant of magnitude >= 1e30 (or inf), or >= 1e4 where
  the op fills positions (``masked_fill``, ``where``) or its input is not data: a mask value
  whatever the graph around it looks like.

:func:`apply_attention_defaults` (called by ``propagate_qconfig``) sets those nodes' qconfig
to None with the reason, unless the user's QConfigMapping decided that node explicitly: a
``module_name`` / ``module_name_regex`` / order rule, or an ``object_type`` rule that differs
from the backend's default mapping. So ``mapping.set_object_type(F.softmax, qconfig)`` (or a
``module_name`` rule for the block) quantizes softmax again.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HUGE", "MASK_HUGE", "attention_float_nodes", "apply_attention_defaults"]

HUGE = 1e30
"""A constant this large (or inf) cannot be quantized with anything else: always a mask."""
MASK_HUGE = 1e4
"""The smallest magnitude taken for a mask value (BERT's -10000.0) where the op fills positions
or its input is not data."""

# Every spelling, not only the canonical ones (fxquant.ops): attention_float_nodes is public and
# reads any traced graph, also one that did not go through normalize (inside the pipeline,
# propagate_qconfig calls it after normalize, where only the canonical spellings occur).
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.einsum, torch.baddbmm,
           "matmul", "bmm", "baddbmm"}
_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.special.softmax, "softmax"}
_ADD = {torch.add, operator.add, "add", operator.iadd}
_SUB = {torch.sub, operator.sub, "sub", torch.subtract, operator.isub}
_MASKED_FILL = {torch.masked_fill, "masked_fill", "masked_fill_"}
_WHERE = {torch.where}
_SCALE = {torch.mul, operator.mul, "mul", torch.div, operator.truediv, "div"}
_SHAPE = {"view", "reshape", "permute", "transpose", "contiguous", "to", "float", "type_as",
          "unsqueeze", "squeeze", torch.reshape, torch.permute, torch.transpose, torch.unsqueeze,
          torch.squeeze, torch.flatten, "flatten", "expand", "expand_as"}
_FILLS = _MASKED_FILL | _WHERE | {torch.full, torch.full_like, "fill_", torch.fill}


def _is(node: fx.Node, table: set, modules: Mapping[str, nn.Module]) -> bool:
    if node.op in ("call_function", "call_method"):
        try:
            return node.target in table
        except TypeError:  # an unhashable target
            return False
    return False


def _is_softmax(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.Softmax)
    return _is(node, _SOFTMAX_FUNCS, modules)


def _is_weighted_module(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op != "call_module":
        return False
    mod = modules.get(node.target)
    return isinstance(getattr(mod, "weight", None), torch.Tensor) and not isinstance(
        mod, (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.EmbeddingBag)) and not isinstance(
        mod, nn.modules.batchnorm._BatchNorm)


def _node_args(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _constants(node: fx.Node) -> Iterable[float]:
    def walk(a: Any) -> Iterable[float]:
        if isinstance(a, (list, tuple)):
            for b in a:
                yield from walk(b)
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            yield float(a)

    for a in (*node.args, *node.kwargs.values()):
        yield from walk(a)


def _largest_constant(node: fx.Node) -> float:
    values = [abs(v) for v in _constants(node)]
    values = [math.inf if math.isnan(v) else v for v in values]
    return max(values, default=0.0)


class _Walk:
    """Facts about every node, computed once in graph order."""

    def __init__(self, gm: fx.GraphModule, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.matmul_fed: dict[fx.Node, bool] = {}  # derives from a matmul
        self.data: dict[fx.Node, bool] = {}  # derives from a matmul or a weighted module
        for n in gm.graph.nodes:
            ins = _node_args(n)
            mm = _is(n, _MATMUL, modules)
            self.matmul_fed[n] = mm or any(self.matmul_fed.get(a, False) for a in ins)
            self.data[n] = mm or _is_weighted_module(n, modules) or any(
                self.data.get(a, False) for a in ins)

    def scores_and_masks(self, node: fx.Node) -> Optional[tuple[fx.Node, list[fx.Node]]]:
        """For a mask application ``node``: (the scores operand, the mask operands), else None."""
        m = self.modules
        if _is(node, _ADD | _SUB, m):
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(tensors) == 2:
                fed = [t for t in tensors if self.matmul_fed[t]]
                masks = [t for t in tensors if not self.data[t]]
                if len(fed) == 1 and len(masks) == 1 and fed[0] is not masks[0]:
                    return fed[0], masks
                return None
            if len(tensors) == 1 and _largest_constant(node) >= MASK_HUGE:
                return tensors[0], []
            return None
        if _is(node, _MASKED_FILL, m) and node.args and isinstance(node.args[0], fx.Node):
            rest = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
            return node.args[0], rest
        if _is(node, _WHERE, m) and len(node.args) == 3:
            tensors = [a for a in node.args[1:] if isinstance(a, fx.Node)]
            fed = [t for t in tensors if self.matmul_fed[t]]
            if len(fed) != 1:
                return None
            rest = [a for a in node.args if isinstance(a, fx.Node) and a is not fed[0]]
            return fed[0], rest
        return None

    def walk_back(self, start: Any) -> tuple[list[fx.Node], list[fx.Node], bool]:
        """From a softmax input back to the scores: (mask applications, mask operands,
        whether a matmul was reached)."""
        apps: list[fx.Node] = []
        roots: list[fx.Node] = []
        n = start
        for _ in range(32):
            if not isinstance(n, fx.Node):
                break
            if _is(n, _MATMUL, self.modules):
                return apps, roots, True
            found = self.scores_and_masks(n)
            if found is not None:
                apps.append(n)
                roots.extend(found[1])
                n = found[0]
                continue
            if _is(n, _SCALE | _SHAPE, self.modules) and n.args and isinstance(n.args[0], fx.Node) \
                    and all(not isinstance(a, fx.Node) or not self.data[a] for a in n.args[1:]):
                n = n.args[0]
                continue
            if _is(n, _SCALE, self.modules) and len(n.args) == 2 and isinstance(n.args[1], fx.Node) \
                    and not isinstance(n.args[0], fx.Node):
                n = n.args[1]  # 0.125 * scores
                continue
            break
        return apps, roots, False

    def feeds_matmul(self, node: fx.Node) -> bool:
        """Whether ``node``'s output reaches a matmul through shape-only ops (``attn @ v``)."""
        todo, seen = list(node.users), set()
        while todo:
            u = todo.pop()
            if u in seen or len(seen) > 64:
                continue
            seen.add(u)
            if _is(u, _MATMUL, self.modules):
                return True
            if _is(u, _SHAPE, self.modules) or (u.op == "call_module" and isinstance(
                    self.modules.get(u.target), nn.Dropout)):
                todo.extend(u.users)
        return False


def _mask_subgraph(gm: fx.GraphModule, facts: _Walk, roots: list[fx.Node],
                   apps: set[fx.Node]) -> set[fx.Node]:
    """The call nodes that build the mask operands ``roots``: their ancestors (not data)
    whose every use is on the mask path."""
    candidates: set[fx.Node] = set()
    todo = [r for r in roots]
    while todo:
        n = todo.pop()
        if n in candidates or not n.op.startswith("call_") or facts.data[n]:
            continue
        candidates.add(n)
        todo.extend(_node_args(n))
    mask: set[fx.Node] = set()
    for n in reversed(list(gm.graph.nodes)):
        if n in candidates and n.users and all(u in mask or u in apps for u in n.users):
            mask.add(n)
    return mask


def _describe(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    from fxquant.patterns import target_name

    return target_name(node.target)


def attention_float_nodes(gm: fx.GraphModule, modules: Optional[Mapping[str, nn.Module]] = None
                          ) -> dict[fx.Node, str]:
    """The nodes to keep float in attention blocks, each with the reason (see the module
    docstring). Reads the graph only."""
    modules = dict(gm.named_modules()) if modules is None else modules
    facts = _Walk(gm, modules)
    out: dict[fx.Node, str] = {}
    apps: set[fx.Node] = set()
    roots: list[fx.Node] = []
    for n in gm.graph.nodes:
        if not _is_softmax(n, modules) or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        found_apps, found_roots, reached = facts.walk_back(n.args[0])
        if not (reached or facts.feeds_matmul(n)):
            continue
        masked = " with its mask" if found_apps else ""
        out[n] = (f"softmax of attention scores{masked}: kept float (its fixed 1/256 output "
                  f"scale and the mask's range cost more accuracy than the op saves)")
        for a in found_apps:
            out[a] = (f"applies the attention mask to the scores ({_describe(a, modules)}): "
                      f"its range is the mask's (-1e4 / -inf), not the scores'")
        apps.update(found_apps)
        roots.extend(found_roots)
    for n in _mask_subgraph(gm, facts, roots, apps):
        out.setdefault(n, f"builds the attention mask ({_describe(n, modules)}): mask values "
                          f"(0 / -1e4 / -inf) are not worth int8, and their range would overflow")
    for n in gm.graph.nodes:
        if n in out or not n.op.startswith("call_"):
            continue
        fills = _is(n, _FILLS, modules)
        if not (fills or _is(n, _ADD | _SUB | _SCALE, modules)):
            continue  # sizes in view/reshape/full are not values
        big = _largest_constant(n)
        if big >= HUGE or (big >= MASK_HUGE and (fills or not facts.data[n])):
            out[n] = (f"{_describe(n, modules)} with the constant {big:g}: a mask value; its range "
                      f"would drown the data (or overflow the scale)")
    return out


def apply_attention_defaults(gm: fx.GraphModule, modules: Mapping[str, nn.Module],
                             is_default: Callable[[fx.Node], bool]) -> dict[str, int]:
    """Set the qconfig of :func:`attention_float_nodes` to None with the reason, except where
    ``is_default(node)`` is False (the user's mapping decided that node explicitly). Static
    qconfigs only: a dynamic or float node is left as it is. Returns stats."""
    from fxquant.meta import qinfo, record
    from fxquant.records import Action

    stats = {"attention_float": 0, "attention_explicit": 0}
    for node, why in attention_float_nodes(gm, modules).items():
        info = qinfo(node)
        if info.qconfig is None or _is_dynamic(info.qconfig):
            continue
        if info.value is not None and info.value.kind != "tensor":
            continue  # x.size(1) sizing a causal mask: not a tensor, nothing to keep float
        if not is_default(node):
            stats["attention_explicit"] += 1
            record(node, "propagate_qconfig", Action.ATTENTION_EXPLICIT,
                   f"attention default not applied: the mapping sets this op explicitly "
                   f"({info.qconfig_reason}); it would be kept float because it {why}")
            continue
        previous = info.qconfig_reason
        info.qconfig = None
        info.qconfig_reason = f"attention default: {why}"
        record(node, "propagate_qconfig", Action.ASSIGN_QCONFIG,
               f"{previous} → None (attention default: {why}; a module_name or object_type rule "
               f"for it quantizes it)")
        stats["attention_float"] += 1
    return {k: v for k, v in stats.items() if v}


def _is_dynamic(qconfig: Any) -> bool:
    act = getattr(qconfig, "activation", None)
    if act is None:
        return False
    try:
        return bool(getattr(act(), "is_dynamic", False))
    except Exception:  # noqa: BLE001 - an observer that cannot be built here is not dynamic
        return False
