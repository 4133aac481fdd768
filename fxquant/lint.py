"""verify(gm): fx lint + the fxquant meta schema + dtype consistency of quantize nodes."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxquant.errors import VerifyError
from fxquant.meta import META_KEY, Decision, QNodeInfo

_QDTYPES = (torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.float16)


def verify(gm: fx.GraphModule, after: Optional[str] = None) -> None:
    """Raise :class:`VerifyError` if the graph is not valid.

    Checks fx's own lint (topological order, owning graph, targets that exist), that every
    ``call_module`` target resolves, that ``node.meta['fxquant']`` holds a well-formed record,
    and that every quantize node asks for a quantized dtype with a sane scale/zero_point.
    """
    where = f" after pass '{after}'" if after else ""
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - fx raises plain RuntimeError/AssertionError
        raise VerifyError(f"graph lint failed{where}: {e}") from e
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in modules:
            raise VerifyError(f"call_module target '{node.target}' does not exist{where}", node)
        _check_meta(node, where)
        _check_quantize(node, where)


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
    if node.op != "call_function" or node.target is not torch.quantize_per_tensor:
        return
    if len(node.args) < 4:
        raise VerifyError(f"quantize_per_tensor with {len(node.args)} args{where}", node)
    _, scale, zp, dtype = node.args[:4]
    if dtype not in _QDTYPES:
        raise VerifyError(f"quantize to non-quantized dtype {dtype}{where}", node)
    if isinstance(scale, float) and not scale > 0:
        raise VerifyError(f"quantize with scale {scale} <= 0{where}", node)
    if isinstance(zp, int) and dtype == torch.quint8 and not 0 <= zp <= 255:
        raise VerifyError(f"quint8 zero_point {zp} outside 0..255{where}", node)
