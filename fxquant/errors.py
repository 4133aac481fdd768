"""Errors that name the pass, the node, its module path, its source line and the fix."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.fx as fx


def node_location(node: Optional[fx.Node]) -> tuple[str, str]:
    """(module path, source line) of a node, from its fxquant record or fx's own meta."""
    if node is None:
        return "", ""
    from fxquant.meta import qinfo_or_none, source_line

    info = qinfo_or_none(node)
    path = info.module_path if info is not None else ""
    src = (info.source if info is not None else None) or source_line(node) or ""
    return path, src


class FxQuantError(RuntimeError):
    """A user-facing error about one node of the graph.

    The message always says which node, which module (dotted path in the user's model), which
    source line of the user's code, and what to do about it.
    """

    def __init__(self, message: str, node: Optional[fx.Node] = None, hint: str = "",
                 pass_name: str = "") -> None:
        self.node_name = node.name if node is not None else ""
        self.module_path, self.source = node_location(node)
        self.hint = hint
        self.pass_name = pass_name
        self.raw_message = message
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.raw_message]
        if self.pass_name:
            parts.append(f"  pass: {self.pass_name}")
        if self.node_name:
            parts.append(f"  node: {self.node_name}")
        if self.module_path:
            parts.append(f"  module: {self.module_path}")
        if self.source:
            parts.append(f"  source: {self.source}")
        if self.hint:
            parts.append(f"  fix: {self.hint}")
        return "\n".join(parts)


class PassFailed(FxQuantError):
    """A pass raised. Names the pass, the passes that ran before it and the node it was on."""

    def __init__(self, pass_name: str, before: Sequence[str], cause: BaseException,
                 node: Optional[fx.Node] = None) -> None:
        if node is None and isinstance(cause, FxQuantError):
            self.module_path, self.source = cause.module_path, cause.source
        hint = cause.hint if isinstance(cause, FxQuantError) else ""
        detail = cause.raw_message if isinstance(cause, FxQuantError) else f"{type(cause).__name__}: {cause}"
        self.before = tuple(before)
        self.cause = cause
        msg = (f"fxquant pass '{pass_name}' failed (after: {', '.join(before) or 'nothing'}): {detail}")
        super().__init__(msg, node, hint=hint, pass_name=pass_name)
        if node is None and isinstance(cause, FxQuantError):
            self.node_name = cause.node_name
            self.module_path, self.source = cause.module_path, cause.source
            self.args = (self._format(),)


class VerifyError(FxQuantError):
    """The graph broke an invariant between passes (fx lint, meta schema, dtype consistency)."""
