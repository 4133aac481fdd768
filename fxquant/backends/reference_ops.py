"""The reference quantized graph's vocabulary: quantize / dequantize nodes and reference
weighted modules. The passes build reference graphs only through these helpers, so the choice
of quantized-tensor ops stays in the backend layer.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.nn import fused, reference
from fxquant.nn.common import WeightQParams

QUANTIZE = torch.quantize_per_tensor
DEQUANTIZE = "dequantize"  # a method call: q.dequantize()

# The dtype vocabulary the passes reason with, owned here with the rest of the quantized types.
STATIC_ACTIVATION_DTYPES = (torch.quint8, torch.qint8)  # observed ahead of time, int8 kernels
INTEGER_DTYPES = (torch.quint8, torch.qint8, torch.qint32)  # what a quantize node produces
QUANTIZE_DTYPES = (torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.float16)
FIXED_QPARAMS_DTYPE = torch.quint8  # sigmoid / tanh / softmax outputs

_REFERENCE: dict[type, type] = {
    nn.Linear: reference.Linear,
    nn.Conv1d: reference.Conv1d, nn.Conv2d: reference.Conv2d, nn.Conv3d: reference.Conv3d,
    nn.ConvTranspose1d: reference.ConvTranspose1d, nn.ConvTranspose2d: reference.ConvTranspose2d,
    nn.ConvTranspose3d: reference.ConvTranspose3d,
}


def is_quantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is QUANTIZE


def is_dequantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == DEQUANTIZE


def insert_quantize(graph: fx.Graph, x: fx.Node, scale: float, zero_point: int,
                    dtype: torch.dtype) -> fx.Node:
    return graph.call_function(QUANTIZE, (x, float(scale), int(zero_point), dtype))


def insert_dequantize(graph: fx.Graph, q: fx.Node) -> fx.Node:
    return graph.call_method(DEQUANTIZE, (q,))


def quantize_qparams(node: fx.Node) -> tuple[float, int, torch.dtype]:
    _, scale, zp, dtype = node.args[:4]
    return float(scale), int(zp), dtype


def activation_qparams(observer: nn.Module) -> tuple[float, int, torch.dtype]:
    """Per-tensor (scale, zero_point, dtype) of an activation observer, as Python numbers."""
    scale, zp = observer.calculate_qparams()
    return float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]), observer.dtype


def weight_qparams(module: nn.Module, weight_factory: Callable[[], nn.Module]) -> WeightQParams:
    obs = weight_factory()
    obs(module.weight.detach())
    return WeightQParams.from_observer(obs)


def weighted_core(module: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(the conv/linear inside, the fused container or None)."""
    if isinstance(module, fused.FusedModule):
        return module[0], module
    return module, None


def to_reference(module: nn.Module, weight_factory: Callable[[], nn.Module]
                 ) -> tuple[nn.Module, WeightQParams]:
    """The reference version of a (possibly fused) float weighted module; a fused module keeps
    its container with the reference module as first child.

    A QAT module provides ``to_reference_parts() -> (float module, WeightQParams)``: the float
    module (BatchNorm folded; a plain conv/linear or a fused ConvReLU/LinearReLU container) and
    the qparams its weight fake-quant learned; ``weight_factory`` is then not used."""
    wq = None
    if hasattr(module, "to_reference_parts"):
        module, wq = module.to_reference_parts()
    core, container = weighted_core(module)
    ref_cls = _REFERENCE.get(_float_class(core))
    if ref_cls is None:
        raise TypeError(f"no reference module for {type(core).__name__}")
    if wq is None:
        wq = weight_qparams(core, weight_factory)
    ref = ref_cls.from_float(core, wq)
    if container is None:
        return ref, wq
    container[0] = ref
    return container, wq


def _float_class(mod: nn.Module) -> Optional[type]:
    """The torch.nn class a module is (QAT modules subclass theirs)."""
    for cls in type(mod).__mro__:
        if cls in _REFERENCE:
            return cls
    return None


def has_reference(module: nn.Module) -> bool:
    if hasattr(module, "to_reference_parts"):
        return True
    core, _ = weighted_core(module)
    return _float_class(core) is not None
