"""Small graph-editing helpers that passes and backends share: replace or drop the submodule at
a dotted path of a GraphModule. Public, so that no layer imports another's private helpers."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


def set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``gm`` (replacing what is there)."""
    parent_path, _, attr = str(path).rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, attr, module)


def del_submodule(gm: fx.GraphModule, path: str) -> None:
    """Drop the submodule at the dotted ``path`` of ``gm``, if it is there."""
    parent_path, _, attr = str(path).rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if hasattr(parent, attr):
        delattr(parent, attr)


def drop_dead_get_attrs(gm: fx.GraphModule) -> None:
    """Erase the get_attr nodes nothing reads any more (after a rewrite removed their users)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
