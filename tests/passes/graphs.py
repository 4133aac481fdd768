"""Helpers for the per-pass tests: graph structure (node names ignored), running one pass or a
prefix of the pipeline on a tiny model, and decision checks."""
from __future__ import annotations

import operator
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.lint import verify
from fxquant.meta import qinfo, qinfo_or_none
from fxquant.options import QuantOptions
from fxquant.pipeline import PassContext, PassManager, PassResult
from fxquant.trace import record_values, trace

# The facts each pass of the default pipelines provides, in pipeline order.
PREPARE_FACTS = ("traced", "normalized", "fused", "qconfig", "annotated", "observed")


def target_str(node: fx.Node, modules: Optional[dict[str, nn.Module]] = None) -> str:
    """What a node runs, without its name: ``torch.add``, ``F.relu``, ``operator.add``,
    ``torch.ops.quantized.add_relu``, a module class name, a method name."""
    t = node.target
    if node.op == "call_module":
        modules = modules if modules is not None else dict(
            node.graph.owning_module.named_modules(remove_duplicate=False))
        return type(modules[t]).__name__
    if node.op == "call_method":
        return str(t)
    if node.op != "call_function":
        return ""
    if isinstance(t, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return "torch.ops." + t._qualified_op_name.replace("::", ".") if isinstance(
            t, torch._ops.OpOverloadPacket) else "torch.ops." + str(t).replace("::", ".")
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if t in vars(operator).values() and getattr(operator, name, None) is t:
        return f"operator.{name}"
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if getattr(torch, name, None) is t:
        return f"torch.{name}"
    if getattr(torch.nn.functional, name, None) is t:
        return f"F.{name}"
    return f"{mod}.{name}" if mod else name


def structure(gm: fx.GraphModule, calls_only: bool = False) -> list[str]:
    """The graph as a list of ``"<op>:<target kind>"`` strings, names ignored:
    ``placeholder``, ``call_function:torch.add``, ``call_module:Conv2d``,
    ``call_method:dequantize``, ``get_attr``, ``output``. The get_attr nodes of a quantize's
    scale / zero-point buffers (record role "quantize") are its arguments, not ops: left out,
    as constants are."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    out = []
    for n in gm.graph.nodes:
        info = qinfo_or_none(n)
        if n.op == "get_attr" and info is not None and info.role == "quantize":
            continue
        if n.op in ("placeholder", "output", "get_attr"):
            if not calls_only:
                out.append(n.op)
            continue
        out.append(f"{n.op}:{target_str(n, modules)}")
    return out


def calls(gm: fx.GraphModule) -> list[str]:
    return structure(gm, calls_only=True)


def traced(model: nn.Module, *inputs: Any) -> fx.GraphModule:
    """fxquant's trace (a copy of ``model``) with the example values recorded on the nodes."""
    gm = trace(model)
    if inputs:
        record_values(gm, tuple(inputs))
    return gm


def run_passes(gm: fx.GraphModule, passes: Sequence[Any], options: Optional[dict] = None,
               facts: Iterable[str] = ("traced",)) -> tuple[PassResult, PassContext]:
    """Run ``passes`` through a verifying PassManager (verify after each pass). Returns
    (result, ctx); ``result.modified`` and ``result.stats`` are those of the LAST pass (the
    PassManager's own result sums the stats of all passes), with zero counts left out so that
    tests compare what happened (ctx.stats keeps the raw dicts)."""
    ctx = PassContext(options=QuantOptions.from_dict(options or {}))
    pm = PassManager(passes, verify=True, initial_facts=facts)
    last: dict[str, Any] = {}

    class _Last:
        def before_pass(self, p, gm, ctx):  # noqa: ANN001
            pass

        def after_pass(self, p, result, ctx, index):  # noqa: ANN001
            last["result"] = result

    pm.instruments.append(_Last())
    result = pm.run(gm, ctx)
    stats = {k: v for k, v in last["result"].stats.items() if v}
    return PassResult(result.gm, last["result"].modified, stats), ctx


def run_one(p: Any, gm: fx.GraphModule, options: Optional[dict] = None) -> PassResult:
    """Call one pass directly, then verify the graph it returns."""
    result = p(gm, PassContext(options=QuantOptions.from_dict(options or {})))
    verify(result.gm, after=p.name)
    return result


def decisions(node: fx.Node, pass_name: Optional[str] = None, action: Optional[str] = None):
    info = qinfo_or_none(node)
    if info is None:
        return []
    return [d for d in info.decisions if (pass_name is None or d.pass_name == pass_name)
            and (action is None or d.action == action)]


def call_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op.startswith("call_")]


def assert_decisions_well_formed(gm: fx.GraphModule) -> None:
    """Every decision on every node names its pass and gives a non-empty reason."""
    for n in gm.graph.nodes:
        for d in decisions(n):
            assert d.pass_name and isinstance(d.pass_name, str), (n.name, d)
            assert d.action and d.reason and d.reason.strip(), (n.name, d)


def assert_every_call_decided(gm: fx.GraphModule, pass_name: Optional[str] = None) -> None:
    """Every call_* node carries at least one well-formed decision (of ``pass_name`` if given)."""
    assert_decisions_well_formed(gm)
    missing = [n.format_node() for n in call_nodes(gm) if not decisions(n, pass_name)]
    assert not missing, f"call nodes without a decision{' of ' + pass_name if pass_name else ''}: " \
                        f"{missing}"


def find(gm: fx.GraphModule, op: str, kind: str) -> list[fx.Node]:
    """Nodes whose structure string is ``f"{op}:{kind}"``."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    return [n for n in gm.graph.nodes if n.op == op and target_str(n, modules) == kind]


def one(gm: fx.GraphModule, op: str, kind: str) -> fx.Node:
    nodes = find(gm, op, kind)
    assert len(nodes) == 1, f"expected one {op}:{kind}, found {len(nodes)} in {structure(gm)}"
    return nodes[0]


def roles(gm: fx.GraphModule) -> list[str]:
    return [qinfo(n).role for n in call_nodes(gm)]


def prepared(model: nn.Module, *inputs: Any, mapping: Any = None, backend: Any = "x86",
             calibrate: bool = True) -> tuple[fx.GraphModule, dict]:
    """The prepare pipeline run pass by pass (verified); calibrated on ``inputs`` when asked.
    Returns (prepared gm, options for the convert passes)."""
    from fxquant.passes import prepare_pipeline
    from fxquant.qconfig import get_default_qconfig_mapping

    model = model.eval()
    gm = traced(model, *inputs)
    name = backend if isinstance(backend, str) else "x86"
    opts = {"qconfig_mapping": mapping if mapping is not None else
            get_default_qconfig_mapping(name), "backend": backend, "is_qat": False}
    result, _ = run_passes(gm, prepare_pipeline(), opts)
    if calibrate:
        with torch.no_grad():
            result.gm(*inputs)
    return result.gm, opts


CONVERT_FACTS = PREPARE_FACTS


class Fn(nn.Module):
    """forward(x) = fn(self, x); modules passed as keyword arguments become children."""

    def __init__(self, fn, **mods) -> None:
        super().__init__()
        self.fn = fn
        for k, m in mods.items():
            setattr(self, k, m)

    def forward(self, x):
        return self.fn(self, x)


class Fn2(Fn):
    """forward(x, y) = fn(self, x, y)."""

    def forward(self, x, y):
        return self.fn(self, x, y)
