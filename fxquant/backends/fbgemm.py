"""The fbgemm backend: Facebook GEneral Matrix Multiplication: the classic x86 server backend."""
from __future__ import annotations

from fxquant.backends.base import Backend, register_backend
from fxquant.backends.native import native_rules

BACKEND = register_backend(Backend(
    name="fbgemm",
    engine="fbgemm",
    rules=native_rules(backend="fbgemm"),
    description="Facebook GEneral Matrix Multiplication: the classic x86 server backend",
))
