"""The qnnpack backend: Quantized Neural Networks PACKage: the ARM / mobile backend."""
from __future__ import annotations

from fxquant.backends.base import Backend
from fxquant.backends.engine import clamp_needs_contiguous
from fxquant.backends.names import QNNPACK
from fxquant.backends.native import native_rules

BACKEND = Backend(
    name=QNNPACK,
    engine=QNNPACK,
    rules=native_rules(clamp_needs_contiguous=clamp_needs_contiguous(QNNPACK)),
    description="Quantized Neural Networks PACKage: the ARM / mobile backend",
    engine_candidates=(),  # its convs are not timed against other engines'
    per_channel_weights=False,  # as torch.ao's default qnnpack qconfig
)
