"""The x86 backend: torch's x86 engine: fbgemm and onednn kernels chosen per op (the default on x86 CPUs)."""
from __future__ import annotations

from fxquant.backends.base import Backend
from fxquant.backends.names import ONEDNN, QNNPACK, X86
from fxquant.backends.native import native_rules

BACKEND = Backend(
    name=X86,
    engine=X86,
    rules=native_rules(),
    sum_fusion=True,  # oneDNN's fused convs (convert_fx fuse_sums / fuse_activations)
    description="torch's x86 engine: fbgemm and onednn kernels chosen per op (the default on x86 CPUs)",
    per_tensor_conv_transpose=True,  # packs transposed convs with fbgemm: per-tensor only
    # some fbgemm convs (depthwise 3x3, 58 / 116 channels) are many times slower than these
    engine_candidates=(ONEDNN, QNNPACK),
)
