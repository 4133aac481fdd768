"""The backend registry: the built-in backends and the ones extensions register.

The built-in backend files only build their :class:`~fxquant.backends.base.Backend`
(``BACKEND``); this module collects them (the first time a backend is asked for) and holds
what :func:`register_backend` adds. Nothing below it imports it, so there is no import cycle.
"""
from __future__ import annotations

import importlib
from typing import Optional, Union

from fxquant.backends.base import Backend
from fxquant.backends.names import AUTO, BUILTIN_BACKENDS, machine_backend
from fxquant.errors import ConfigError, FxQuantError, did_you_mean

__all__ = ["get_backend", "known_backends", "register_backend", "registered_backends",
           "resolve_backend_name", "unregister_backend"]

_REGISTRY: dict[str, Backend] = {}
_BUILTIN_LOADED: list[bool] = [False]


def _load_builtin() -> None:
    """Register the built-in backends (once; one a user unregistered stays unregistered)."""
    if _BUILTIN_LOADED[0]:
        return
    _BUILTIN_LOADED[0] = True
    for name in BUILTIN_BACKENDS:
        backend = importlib.import_module(f"fxquant.backends.{name}").BACKEND
        _REGISTRY.setdefault(backend.name, backend)


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` available by its name (replacing one of the same name)."""
    _load_builtin()
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> Optional[Backend]:
    """Remove a backend registered under ``name`` (an extension's, or a built-in one) and
    return it; ``None`` when none was. Built-ins come back only in a new process."""
    _load_builtin()
    return _REGISTRY.pop(name, None)


def get_backend(name: Union[str, Backend]) -> Backend:
    """The registered backend called ``name`` ("auto": this machine's default); a Backend
    object is returned as it is."""
    if isinstance(name, Backend):
        return name
    _load_builtin()
    if name == AUTO:
        name = machine_backend()
    if name not in _REGISTRY:
        raise FxQuantError(f"unknown backend '{name}'",
                           hint=f"use one of {sorted(_REGISTRY)} or register_backend(...) your own")
    return _REGISTRY[name]


def registered_backends() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def known_backends() -> tuple[str, ...]:
    """The built-in backend names (in their documented order), then any others registered."""
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
