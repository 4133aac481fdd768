"""The built-in backend names, the default backend, and which backend ``"auto"`` means here.

The rest of the library never spells or compares a backend name: it passes names through
:func:`fxquant.backends.registry.resolve_backend_name` and asks the :class:`~fxquant.backends.base.Backend` object
(``get_backend(name)``) for its policy (tests/test_layering.py checks this).
"""
from __future__ import annotations

import platform
from typing import Optional

from fxquant.errors import ConfigError

__all__ = ["AUTO", "BUILTIN_BACKENDS", "DEFAULT_BACKEND", "FBGEMM", "ONEDNN", "QNNPACK", "X86",
           "machine_backend"]

AUTO = "auto"  # the user-facing "pick by this machine's CPU"
FBGEMM = "fbgemm"
X86 = "x86"
QNNPACK = "qnnpack"
ONEDNN = "onednn"
BUILTIN_BACKENDS: tuple[str, ...] = (FBGEMM, X86, QNNPACK, ONEDNN)
# the backend of get_default_qconfig() without arguments, and the defaults a hand-made
# mapping (no ``mapping.backend``) is compared with
DEFAULT_BACKEND = X86

_MACHINE_BACKEND: dict[str, str] = {
    **dict.fromkeys(("x86_64", "amd64", "x86", "i386", "i686"), X86),
    **dict.fromkeys(("arm64", "aarch64", "armv8l", "armv8b"), QNNPACK),
}


def machine_backend(machine: Optional[str] = None) -> str:
    """What ``"auto"`` means on ``machine`` (default: this one): x86 on x86_64/AMD64,
    qnnpack on arm64/aarch64; ConfigError elsewhere, naming the backends to pick from."""
    machine = platform.machine() if machine is None else machine
    chosen = _MACHINE_BACKEND.get(machine.lower())
    if chosen is None:
        raise ConfigError(
            f"cannot pick a quantization backend automatically for machine {machine!r}; "
            f"pass backend= one of {list(BUILTIN_BACKENDS)}"
        )
    return chosen
