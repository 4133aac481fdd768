"""cleanup: drop dequantize → quantize pairs that give back the same quantized tensor, remove
the q/dq nodes nobody reads, delete unused submodules and recompile."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch.fx as fx

from fxquant.backends.reference_ops import is_dequantize, is_quantize, quantize_qparams
from fxquant.meta import qinfo
from fxquant.pipeline import PassContext, PassResult

_REMOVABLE_ROLES = ("quantize", "dequantize", "observer")


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
    src = dq.args[0]
    if _known_qparams(src) != quantize_qparams(q):
        return False
    q.replace_all_uses_with(src)
    return True
