"""verify(gm): fx lint + the fxquant meta schema + dtype consistency of quantize nodes."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxquant.errors import VerifyError
from fxquant.meta import META_KEY, Decision, QNodeInfo



def verify(gm: fx.GraphModule, after: Optional[str] = None) -> None:
    """Raise :class:`VerifyError` if the graph is not valid.

    Checks fx's own lint (topological order, owning graph, targets that exist), that every
    ``call_module`` target resolves, that ``node.meta['fxquant']`` holds a well-formed record,
    and that every quantize node asks for a quantized dtype with a sane scale/zero_point.
    """
    where = f" after pass '{after}'" if after else ""
    modules = dict(gm.named_modules(remove_duplicate=False))  # aliased observers share modules
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:  # our checks first: they name the node, fx's lint does not
        if node.op == "call_module" and node.target not in modules:
            raise VerifyError(f"call_module target '{node.target}' does not exist{where}", node)
        for inp in node.all_input_nodes:
            if inp not in seen:
                raise VerifyError(f"{node.name} uses {inp.name} before it is defined{where}", node)
        seen.add(node)
        _check_meta(node, where)
        _check_quantize(node, where)
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - fx raises plain RuntimeError/AssertionError
        raise VerifyError(f"graph lint failed{where}: {e}") from e


def _check_meta(node: fx.Node, where: str) -> None:
    info = node.meta.get(META_KEY)
    if info is None:
        return
    if not isinstance(info, QNodeInfo):
        raise VerifyError(f"node.meta['{META_KEY}'] is a {type(info).__name__}, not QNodeInfo{where}",
                          node, hint="write decisions only through fxquant.meta.record()")
    for d in info.decisions:
        if not isinstance(d, Decision) or not d.pass_name or not d.reason:
            raise VerifyError(f"malformed decision {d!r}{where}", node,
                              hint="every decision names its pass and a reason")


def _check_quantize(node: fx.Node, where: str) -> None:
    from fxquant.backends.reference_ops import QUANTIZE_DTYPES, is_quantize

    if not is_quantize(node):
        return
    if len(node.args) < 4:
        raise VerifyError(f"quantize_per_tensor with {len(node.args)} args{where}", node)
    _, scale, zp, dtype = node.args[:4]
    if dtype not in QUANTIZE_DTYPES:
        raise VerifyError(f"quantize to non-quantized dtype {dtype}{where}", node)
    if isinstance(scale, float) and not scale > 0:
        raise VerifyError(f"quantize with scale {scale} <= 0{where}", node)
    if isinstance(zp, int) and str(dtype) == "torch.quint8" and not 0 <= zp <= 255:
        raise VerifyError(f"quint8 zero_point {zp} outside 0..255{where}", node)
