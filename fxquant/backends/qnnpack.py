"""The qnnpack backend: Quantized Neural Networks PACKage: the ARM / mobile backend."""
from __future__ import annotations

from fxquant.backends.base import Backend, register_backend
from fxquant.backends.native import native_rules

BACKEND = register_backend(Backend(
    name="qnnpack",
    engine="qnnpack",
    rules=native_rules(clamp_needs_contiguous=True, backend="qnnpack"),
    description="Quantized Neural Networks PACKage: the ARM / mobile backend",
))
