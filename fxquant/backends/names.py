"""The built-in backend names, the default backend, and which backend ``"auto"`` means here.

The rest of the library never spells or compares a backend name: it passes names through
:func:`resolve_backend_name` and asks the :class:`~fxquant.backends.base.Backend` object
(``get_backend(name)``) for its policy (tests/test_layering.py checks this).
"""
from __future__ import annotations

import platform
from typing import Optional

from fxquant.errors import ConfigError, did_you_mean

__all__ = ["AUTO", "BUILTIN_BACKENDS", "DEFAULT_BACKEND", "FBGEMM", "ONEDNN", "QNNPACK", "X86",
           "known_backends", "machine_backend", "resolve_backend_name"]

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


def known_backends() -> tuple[str, ...]:
    """The built-in backend names (in their documented order), then any others registered."""
    from fxquant.backends.base import registered_backends

    return BUILTIN_BACKENDS + tuple(n for n in registered_backends() if n not in BUILTIN_BACKENDS)


def resolve_backend_name(name: str = AUTO, machine: Optional[str] = None) -> str:
    """A concrete backend name: ``"auto"`` resolved for ``machine`` (default: this one), any
    other name checked against :func:`known_backends` and returned as given."""
    if name == AUTO:
        return machine_backend(machine)
    known = known_backends()
    if name not in known:
        raise ConfigError(f"unknown quantization backend {name!r}{did_you_mean(str(name), known)}; "
                          f"use one of {list(known)} or {AUTO!r}")
    return name
