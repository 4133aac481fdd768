"""convert: observers become quantize → dequantize with the measured qparams, and weighted
modules become reference modules whose weights are quantized with the qconfig's weight
observer. The result is the *reference* quantized graph: q/dq around float ops, numerically
what the backend kernels compute.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxquant.backends.reference_ops import (activation_qparams, has_reference, insert_dequantize,
                                            insert_quantize, to_reference)
from fxquant.errors import FxQuantError
from fxquant.meta import QNodeInfo, inherit, qinfo, record
from fxquant.pipeline import PassContext, PassResult

from fxquant.backends.reference_ops import INTEGER_DTYPES as _INT_DTYPES


@dataclass(frozen=True)
class Convert:
    name: ClassVar[str] = "convert"
    requires: ClassVar[frozenset[str]] = frozenset({"observed"})
    provides: ClassVar[frozenset[str]] = frozenset({"reference"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        stats["modules_unshared"] = _unshare_weighted_modules(gm)
        if not stats["modules_unshared"]:
            del stats["modules_unshared"]
        for node in list(gm.graph.nodes):
            info = qinfo(node)
            if info.role == "observer":
                stats[_convert_observer(gm, node)] += 1
            elif info.qkind in ("dynamic", "weight_only"):
                record(node, self.name, "defer", "weights are quantized when lowered "
                       "(convert_fx); the reference graph keeps this op float")
                stats["deferred"] += 1
            elif info.weight_spec is not None and node.op == "call_module":
                stats[_convert_weighted(gm, node)] += 1
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, bool(stats), dict(stats))


def _unshare_weighted_modules(gm: fx.GraphModule) -> int:
    """A weighted module called from several places gets one copy per call: each call has
    its own output qparams, which a quantized module holds."""
    import copy as _copy

    seen: set[str] = set()
    copies = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or qinfo(node).weight_spec is None:
            continue
        target = str(node.target)
        if target not in seen:
            seen.add(target)
            continue
        name, i = f"{target.replace('.', '_')}_call", 1
        while hasattr(gm, f"{name}{i}"):
            i += 1
        gm.add_submodule(f"{name}{i}", _copy.deepcopy(gm.get_submodule(target)))
        node.target = f"{name}{i}"
        record(node, Convert.name, "unshare", f"module '{target}' is called more than once: "
               f"this call gets its own copy '{name}{i}' (its own output qparams)")
        copies += 1
    return copies


def _convert_observer(gm: fx.GraphModule, node: fx.Node) -> str:
    obs = gm.get_submodule(str(node.target))
    x = node.args[0]
    if getattr(obs, "dtype", None) not in _INT_DTYPES or getattr(obs, "is_dynamic", False):
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        return "observers_removed"
    _check_calibrated(obs, node)
    scale, zp, dtype = activation_qparams(obs)
    with gm.graph.inserting_before(node):
        q = insert_quantize(gm.graph, x, scale, zp, dtype)
        dq = insert_dequantize(gm.graph, q)
    qparams = {"scale": scale, "zero_point": zp, "dtype": dtype}
    for new, role in ((q, "quantize"), (dq, "dequantize")):
        info = inherit(new, node)
        info.role, info.qparams = role, qparams
        info.decisions = []
    record(q, Convert.name, "quantize", f"{node.target}: scale={scale:.6g} zero_point={zp} "
                                        f"{str(dtype).replace('torch.', '')}", **qparams)
    record(dq, Convert.name, "dequantize", "back to float for the reference op after it")
    if isinstance(x, fx.Node) and qinfo(x).role == "op":
        qinfo(x).qparams = qparams
    node.replace_all_uses_with(dq)
    gm.graph.erase_node(node)
    return "quantize_dequantize"


def _check_calibrated(obs: torch.nn.Module, node: fx.Node) -> None:
    min_val = getattr(obs, "min_val", None)
    if isinstance(min_val, torch.Tensor) and min_val.numel() and torch.isinf(min_val).all():
        raise FxQuantError(
            f"observer {node.target} saw no data: the prepared model was not calibrated "
            f"(or this branch never ran)", node,
            hint="run the prepared model on representative inputs before convert_fx")


def _convert_weighted(gm: fx.GraphModule, node: fx.Node) -> str:
    from fxquant.passes.fuse import _set_submodule

    info = qinfo(node)
    module = gm.get_submodule(str(node.target))
    if not has_reference(module):
        return "weight_not_quantized"
    ref, wq = to_reference(module, info.weight_spec.observer)
    _set_submodule(gm, str(node.target), ref)
    scheme = str(wq.qscheme).replace("torch.", "")
    record(node, Convert.name, "quantize_weight",
           f"weight {str(wq.dtype).replace('torch.', '')} {scheme} "
           f"({wq.scale.numel()} scale{'s' if wq.scale.numel() > 1 else ''}); reference module "
           f"{type(ref).__name__}")
    return "weights_quantized"
