"""The onednn backend: oneDNN (formerly MKL-DNN) kernels on x86."""
from __future__ import annotations

from fxquant.backends.base import Backend, register_backend
from fxquant.backends.native import native_rules

BACKEND = register_backend(Backend(
    name="onednn",
    engine="onednn",
    rules=native_rules(backend="onednn"),
    description="oneDNN (formerly MKL-DNN) kernels on x86",
))
