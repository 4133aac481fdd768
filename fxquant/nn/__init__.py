"""fxquant's modules: fused float modules, reference, quantized, dynamic and QAT modules.

Everything that touches quantized tensors or ``torch.ops.quantized`` lives here or in
``fxquant.backends``; the passes only move these modules around.
"""
from __future__ import annotations

import torch.nn as nn


def is_fxquant_leaf(m: nn.Module) -> bool:
    """fxquant's own modules are traced as single calls, never through."""
    return type(m).__module__.startswith("fxquant.nn.")
