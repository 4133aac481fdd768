"""Addressing the activation inputs of a node: positional args, or the elements of a list
argument (``torch.cat([a, b])``). A slot key is ``i`` for ``args[i]`` or ``(i, j)`` for
``args[i][j]``; passes read and replace inputs through slots so they never index args by hand.
"""
from __future__ import annotations

from typing import Any, Iterator, Union

import torch.fx as fx

SlotKey = Union[int, tuple[int, int]]


def get_input(node: fx.Node, key: SlotKey) -> Any:
    if isinstance(key, tuple):
        i, j = key
        return node.args[i][j]
    return node.args[key]


def set_input(node: fx.Node, key: SlotKey, value: Any) -> None:
    args = list(node.args)
    if isinstance(key, tuple):
        i, j = key
        seq = list(args[i])
        seq[j] = value
        args[i] = type(node.args[i])(seq) if isinstance(node.args[i], tuple) else seq
    else:
        args[key] = value
    node.args = tuple(args)


def node_inputs(node: fx.Node, mode: str) -> Iterator[tuple[SlotKey, Any]]:
    """The candidate activation inputs: ``mode == "first"``: args[0]; ``"tensors"``: every
    positional arg, and the elements of a list/tuple positional arg."""
    if not node.args:
        return
    if mode == "first":
        yield 0, node.args[0]
        return
    for i, a in enumerate(node.args):
        if isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                yield (i, j), b
        else:
            yield i, a
