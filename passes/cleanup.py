"""cleanup: drop dequantize → quantize pairs that give back the same quantized tensor, remove
the q/dq nodes nobody reads, delete unused submodules and recompile."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch.fx as fx

from fxquant.backends.reference_ops import is_dequantize, is_quantize, quantize_qparams
from fxquant.aliasing import is_written
from fxquant.meta import inherit, qinfo, record
from fxquant.pipeline import PassContext, PassResult
from fxquant.records import Action, Role

_REMOVABLE_ROLES = (Role.QUANTIZE, Role.DEQUANTIZE, Role.OBSERVER)


@dataclass(frozen=True)
class Cleanup:
    name: ClassVar[str] = "cleanup"
    requires: ClassVar[frozenset[str]] = frozenset({"reference"})
    provides: ClassVar[frozenset[str]] = frozenset({"clean"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for node in list(gm.graph.nodes):
            if is_quantize(node) and _drop_requantize(node):
                gm.graph.erase_node(node)
                stats["dq_q_removed"] += 1
            elif is_dequantize(node):
                moved = _read_metadata_from_quantized(node)
                if moved:
                    stats["metadata_reads_rewired"] += moved
                if _contiguous_for_views(gm, node):
                    stats["made_contiguous"] += 1
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and qinfo(node).role in _REMOVABLE_ROLES and node.op != "output":
                gm.graph.erase_node(node)
                stats["dead_removed"] += 1
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, bool(stats), dict(stats))


_METADATA = ("size", "dim", "numel", "ndimension", "nelement")


def _read_metadata_from_quantized(dq: fx.Node) -> int:
    """``x.size()`` / ``x.dim()`` of a dequantized tensor: read them from the quantized tensor,
    which has the same shape, and skip the dequantize."""
    moved = 0
    for user in list(dq.users):
        if user.op == "call_method" and user.target in _METADATA and user.args[0] is dq:
            user.replace_input_with(dq, dq.args[0])
            moved += 1
        elif user.op == "call_function" and getattr(user.target, "__name__", "") == "getattr" \
                and user.args[1] in ("shape", "ndim") and user.args[0] is dq:
            user.replace_input_with(dq, dq.args[0])
            moved += 1
    return moved


def _contiguous_for_views(gm: fx.GraphModule, dq: fx.Node) -> bool:
    """A quantized conv returns channels-last, so its dequantized tensor is too, where float
    gave a contiguous one: ``.view(...)`` on it raises. When a view reads a dequantized
    tensor, every reader reads it made contiguous (one tensor, so views still alias it)."""
    if not any(u.op == "call_method" and u.target in ("view", "view_as") for u in dq.users):
        return False
    with gm.graph.inserting_after(dq):
        new = gm.graph.call_method("contiguous", (dq,))
    inherit(new, dq)
    record(new, Cleanup.name, Action.CONTIGUOUS, "a view reads this dequantized tensor: made "
                                                 "contiguous, the layout float had")
    dq.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return True


def _known_qparams(node: fx.Node) -> Optional[tuple[float, int, object]]:
    if is_quantize(node):
        return quantize_qparams(node)
    qp = qinfo(node).qparams
    if qp and qinfo(node).kernel:
        return qp["scale"], qp["zero_point"], qp["dtype"]
    return None


def _drop_requantize(q: fx.Node) -> bool:
    """q(dq(x)) with the qparams x already has → x."""
    dq = q.args[0]
    if not is_dequantize(dq):
        return False
    if is_written(dq, dict(dq.graph.owning_module.named_modules())):
        return False  # written in place between dq and q: q reads the mutated values
    src = dq.args[0]
    if _known_qparams(src) != quantize_qparams(q):
        return False
    q.replace_all_uses_with(src)
    return True
