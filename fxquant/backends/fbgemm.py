"""The fbgemm backend: Facebook GEneral Matrix Multiplication: the classic x86 server backend."""
from __future__ import annotations

from fxquant.backends.base import Backend, register_backend
from fxquant.backends.names import FBGEMM
from fxquant.backends.native import native_rules

BACKEND = register_backend(Backend(
    name=FBGEMM,
    engine=FBGEMM,
    rules=native_rules(),
    description="Facebook GEneral Matrix Multiplication: the classic x86 server backend",
    per_tensor_conv_transpose=True,  # no per-channel transposed-conv kernel
))
