"""The x86 backend: torch's x86 engine: fbgemm and onednn kernels chosen per op (the default on x86 CPUs)."""
from __future__ import annotations

from fxquant.backends.base import Backend, register_backend
from fxquant.backends.native import native_rules

BACKEND = register_backend(Backend(
    name="x86",
    engine="x86",
    rules=native_rules(backend="x86"),
    description="torch's x86 engine: fbgemm and onednn kernels chosen per op (the default on x86 CPUs)",
))
