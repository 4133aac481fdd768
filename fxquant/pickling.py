"""Pickling a prepared / converted GraphModule with its records, and the state convert keeps.

torch.fx pickles a GraphModule as its code and its ``__dict__``, which loses ``node.meta`` (the
decision records) and ``gm.meta`` (the options convert needs): :func:`keep_meta_when_pickled`
makes ``torch.save`` keep them, :func:`restore_pickled_meta` puts them back. Used by the API
(below :mod:`fxquant.serialize`, which writes fxquant's own safe files).
"""
from __future__ import annotations

import pickle
import weakref
from typing import Any, Callable, Optional

import torch.fx as fx
import torch.nn as nn

from fxquant.errors import FxQuantError
from fxquant.options import OPTIONS_KEY

__all__ = ["PICKLE_ATTR", "PREPARED_STATE_KEY", "keep_meta_when_pickled", "remember_prepared",
           "qualname", "restore_pickled_meta", "target_text"]

PREPARED_STATE_KEY = "fxquant_prepared_state"
PICKLE_ATTR = "_fxquant_pickled_meta"


def qualname(obj: Any) -> str:
    """``module.qualname`` of a class or function."""
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def target_text(node: fx.Node) -> str:
    """What a node runs, as text that does not depend on node names."""
    t = node.target
    if node.op != "call_function":
        return str(t)
    qualified = getattr(t, "_qualified_op_name", None)
    return qualified if isinstance(qualified, str) else qualname(t)


# ---------------------------------------------------------------------------------- convert hook
def remember_prepared(gm: fx.GraphModule) -> None:
    """Called by ``convert`` on the prepared model it starts from: keep its state (weights,
    observer / fake-quant statistics: plain tensors) in ``gm.meta`` for :func:`save`."""
    gm.meta[PREPARED_STATE_KEY] = {k: v.detach().clone() for k, v in gm.state_dict().items()}


# ---------------------------------------------------------------------------------- pickling
class _PickledMeta:
    """Rides in a GraphModule's ``__dict__``. torch.fx pickles a GraphModule as its code and
    its ``__dict__`` and rebuilds the graph by tracing the code, which loses ``node.meta`` (the
    decision records) and ``gm.meta`` (the options convert needs). When the module is pickled
    this takes a snapshot of both; :func:`restore_pickled_meta` puts them back."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self._gm: Optional[Callable[[], Any]] = weakref.ref(gm)
        self.snapshot: Optional[dict[str, Any]] = None

    def __getstate__(self) -> dict[str, Any]:
        gm = self._gm() if self._gm is not None else None
        return {"snapshot": _snapshot(gm) if gm is not None else self.snapshot}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._gm, self.snapshot = None, state["snapshot"]

    def __deepcopy__(self, memo: dict[int, Any]) -> "_PickledMeta":
        new = _PickledMeta.__new__(_PickledMeta)
        new._gm, new.snapshot = None, self.snapshot  # deepcopy of a GraphModule keeps node.meta
        return new


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001 - lambdas, local classes, open handles ...
        return False


def _snapshot(gm: fx.GraphModule) -> dict[str, Any]:
    from fxquant.meta import qinfo_or_none

    records = [(n.op, target_text(n), qinfo_or_none(n)) for n in gm.graph.nodes]
    bad = [n.name for n, (_, _, info) in zip(gm.graph.nodes, records) if not _picklable(info)]
    bad += [k for k, v in gm.meta.items() if k != PREPARED_STATE_KEY and not _picklable(v)]
    meta = {k: v for k, v in gm.meta.items() if k not in bad}  # shared with the pickled
    return {"records": records if not bad else None, "meta": meta, "unpicklable": bad}


def keep_meta_when_pickled(gm: fx.GraphModule) -> None:
    """Make ``torch.save(gm)`` keep the records and options (see :class:`_PickledMeta`)."""
    setattr(gm, PICKLE_ATTR, _PickledMeta(gm))


def restore_pickled_meta(model: Any) -> None:
    """Put back the records and options of every GraphModule in ``model`` that went through
    pickling (``torch.save`` / ``torch.load`` of a trusted file of your own)."""
    if not isinstance(model, nn.Module):
        return
    for m in model.modules():
        carrier = vars(m).get(PICKLE_ATTR)
        if isinstance(m, fx.GraphModule) and isinstance(carrier, _PickledMeta) \
                and carrier.snapshot is not None and OPTIONS_KEY not in m.meta:
            _restore(m, carrier.snapshot)
            keep_meta_when_pickled(m)


def _restore(gm: fx.GraphModule, snap: dict[str, Any]) -> None:
    from fxquant.meta import META_KEY

    records = snap["records"]
    if records is None:
        raise FxQuantError(
            f"this {type(gm).__name__} was pickled with decision records or options that do "
            f"not pickle ({', '.join(snap['unpicklable'][:3])}): convert cannot go on from it",
            hint="use module-level observer classes / factories (no lambdas) in the qconfig, "
                 "or convert before saving and write the result with fxquant.save")
    nodes = list(gm.graph.nodes)
    same = len(nodes) == len(records) and all(
        n.op == op and target_text(n) == t for n, (op, t, _) in zip(nodes, records))
    if not same:
        raise FxQuantError(f"the pickled {type(gm).__name__}'s graph no longer matches its "
                           f"records", hint="pickle the prepared model as fxquant returned it")
    for node, (_, _, info) in zip(nodes, records):
        if info is not None:
            node.meta[META_KEY] = info
    gm.meta.update(snap["meta"])
