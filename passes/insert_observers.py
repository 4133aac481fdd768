"""insert_observers: the mechanism. Put observers (PTQ) or fake-quant modules (QAT) exactly
where ``annotate`` said: on each quantized input edge whose value is not observed yet, and on
each output with its own qparams. A shared output calls the *same* observer module as its
input, so both are measured by one observer and get one scale/zero_point.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch.fx as fx
import torch.nn as nn

from fxquant.errors import FxQuantError
from fxquant.meta import QNodeInfo, QSpec, SharedSpec, qinfo, record
from fxquant.pipeline import PassContext, PassResult
from fxquant.slots import get_input, set_input

OBSERVER_PREFIX = "activation_post_process_"


@dataclass(frozen=True)
class InsertObservers:
    name: ClassVar[str] = "insert_observers"
    requires: ClassVar[frozenset[str]] = frozenset({"annotated"})
    provides: ClassVar[frozenset[str]] = frozenset({"observed"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ins = _Inserter(gm, ctx.get("observer_factory_wrapper"))
        for node in list(gm.graph.nodes):
            info = qinfo(node)
            if info.role != "op" or not node.op.startswith("call_"):
                continue
            for key, spec in info.input_specs.items():
                ins.observe_input(node, key, spec)
            if isinstance(info.output_spec, QSpec):
                ins.observe_output(node, info.output_spec)
            elif isinstance(info.output_spec, SharedSpec):
                ins.share_output(node, info.output_spec)
        if ins.stats:
            gm.recompile()
        return PassResult(gm, bool(ins.stats), dict(ins.stats))


def is_observer_node(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and qinfo(node).role == "observer"


class _Inserter:
    def __init__(self, gm: fx.GraphModule, wrap: Any) -> None:
        self.gm = gm
        self.wrap = wrap  # QAT: turns an observer factory into a fake-quant factory
        self.observed: dict[fx.Node, fx.Node] = {}
        self.stats: Counter[str] = Counter()
        self.count = sum(1 for n, _ in gm.named_children() if n.startswith(OBSERVER_PREFIX))

    def _new_module_name(self) -> str:
        while hasattr(self.gm, f"{OBSERVER_PREFIX}{self.count}"):
            self.count += 1
        name = f"{OBSERVER_PREFIX}{self.count}"
        self.count += 1
        return name

    def _make(self, value: fx.Node, spec: QSpec, why: str, shared_target: Optional[str] = None
              ) -> fx.Node:
        if shared_target is None:
            factory = self.wrap(spec.observer) if self.wrap else spec.observer
            target = self._new_module_name()
            self.gm.add_submodule(target, factory())
        else:
            target = shared_target
        with self.gm.graph.inserting_after(value):
            obs = self.gm.graph.call_module(target, (value,))
        src = qinfo(value)
        info = QNodeInfo(module_path=src.module_path, role="observer", source=src.source,
                         debug_handle=src.debug_handle, value=src.value, output_spec=spec)
        obs.meta["fxquant"] = info
        module = self.gm.get_submodule(target)
        record(obs, InsertObservers.name, "share_observer" if shared_target else "observe",
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
        if is_observer_node(arg):
            return  # the producer's output is observed already
        obs = self.observed.get(arg)
        if obs is None:
            obs = self._make(arg, spec, f"input of {node.name}")
            self.observed[arg] = obs
        set_input(node, key, obs)

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
        if spec.all_inputs and is_observer_node(src):
            self._alias_inputs(node, str(src.target))
        if not is_observer_node(src):
            raise FxQuantError(f"{node.name} shares the qparams of input {spec.input_index}, "
                               f"which is not observed", node,
                               hint="annotate must give a shared op an input spec")
        out_spec = qinfo(src).output_spec
        obs = self._make(node, out_spec, f"output of {node.name} shares {src.target}",
                         shared_target=str(src.target))
        _redirect_users(node, obs)
        self.observed[node] = obs


def _alias(self: "_Inserter", node: fx.Node, target: str) -> None:
    """Make every input observer of ``node`` the same module as ``target`` (cat: inputs and
    output share one scale/zero_point, so the kernel copies data without requantizing)."""
    shared = self.gm.get_submodule(target)
    for key in qinfo(node).input_specs:
        arg = get_input(node, key)
        if is_observer_node(arg) and arg.target != target:
            parent, _, attr = str(arg.target).rpartition(".")
            setattr(self.gm.get_submodule(parent) if parent else self.gm, attr, shared)
            record(arg, InsertObservers.name, "share_observer",
                   f"shares {target} with the other inputs of {node.name}")
            self.stats["aliased"] += 1


_Inserter._alias_inputs = _alias


def _redirect_users(node: fx.Node, obs: fx.Node) -> None:
    for user in list(node.users):
        if user is not obs:
            user.replace_input_with(node, obs)
