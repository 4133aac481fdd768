"""The fbgemm backend: Facebook GEneral Matrix Multiplication: the classic x86 server backend."""
from __future__ import annotations

from fxquant.backends.base import Backend
from fxquant.backends.names import FBGEMM, ONEDNN, QNNPACK
from fxquant.backends.native import native_rules

BACKEND = Backend(
    name=FBGEMM,
    engine=FBGEMM,
    rules=native_rules(),
    sum_fusion=True,  # oneDNN's fused convs (convert_fx fuse_sums / fuse_activations)
    description="Facebook GEneral Matrix Multiplication: the classic x86 server backend",
    per_tensor_conv_transpose=True,  # no per-channel transposed-conv kernel
    # some fbgemm convs (depthwise 3x3, 58 / 116 channels) are many times slower than these
    engine_candidates=(ONEDNN, QNNPACK),
)
