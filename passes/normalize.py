"""normalize: one spelling per op.

``x.relu()`` / ``F.relu`` / ``torch.relu`` / ``nn.ReLU`` become ``F.relu``; ``x + y`` /
``torch.add`` / ``x += y`` / ``x.add_(y)`` become ``torch.add`` (tensors only: ``x.size(0) + 1``
stays Python); ``torch.concat`` becomes ``torch.cat``; ``nn.Flatten`` / ``x.flatten`` become
``torch.flatten``; stateless modules become their function (``nn.Sigmoid`` →
``torch.sigmoid``, ``nn.ELU(alpha)`` → ``F.elu(x, alpha)``, ``nn.ZeroPad2d`` → ``F.pad``,
``nn.Upsample`` → ``F.interpolate``, ``nn.MaxPool2d(3, 2)`` → ``F.max_pool2d(x, 3, 2, ...)``,
``nn.AdaptiveAvgPool2d(1)`` → ``F.adaptive_avg_pool2d(x, 1)`` ...), keeping the module's path
and class for qconfig rules and reports; and so on for every op with several spellings
(``x.sigmoid()`` → ``torch.sigmoid``, ``torch.softmax`` → ``F.softmax``, ``x.reshape(2, -1)`` →
``torch.reshape(x, (2, -1))``, ``torch.bmm`` → ``torch.matmul``, ``torch.batch_norm`` →
``F.batch_norm`` ...): the table is :data:`fxquant.ops.SPELLINGS`, so every later table (fusion
patterns, backend rules) names one canonical op. Modules with state (conv, linear, norms,
prelu, ...), ``nn.LPPool*`` and ``nn.Softmax()`` without a dim stay modules. In-place spellings
become out-of-place and every later reader of the mutated tensor reads the result instead,
which is what it saw in eager mode (one that has no out-of-place spelling stays, its readers
re-pointed). Inference no-ops are removed when the model is not training: dropout in every
spelling (``nn.Dropout*``, ``F.dropout*``, ``torch.dropout``, alpha / feature-alpha dropout),
torchvision's stochastic depth (``stochastic_depth`` / ``StochasticDepth``, matched by name)
and ``nn.Identity``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.aliasing import has_view_alias, is_inplace
from fxquant.functional import build_module, functional_entry
from fxquant.graph_edit import drop_dead_get_attrs
from fxquant.meta import inherit, qinfo, record
from fxquant.records import Action
from fxquant.ops import (DROPOUT_FUNCTIONS, DROPOUT_MODULES, IDENTITY_MODULES, Spelling,
                         module_is_inplace, spelling_for)
from fxquant.patterns import op_is, target_name
from fxquant.pipeline import PassContext, PassResult

_COMMUTATIVE = (torch.add, torch.mul)


@dataclass(frozen=True)
class Normalize:
    name: ClassVar[str] = "normalize"
    requires: ClassVar[frozenset[str]] = frozenset({"traced"})
    provides: ClassVar[frozenset[str]] = frozenset({"normalized"})
    remove_dropout: Optional[bool] = None  # None: remove when the model is in eval mode

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = dict(gm.named_modules())
        remove = (not gm.training) if self.remove_dropout is None else self.remove_dropout
        stats: Counter[str] = Counter()
        for node in list(gm.graph.nodes):
            if remove and _is_identity_at_inference(node, modules):
                _remove_identity(gm, node, modules)
                stats["removed"] += 1
                continue
            entry = functional_entry(node)
            if entry is not None:
                stats[_functional_to_module(gm, node, entry)] += 1
                continue
            spelling = spelling_for(node.op, node.target, modules.get(node.target)
                                    if node.op == "call_module" else None)
            if spelling is not None and _rewrite(gm, node, spelling, modules):
                stats["rewritten"] += 1
            elif _is_inplace(node, modules) and _make_mutation_explicit(gm.graph, node, modules):
                stats["inplace_readers_repointed"] += 1
        modified = bool(stats) and set(stats) != {"kept_functional"}
        if modified:
            drop_dead_get_attrs(gm)
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified, dict(stats))


def _functional_to_module(gm: fx.GraphModule, node: fx.Node, entry) -> str:
    """F.linear / F.conv*d with parameter weights → the module, sharing the parameters."""
    written = target_name(node.target)
    module = build_module(gm, node, entry)
    if not isinstance(module, nn.Module):
        record(node, Normalize.name, Action.KEEP_FUNCTIONAL, f"{written} stays functional: "
               f"{module.reason}; it runs float")
        return "kept_functional"
    weight_target = str((node.args[1] if len(node.args) > 1 else node.kwargs["weight"]).target)
    name = _free_name(gm, weight_target.replace(".", "_") + "_" + entry.module.__name__.lower())
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
    inherit(new, node, Normalize.name, Action.NORMALIZE,
            f"{written}(x, {weight_target}, ...) rewritten as nn.{entry.module.__name__} "
            f"'{name}' sharing its parameters")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return "functional_to_module"


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


# torch's own dropout entry points beside F.* (``torch.dropout(x, p, train)``, ...)
_TORCH_DROPOUTS: tuple[Any, ...] = tuple(
    f for f in (getattr(torch, n, None) for n in ("dropout", "alpha_dropout", "feature_dropout",
                                                  "feature_alpha_dropout"))
    if f is not None) + ((F.feature_alpha_dropout,) if hasattr(F, "feature_alpha_dropout")
                         else ())
_EXTRA_DROPOUT_MODULES: tuple[type, ...] = tuple(
    c for c in (getattr(nn, "FeatureAlphaDropout", None),) if c is not None)
# torchvision's stochastic depth (torchvision.ops.stochastic_depth, wrapped as a leaf function
# for torch.fx, and the StochasticDepth module when kept as a leaf): matched by name, so that
# torchvision is not imported (it need not be installed) and look-alikes are matched too
_NO_OP_FUNCTION_NAMES = frozenset({"stochastic_depth"})
_NO_OP_MODULE_NAMES = frozenset({"StochasticDepth"})


def _is_identity_at_inference(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Dropout in every spelling, stochastic depth and nn.Identity: the identity once the
    model is in eval mode."""
    if op_is(node, DROPOUT_MODULES + IDENTITY_MODULES + DROPOUT_FUNCTIONS + _TORCH_DROPOUTS
             + _EXTRA_DROPOUT_MODULES, modules):
        return _first_arg_is_tensor(node)
    if node.op == "call_function":
        return getattr(node.target, "__name__", None) in _NO_OP_FUNCTION_NAMES \
            and _first_arg_is_tensor(node)
    if node.op == "call_module":
        return type(modules.get(node.target)).__name__ in _NO_OP_MODULE_NAMES
    return False


def _first_arg_is_tensor(node: fx.Node) -> bool:
    return bool(node.args) and isinstance(node.args[0], fx.Node)


def _training_flag(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    """The ``training`` the op would run with: the module's flag, or the functional call's
    argument (F.dropout's default is True, torchvision's stochastic_depth's too)."""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "training", False))
    if "training" in node.kwargs or "train" in node.kwargs:
        return node.kwargs.get("training", node.kwargs.get("train"))
    name = getattr(node.target, "__name__", "")
    index = 3 if name in _NO_OP_FUNCTION_NAMES else 2
    return node.args[index] if len(node.args) > index else True


def _remove_identity(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> None:
    src = node.args[0]
    what = type(modules[node.target]).__name__ if node.op == "call_module" else target_name(node.target)
    flag = _training_flag(node, modules) if what != "Identity" else False
    why = "identity at inference (eval mode)"
    if flag is not False:
        # F.dropout(x, p) without training=self.training drops even in eager eval mode; a
        # quantized model is for inference, so it goes too, and the record says so
        shown = flag.name if isinstance(flag, fx.Node) else flag
        why += (f"; note: it was called with training={shown}, so eager eval mode would "
                f"still have applied it (pass training=self.training)")
    if isinstance(src, fx.Node):
        record(src, Normalize.name, Action.REMOVE_IDENTITY,
               f"removed {what} '{qinfo(node).module_path or node.name}' after this op: {why}")
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)


def _tensor_valued(node: fx.Node) -> bool:
    value = qinfo(node).value
    return value is not None and value.kind == "tensor"


def _rewrite(gm: fx.GraphModule, node: fx.Node, sp: Spelling, modules: dict[str, nn.Module]) -> bool:
    if sp.tensor_only and not _tensor_valued(node):
        return False
    if sp.self_tensor and node.op == "call_method" and not (
            node.args and isinstance(node.args[0], fx.Node) and _tensor_valued(node.args[0])):
        return False  # a method of something else than a tensor (``name.split(".")``)
    if sp.canonical is torch.cat:
        _expand_tuple_input(gm, node)
    new_args = _canonical_args(node, sp, modules)
    if new_args is None:
        return False
    args, kwargs = new_args
    inplace = sp.inplace or _inplace_kwarg(node) or (
        node.op == "call_module" and module_is_inplace(modules.get(node.target)))
    if inplace and isinstance(node.args[0], fx.Node) and _has_alias(node.args[0], modules):
        why = (f"kept in place: {node.args[0].name} is a view of another tensor or has views, so "
               f"an out-of-place rewrite would lose the mutation they see")
        if node.op == "call_module" and _takes_inplace(sp.canonical):
            _replace(gm, node, sp.canonical, args, {**kwargs, "inplace": True}, Action.KEEP_INPLACE,
                     f"{type(modules[node.target]).__name__}(inplace=True) rewritten as "
                     f"{target_name(sp.canonical)}(..., inplace=True); {why}")
            return True
        record(node, Normalize.name, Action.KEEP_INPLACE, why)
        return False
    if node.op == "call_function" and node.target is sp.canonical and not inplace:
        node.args, node.kwargs = args, kwargs  # same op, only defaults dropped
        return False
    written = (type(modules[node.target]).__name__ if node.op == "call_module"
               else target_name(node.target))
    _replace(gm, node, sp.canonical, args, kwargs, Action.NORMALIZE,
             f"{written} rewritten as {target_name(sp.canonical)}"
             + (" (out of place)" if inplace else ""), repoint=inplace)
    return True


def _replace(gm: fx.GraphModule, node: fx.Node, target: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any], action: Action, reason: str, repoint: bool = False
             ) -> fx.Node:
    """``node`` → ``target(*args, **kwargs)``, which keeps its record (a module call's path
    and class, for module_name / object_type rules and reports); ``repoint``: later readers of
    the tensor the old op mutated read the result instead."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, kwargs)
    inherit(new, node, Normalize.name, action, reason)
    node.replace_all_uses_with(new)
    if repoint and isinstance(node.args[0], fx.Node):
        _repoint_later_readers(gm.graph, node.args[0], new)
    gm.graph.erase_node(node)
    return new


def _takes_inplace(fn: Any) -> bool:
    """Does the function take ``inplace=`` (F.relu6, F.hardswish, F.elu ...)?"""
    import inspect

    try:
        return "inplace" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _has_alias(value: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Is ``value`` a view of another tensor, or does some view share its storage?"""
    return has_view_alias(value, modules)


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Does ``node`` mutate its first argument? (``x.sigmoid_()``, ``torch.tanh_``,
    ``F.elu(x, inplace=True)``, ``nn.Hardswish(inplace=True)``)"""
    return node.graph is not None and is_inplace(node, modules)


def _make_mutation_explicit(graph: fx.Graph, node: fx.Node, modules: dict[str, nn.Module]
                            ) -> bool:
    """An in-place op without an out-of-place spelling stays as written, but every later reader
    of the tensor it mutates reads its result instead, which is the same tensor in eager mode.
    Once the op runs on a dequantized copy, the readers still see the mutation."""
    x = node.args[0]
    if _has_alias(x, modules):
        record(node, Normalize.name, Action.KEEP_INPLACE,
               f"in place on {x.name}, which is a view of another tensor or has views: the "
               f"views may not see the mutation once quantized; left as written")
        return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    later = [u for u in x.users if u is not node and order[u] > order[node]]
    if not later:
        return False
    for user in later:
        user.replace_input_with(x, node)
    record(node, Normalize.name, Action.NORMALIZE,
           f"in-place op: {', '.join(u.name for u in later)} now read its result, the tensor "
           f"it mutated")
    return True


def _inplace_kwarg(node: fx.Node) -> bool:
    return bool(node.kwargs.get("inplace", False)) or (
        node.op == "call_function" and len(node.args) > 1 and node.args[1] is True
        and getattr(node.target, "__name__", "") == "relu")


def _repoint_later_readers(graph: fx.Graph, mutated: fx.Node, result: fx.Node) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    for user in list(mutated.users):
        if user is not result and order[user] > order[result]:
            user.replace_input_with(mutated, result)


def _canonical_args(node: fx.Node, sp: Spelling, modules: dict[str, nn.Module]
                    ) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if sp.canonical is torch.cat:
        return _cat_args(node)
    if node.op == "call_module":
        read = sp.module_args(modules[node.target]) if sp.module_args else ((), {})
        if read is None:
            return None  # this configuration of the module has no exact function form
        extra, kw = read
        return (node.args[0], *extra, *node.args[1:]), {**kw, **kwargs}
    args = tuple(node.args)
    if sp.convert is not None:
        return sp.convert(args, kwargs)
    if sp.canonical is torch.nn.functional.relu:
        return (args[0],), {}
    if sp.canonical in _COMMUTATIVE:
        if kwargs.get("alpha", 1) != 1 or "out" in kwargs or len(args) != 2:
            return None  # add with alpha / out=: left as written
        a, b = args
        if not isinstance(a, fx.Node) and isinstance(b, fx.Node):
            a, b = b, a  # 2 + x -> torch.add(x, 2)
        return (a, b), {}
    return args, kwargs


def _expand_tuple_input(gm: fx.GraphModule, node: fx.Node) -> None:
    """``torch.cat(t.chunk(2, 1), 1)`` hands cat the tuple itself: list its items instead, so
    each item is a tensor that can stay quantized."""
    import operator

    from fxquant.meta import ValueInfo

    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    value = qinfo(tensors).value if isinstance(tensors, fx.Node) else None
    if value is None or value.kind != "tensors" or not value.items:
        return
    items = []
    with gm.graph.inserting_before(node):
        for i, shape in enumerate(value.items):
            item = gm.graph.call_function(operator.getitem, (tensors, i))
            info = inherit(item, tensors)
            info.value = ValueInfo("tensor", value.dtype, shape, "Tensor")
            record(item, Normalize.name, Action.NORMALIZE,
                   f"item {i} of {tensors.name}, listed for {node.name}")
            items.append(item)
    if node.args:
        node.args = (items, *node.args[1:])
    else:
        node.kwargs = {**node.kwargs, "tensors": items}


def _cat_args(node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    return (tensors, dim), {}
