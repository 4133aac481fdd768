"""insert_observers: the mechanism. Put observers (PTQ) or fake-quant modules (QAT) exactly
where ``annotate`` said: on each quantized input edge whose value is not observed yet, and on
each output with its own qparams. A shared output calls the *same* observer module as its
input, so both are measured by one observer and get one scale/zero_point.

Sharing is a set of constraints ("these observers must give one scale"): an op with a shared
output joins its input's set, and an op whose inputs and output all share (cat) joins the sets
of all its inputs. The sets are merged with union-find while the pass walks the graph, and
only at the end does every observer call of a set get the set's one module, so a later merge
can never split an earlier one. An input whose observer cannot share (fixed qparams, another
dtype) is requantized into the set instead.

An input read after an in-place write that it does not read through (``y = x[:, :2];
y.relu_(); conv(x)``) is observed where it is read, so that the observer sees the mutation.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch.fx as fx

from fxquant.aliasing import AliasInfo
from fxquant.errors import FxQuantError
from fxquant.graph_edit import del_submodule
from fxquant.meta import QNodeInfo, QSpec, SharedSpec, qinfo, record
from fxquant.pipeline import PassContext, PassResult
from fxquant.records import Action, Role
from fxquant.slots import get_input, set_input

OBSERVER_PREFIX = "activation_post_process_"


@dataclass(frozen=True)
class InsertObservers:
    name: ClassVar[str] = "insert_observers"
    requires: ClassVar[frozenset[str]] = frozenset({"annotated"})
    provides: ClassVar[frozenset[str]] = frozenset({"observed"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ins = _Inserter(gm, ctx.options.observer_factory_wrapper, AliasInfo.of(gm))
        for node in list(gm.graph.nodes):
            info = qinfo(node)
            if info.role != Role.OP or not node.op.startswith("call_"):
                continue
            for key, spec in info.input_specs.items():
                ins.observe_input(node, key, spec)
            if isinstance(info.output_spec, QSpec):
                ins.observe_output(node, info.output_spec)
            elif isinstance(info.output_spec, SharedSpec):
                ins.share_output(node, info.output_spec)
        ins.groups.apply(gm, ins.stats)
        if ins.stats:
            gm.recompile()
        return PassResult(gm, bool(ins.stats), dict(ins.stats))


def is_observer_node(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" \
        and qinfo(node).role == Role.OBSERVER


def observed_value(node: fx.Node) -> fx.Node:
    """The value an observer node (or a chain of them) measures; ``node`` itself otherwise."""
    while is_observer_node(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


# Rules whose kernel chooses its output qparams from its input's (quantized::add_scalar /
# mul_scalar, fxquant/backends/native.py): their output observer only measures the range; the
# int8 tensor the kernel returns has other qparams, so it cannot join a cat's set as it is.
DERIVED_QPARAMS_RULES = frozenset({"add_scalar", "mul_scalar"})


def can_share(a: QSpec, b: QSpec) -> bool:
    """Can values observed with specs ``a`` and ``b`` be measured by one observer?"""
    return a.fixed is None and b.fixed is None and a.dtype == b.dtype and a.qscheme == b.qscheme


def kernel_derived(obs: fx.Node, through: Callable[[fx.Node], fx.Node] = observed_value
                   ) -> Optional[fx.Node]:
    """The op, upstream of observer ``obs`` through ops that keep their input's qparams, whose
    kernel derives its output qparams itself (None: the tensor has the observer's qparams).
    ``through`` steps from an edge to the value on it (past observers; convert also steps past
    the quantize / dequantize pairs it has made)."""
    value = through(obs)
    for _ in range(len(obs.graph.nodes)):
        if not isinstance(value, fx.Node):
            return None
        info = qinfo(value)
        if info.rule in DERIVED_QPARAMS_RULES:
            return value
        spec = info.output_spec
        if not isinstance(spec, SharedSpec) or spec.all_inputs:
            return None
        src = get_input(value, spec.input_index)
        value = through(src) if isinstance(src, fx.Node) else None
    return None


class _SharedGroups:
    """Union-find over observer module names: each set ends up as one module."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.order: dict[str, int] = {}
        self.why: dict[str, list[str]] = {}  # root -> the ops that joined the set

    def add(self, name: str) -> None:
        if name not in self.parent:
            self.parent[name] = name
            self.order[name] = len(self.order)

    def find(self, name: str) -> str:
        root = name
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[name] != root:  # path compression
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, a: str, b: str, why: str) -> str:
        self.add(a)
        self.add(b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if self.order[rb] < self.order[ra]:
                ra, rb = rb, ra  # the earliest observer keeps its module
            self.parent[rb] = ra
            self.why[ra] = self.why.get(ra, []) + self.why.pop(rb, [])
        if why not in self.why.setdefault(ra, []):
            self.why[ra].append(why)
        return ra

    def apply(self, gm: fx.GraphModule, stats: Counter[str]) -> None:
        """Point every observer call at its set's module; drop the modules left unused."""
        dropped: set[str] = set()
        for node in gm.graph.nodes:
            name = str(node.target)
            if not is_observer_node(node) or name not in self.parent:
                continue
            root = self.find(name)
            if root == name:
                continue
            node.target = root
            dropped.add(name)
            ops = ", ".join(self.why.get(root, []))
            record(node, InsertObservers.name, Action.SHARE_OBSERVER,
                   f"uses {root} instead of {name}: {ops} need one scale/zero_point for every "
                   f"input and output", observer=root)
            stats["aliased"] += 1
        for name in dropped:
            del_submodule(gm, name)


class _Inserter:
    def __init__(self, gm: fx.GraphModule, wrap: Any, aliases: AliasInfo) -> None:
        self.gm = gm
        self.wrap = wrap  # QAT: turns an observer factory into a fake-quant factory
        self.aliases = aliases
        self.observed: dict[fx.Node, fx.Node] = {}
        self.at_read: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
        self.groups = _SharedGroups()
        self.stats: Counter[str] = Counter()
        self.count = sum(1 for n, _ in gm.named_children() if n.startswith(OBSERVER_PREFIX))

    def _new_module_name(self) -> str:
        while hasattr(self.gm, f"{OBSERVER_PREFIX}{self.count}"):
            self.count += 1
        name = f"{OBSERVER_PREFIX}{self.count}"
        self.count += 1
        return name

    def _make(self, value: fx.Node, spec: QSpec, why: str, shared_target: Optional[str] = None,
              before: Optional[fx.Node] = None) -> fx.Node:
        """An observer call on ``value``: right after it, or right before ``before`` (its
        reader); a new module, or the module ``shared_target`` names."""
        if shared_target is None:
            factory = self.wrap(spec.observer) if self.wrap else spec.observer
            target = self._new_module_name()
            self.gm.add_submodule(target, factory())
            self.groups.add(target)
        else:
            target = shared_target
        where = self.gm.graph.inserting_before(before) if before is not None \
            else self.gm.graph.inserting_after(value)
        with where:
            obs = self.gm.graph.call_module(target, (value,))
        src = qinfo(value)
        # a second observation of a value (requantized, or read after a mutation) is not the
        # output of the op that produced it: no debug handle, so compare skips it
        own = before is None and not is_observer_node(value)
        handle = src.debug_handle if own else None
        obs.meta["fxquant"] = QNodeInfo(module_path=src.module_path, role=Role.OBSERVER,
                                        source=src.source, debug_handle=handle, value=src.value,
                                        output_spec=spec)
        module = self.gm.get_submodule(target)
        record(obs, InsertObservers.name,
               Action.SHARE_OBSERVER if shared_target else Action.OBSERVE,
               f"{why}: {type(module).__name__}({str(spec.dtype).replace('torch.', '')})",
               observer=target)
        self.stats["shared" if shared_target else "observers"] += 1
        return obs

    def observe_input(self, node: fx.Node, key: Any, spec: QSpec) -> None:
        arg = get_input(node, key)
        if not isinstance(arg, fx.Node):
            return
        if spec.is_dynamic:
            return  # dynamic: the kernel measures its input at run time
        mutation = self.aliases.hidden_mutation(observed_value(arg), node)
        if mutation is not None:
            set_input(node, key, self._observe_at_read(node, arg, spec, mutation))
            return
        if is_observer_node(arg):
            return  # the producer's output is observed already
        obs = self.observed.get(arg)
        if obs is None:
            obs = self._make(arg, spec, f"input of {node.name}")
            self.observed[arg] = obs
        set_input(node, key, obs)

    def _observe_at_read(self, node: fx.Node, arg: fx.Node, spec: QSpec, mutation: fx.Node
                         ) -> fx.Node:
        """``arg`` was written in place (``mutation``) after it was produced, through another
        node than the one ``node`` reads: observe it right before ``node`` reads it."""
        obs = self.at_read.get((node, arg))
        if obs is None:
            obs = self._make(arg, spec, f"input of {node.name}, observed where it is read: "
                                        f"{mutation.name} writes it in place before",
                             before=node)
            self.at_read[(node, arg)] = obs
            self.stats["observed_at_read"] += 1
        return obs

    def observe_output(self, node: fx.Node, spec: QSpec) -> None:
        if spec.is_dynamic:
            return
        obs = self._make(node, spec, f"output of {node.name}")
        _redirect_users(node, obs)
        self.observed[node] = obs

    def share_output(self, node: fx.Node, spec: SharedSpec) -> None:
        src = get_input(node, spec.input_index)
        while not is_observer_node(src) and isinstance(src, fx.Node) and src.args \
                and qinfo(src).rule is not None and qinfo(src).output_spec is None:
            src = src.args[0]  # an item of a tuple op: the observer of the tuple op's input
        if not is_observer_node(src):
            raise FxQuantError(f"{node.name} shares the qparams of input {spec.input_index}, "
                               f"which is not observed", node,
                               hint="annotate must give a shared op an input spec")
        target = str(src.target)
        if spec.all_inputs:
            target = self._join_inputs(node)
            src = get_input(node, spec.input_index)  # requantized by the set's observer?
        out_spec = qinfo(src).output_spec
        obs = self._make(node, out_spec, f"output of {node.name} shares {target}",
                         shared_target=target)
        _redirect_users(node, obs)
        self.observed[node] = obs

    def _join_inputs(self, node: fx.Node) -> str:
        """cat: every input observer and the output join one set. An input whose observer
        cannot share with the op's input spec is requantized by an observer of the set."""
        anchor: Optional[str] = None
        for key, spec in qinfo(node).input_specs.items():
            arg = get_input(node, key)
            if not is_observer_node(arg):
                continue
            theirs = qinfo(arg).output_spec
            if not can_share(theirs, spec):
                what = f"fixed qparams {theirs.fixed}" if theirs.fixed is not None \
                    else str(theirs.dtype).replace("torch.", "")
                arg = self._requantize(node, key, arg, spec, f"its observer ({what})")
            elif kernel_derived(arg) is not None:
                arg = self._requantize(node, key, arg, spec,
                                       f"{kernel_derived(arg).name}'s kernel derives its qparams")
            name = str(arg.target)
            anchor = name if anchor is None else self.groups.union(anchor, name, node.name)
        if anchor is None:
            raise FxQuantError(f"{node.name} shares one observer among its inputs, but none "
                               f"is observed", node, hint="annotate must give cat input specs")
        return anchor

    def _requantize(self, node: fx.Node, key: Any, arg: fx.Node, spec: QSpec, why: str
                    ) -> fx.Node:
        obs = self._make(arg, spec, f"input of {node.name}, requantized: {why}, so it cannot "
                                    f"share {node.name}'s scale")
        set_input(node, key, obs)
        self.stats["requantized"] += 1
        return obs


def _redirect_users(node: fx.Node, obs: fx.Node) -> None:
    for user in list(node.users):
        if user is not obs:
            user.replace_input_with(node, obs)
