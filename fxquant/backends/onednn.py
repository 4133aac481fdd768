"""The onednn backend: oneDNN (formerly MKL-DNN) kernels on x86."""
from __future__ import annotations

from fxquant.backends.base import Backend
from fxquant.backends.names import ONEDNN
from fxquant.backends.native import native_rules

BACKEND = Backend(
    name=ONEDNN,
    engine=ONEDNN,
    rules=native_rules(),
    sum_fusion=True,  # oneDNN's fused convs (convert_fx fuse_sums / fuse_activations)
    description="oneDNN (formerly MKL-DNN) kernels on x86",
    engine_candidates=(),  # its convs are not timed against other engines'
)
