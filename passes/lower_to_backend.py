"""lower_to_backend: reference patterns (dequantize → float op → quantize) become the
backend's kernels (quantized modules with prepacked weights, ``torch.ops.quantized.*``),
through the backend's rule table. A pattern a rule declines stays a correct reference op, with
the reason recorded.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch.fx as fx

from fxquant.backends import kernel_check
from fxquant.backends.base import SHARED, SHARED_ALL, Backend, LowerCtx, Rule
from fxquant.backends.engine import current_engine, engine, supported_engines
from fxquant.backends.kernel_check import CheckResult
from fxquant.backends.reference_ops import is_dequantize, is_quantize, quantize_qparams
from fxquant.meta import SharedSpec, inherit, qinfo, record
from fxquant.patterns import NoMatch
from fxquant.records import TUPLE_ITEM_RULE, Action, QKind, Role
from fxquant.pipeline import PassContext, PassResult
from fxquant.slots import get_input


@dataclass(frozen=True)
class LowerToBackend:
    name: ClassVar[str] = "lower_to_backend"
    requires: ClassVar[frozenset[str]] = frozenset({"reference"})
    provides: ClassVar[frozenset[str]] = frozenset({"lowered"})
    check_kernels: bool = True  # run each kernel against the reference on random data

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        backend = ctx.options.backend
        stats: Counter[str] = Counter()
        with engine(backend.engine):
            for node in list(gm.graph.nodes):
                info = qinfo(node)
                if node.graph is None or info.rule is None or info.role != Role.OP:
                    continue
                if info.group is not None and not info.group_root:
                    continue  # lowered with its group's root
                if info.rule == TUPLE_ITEM_RULE:
                    continue  # lowered with its tuple op
                stats[_lower_one(gm, backend, node, self.check_kernels)] += 1
            _forget_first_calls(gm)
        gm.recompile()
        return PassResult(gm, stats["lowered"] > 0, dict(stats))


def _forget_first_calls(gm: fx.GraphModule) -> int:
    """Lowering ran the new modules at the example inputs' shape (probe, kernel check, engine
    choice); kernels that keep what their first call built (``forget_first_call``, oneDNN's
    primitive) are reset so that the user's first call sets it, as in a module nobody ran."""
    return sum(bool(m.forget_first_call()) for m in gm.modules()
               if callable(getattr(m, "forget_first_call", None)))


def _group_nodes(gm: fx.GraphModule, root: fx.Node) -> tuple[fx.Node, ...]:
    gid = qinfo(root).group
    if gid is None:
        return (root,)
    chain = [root]
    node = root
    while isinstance(node.args[0], fx.Node) and qinfo(node.args[0]).group == gid:
        node = node.args[0]
        chain.append(node)
    return tuple(reversed(chain))


def _lower_in_place(gm: fx.GraphModule, backend: Backend, node: fx.Node) -> str:
    """Dynamic / weight-only ops: float in, float out; the rule swaps in the quantized module."""
    rule = backend.rule_named(qinfo(node).rule)
    lctx = LowerCtx(gm, node, dict(gm.named_modules()), {}, backend=backend)
    with gm.graph.inserting_before(node):
        new = rule.lower(lctx) if rule.lower else NoMatch("the rule has no lowering")
    if isinstance(new, NoMatch):
        record(node, LowerToBackend.name, Action.KEEP_FLOAT, f"stays float: {new.reason}")
        return "kept_float"
    info = inherit(new, node)
    info.kernel = lctx.kernel or rule.kernel
    record(new, LowerToBackend.name, Action.LOWER, f"runs on {info.kernel}")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return "lowered"


def _lower_tuple(gm: fx.GraphModule, node: fx.Node) -> str:
    """chunk / split / unbind on a quantized tensor: run it on the quantized tensor; each item
    (getitem) keeps the input's qparams, so the quantize after each item goes away."""
    src = node.args[0]
    if not is_dequantize(src):
        return _decline(node, "input is not a dequantized tensor")
    qin = src.args[0]
    items = list(node.users)
    quantizes = []
    for item in items:
        users = list(item.users)
        if qinfo(item).rule != TUPLE_ITEM_RULE or len(users) != 1 or not is_quantize(users[0]):
            return _decline(node, f"item {item.name} is not requantized with shared qparams")
        quantizes.append(users[0])
    node.args = (qin, *node.args[1:])
    record(node, LowerToBackend.name, Action.LOWER, "runs on the quantized tensor; items keep "
                                                    "its scale/zero_point")
    qinfo(node).kernel = f"{node.target if isinstance(node.target, str) else node.target.__name__}"\
                         f" on the quantized tensor"
    for item, q in zip(items, quantizes):
        info = qinfo(item)
        known = qinfo(qin).qparams if not is_quantize(qin) else None
        info.kernel = "item of a quantized tuple"
        info.qparams = dict(known) if known else (None if _runtime_qparams(qin)
                                                   else _qparams_dict(q))  # before erase_node
        q.replace_all_uses_with(item)                                      # clears q's args
        gm.graph.erase_node(q)
        record(item, LowerToBackend.name, Action.LOWER, "item of the quantized tuple")
    return "lowered"


def _runtime_qparams(node: fx.Node) -> bool:
    """Is ``node`` a quantized value whose qparams only a kernel knows (add_scalar, or a shared
    op downstream of one)?"""
    return not is_quantize(node) and qinfo(node).kernel is not None and qinfo(node).qparams is None


def _qparams_dict(q: fx.Node) -> dict:
    scale, zp, dtype = quantize_qparams(q)
    return {"scale": scale, "zero_point": zp, "dtype": dtype}


def _lower_one(gm: fx.GraphModule, backend: Backend, root: fx.Node, check: bool) -> str:
    if qinfo(root).qkind in (QKind.DYNAMIC, QKind.WEIGHT_ONLY):
        return _lower_in_place(gm, backend, root)
    if backend.rule_named(qinfo(root).rule).multi_output:
        return _lower_tuple(gm, root)
    group = _group_nodes(gm, root)
    first = group[0]
    users = list(root.users)
    if len(users) != 1 or not is_quantize(users[0]):
        return _decline(root, "output is not quantized here (no single quantize after it)")
    q_out = users[0]
    qinputs = {}
    keys = list(qinfo(first).input_specs)
    shared = qinfo(root).output_spec
    if isinstance(shared, SharedSpec) and shared.input_index not in keys:
        keys.append(shared.input_index)  # reuse-input: the input was observed upstream
    for key in keys:
        arg = get_input(first, key)
        if not is_dequantize(arg):
            return _decline(root, f"input {key} is not a dequantized tensor")
        qinputs[key] = arg.args[0]
    scale, zp, dtype = quantize_qparams(q_out)
    modules = dict(gm.named_modules())
    lctx = LowerCtx(gm, first, modules, qinputs, scale, zp, dtype, group if len(group) > 1 else (),
                    backend=backend)
    rule = backend.rule_named(qinfo(root).rule)
    attempt = _Attempt(gm, backend, rule, group, q_out, check)
    new, lctx = attempt.lower(lctx)
    if isinstance(new, _Refused):
        return _refuse(root, rule, new)
    if isinstance(new, NoMatch):
        return _decline(root, new.reason)
    kernel = lctx.kernel or rule.kernel
    if lctx.pack_engine:
        kernel += f" (weights packed with {lctx.pack_engine})"
    _finish(gm, root, group, q_out, new, kernel, (scale, zp, dtype), attempt.checks)
    _set_output_qparams(new, lctx, rule, dtype)
    return "lowered"


def _set_output_qparams(new: fx.Node, lctx: LowerCtx, rule: Rule, dtype: Any) -> None:
    qinputs = lctx.qinputs
    if lctx.derived_qparams and lctx.derived is not None:
        qinfo(new).qparams = {"scale": lctx.derived[0], "zero_point": lctx.derived[1],
                              "dtype": dtype}  # what the kernel derives (add_scalar ...)
    elif lctx.derived_qparams:
        qinfo(new).qparams = None  # chosen by a kernel at run time
    elif rule.qparams in (SHARED, SHARED_ALL) and qinputs:
        first = next(iter(qinputs.values()))
        src = qinfo(first).qparams if not is_quantize(first) else None
        if _runtime_qparams(first):
            qinfo(new).qparams = None
        elif src is not None:
            qinfo(new).qparams = dict(src)  # the kernel keeps its input's qparams


@dataclass(frozen=True)
class _Refused:
    """Every kernel tried was off against the reference: the check results, in try order."""

    results: tuple[tuple[str, CheckResult], ...]  # (kernel, result)


@dataclass
class _Attempt:
    """Lowering one reference pattern, checked numerically: the backend's kernel first, then
    the rule's alternative engines; a kernel that fails the check is taken out again."""

    gm: fx.GraphModule
    backend: Backend
    rule: Rule
    group: tuple[fx.Node, ...]
    q_out: fx.Node
    check: bool
    checks: list = field(default_factory=list)  # (kernel, CheckResult) of each try

    def lower(self, base: LowerCtx) -> tuple[Any, LowerCtx]:
        """The lowered node (or the NoMatch of the first try, or _Refused) and its context."""
        alternatives = tuple(e for e in self.rule.alt_engines
                             if e in supported_engines() and e != current_engine())
        for pack in (None, *alternatives):
            lctx = replace(base, pack_engine=pack)
            new = self._try(lctx)
            if new is None or (isinstance(new, NoMatch) and self.checks):
                continue  # refused by the check, or an alternative that does not apply
            return new, lctx
        return _Refused(tuple(self.checks)), base

    def _try(self, lctx: LowerCtx) -> Any:
        """The lowered node (or NoMatch) to keep; None when the check refused the kernel."""
        specs = kernel_check.input_specs(lctx) if self.check else None
        scope = (self.backend.name, self.rule.name, _qualname(self.rule.lower),
                 lctx.pack_engine or "")
        key = kernel_check.check_key(lctx, scope, self.q_out, specs)
        cached = kernel_check.lookup(key)
        if cached is not None and not cached.ok:
            self.checks.append((self.rule.kernel, cached))
            return None
        anchor, buffers = self.q_out.prev, set(self.gm._buffers)
        with self.gm.graph.inserting_before(self.q_out):
            new = self.rule.lower(lctx) if self.rule.lower else NoMatch("the rule has no lowering")
        if isinstance(new, NoMatch) or key is None:
            return new
        result = cached or kernel_check.run_check(lctx, kernel_check.Lowering(
            self.group, _inserted(anchor, self.q_out), self.q_out), specs)
        kernel_check.store(key, result)
        self.checks.append((lctx.kernel or self.rule.kernel, result))
        if result.ok:
            return new
        _undo(self.gm, lctx, anchor, self.q_out, buffers)
        return None


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def _inserted(anchor: fx.Node, end: fx.Node) -> tuple[fx.Node, ...]:
    """The nodes a lowering inserted between ``anchor`` and ``end``, in graph order."""
    out, n = [], anchor.next
    while n is not end:
        out.append(n)
        n = n.next
    return tuple(out)


def _undo(gm: fx.GraphModule, lctx: LowerCtx, anchor: fx.Node, q_out: fx.Node,
          buffers: set[str]) -> None:
    """Take a refused kernel out again: its nodes, the modules it swapped in, its buffers."""
    from fxquant.graph_edit import set_submodule

    inserted = _inserted(anchor, q_out)
    targets = {n.target for n in inserted if n.op == "call_module"}
    if lctx.node.op == "call_module":
        targets.add(lctx.node.target)
    for n in reversed(inserted):
        gm.graph.erase_node(n)
    for target in targets:
        old = lctx.modules.get(target)
        if old is not None and gm.get_submodule(target) is not old:
            set_submodule(gm, target, old)
    for name in set(gm._buffers) - buffers:
        del gm._buffers[name]


def _refuse(root: fx.Node, rule: Rule, refused: _Refused) -> str:
    tried = "; ".join(f"{kernel}: {result.summary()}" for kernel, result in refused.results)
    record(root, LowerToBackend.name, Action.KEEP_FLOAT,
           f"runs in float between dequantize/quantize: the kernel is wrong here, off the "
           f"reference computation by more than {kernel_check.STEP_TOLERANCE} step on random "
           f"inputs ({tried})",
           kernel=rule.kernel, max_steps=max(r.max_steps for _, r in refused.results))
    return "kernel_refused"


def _finish(gm: fx.GraphModule, root: fx.Node, group: tuple[fx.Node, ...], q_out: fx.Node,
            new: fx.Node, kernel: str, qparams: tuple, checks: list) -> None:
    info = inherit(new, root)
    info.kernel = kernel
    info.qparams = {"scale": qparams[0], "zero_point": qparams[1], "dtype": qparams[2]}
    if len(group) > 1:
        info.fused_from = tuple(n.name for n in group)
    refused = [f"{k}: {r.summary()}" for k, r in checks if not r.ok]
    reason = f"runs on {kernel}"
    if refused:
        reason += f" (instead of the backend's kernel, which is wrong here: {'; '.join(refused)})"
    record(new, LowerToBackend.name, Action.LOWER, reason, scale=qparams[0],
           zero_point=qparams[1],
           **({"check": checks[-1][1].summary()} if checks else {}))
    q_out.replace_all_uses_with(new)
    gm.graph.erase_node(q_out)
    for n in reversed(group):
        if not n.users:
            gm.graph.erase_node(n)


def _decline(node: fx.Node, reason: str) -> str:
    record(node, LowerToBackend.name, Action.KEEP_REFERENCE,
           f"not lowered, runs in float between dequantize/quantize: {reason}")
    return "kept_reference"
