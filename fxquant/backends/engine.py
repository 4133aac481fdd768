"""Select torch's quantized CPU engine for a block of code.

Quantized modules pack their weights for the engine that is current when they are built
(and re-pack after ``torch.load`` / ``load_state_dict``), so the converter wraps lowering in
``with engine(backend_name):``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["KNOWN_ENGINES", "current_engine", "engine", "supported_engines"]

KNOWN_ENGINES: tuple[str, ...] = ("fbgemm", "x86", "qnnpack", "onednn")


def supported_engines() -> tuple[str, ...]:
    """The quantized engines this torch build can run ("none" left out)."""
    return tuple(e for e in torch.backends.quantized.supported_engines if e != "none")


def current_engine() -> str:
    """The engine torch.ops.quantized.* would pack and run with right now."""
    return str(torch.backends.quantized.engine)


def _check_engine(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"engine name must be a str such as 'fbgemm', got {type(name).__name__}")
    available = supported_engines()
    if name not in available:
        hint = "" if name in KNOWN_ENGINES else f" (known engine names: {', '.join(KNOWN_ENGINES)})"
        raise ValueError(
            f"quantized engine {name!r} is not supported by this torch build; "
            f"pick one of {', '.join(available)}{hint}"
        )


@contextmanager
def engine(name: str) -> Iterator[str]:
    """Set ``torch.backends.quantized.engine`` to ``name`` inside the block, then restore it.

    Raises ValueError naming the available engines when ``name`` is not in
    ``torch.backends.quantized.supported_engines``.
    """
    _check_engine(name)
    previous = current_engine()
    torch.backends.quantized.engine = name
    try:
        yield name
    finally:
        torch.backends.quantized.engine = previous
