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


class QParams(nn.Module):
    """The scale and zero point of one quantize node, as buffers: ``state_dict`` carries them,
    and the generated code (eager and TorchScript) reads them at run time through
    ``quantize_per_tensor``'s tensor-qparams overload (bit-identical to the float one)."""

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}"


def insert_quantize_buffered(gm: fx.GraphModule, x: fx.Node, scale: float, zero_point: int,
                             dtype: torch.dtype, name: str) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``quantize_per_tensor(x, self.<name>.scale, self.<name>.zero_point, dtype)``: the qparams
    live in a :class:`QParams` submodule (a unique name derived from ``name``). Returns the
    quantize node and its two get_attr nodes; an unused holder goes with
    ``delete_all_unused_submodules``."""
    holder, i = name, 1
    while hasattr(gm, holder):
        holder, i = f"{name}_{i}", i + 1
    gm.add_submodule(holder, QParams(scale, zero_point))
    s = gm.graph.get_attr(f"{holder}.scale")
    z = gm.graph.get_attr(f"{holder}.zero_point")
    return gm.graph.call_function(QUANTIZE, (x, s, z, dtype)), s, z


def insert_dequantize(graph: fx.Graph, q: fx.Node) -> fx.Node:
    return graph.call_method(DEQUANTIZE, (q,))


def quantize_qparams(node: fx.Node) -> tuple[float, int, torch.dtype]:
    """(scale, zero_point, dtype) of a quantize node, whether its qparams are constants or
    :class:`QParams` buffers read through get_attr nodes."""
    _, scale, zp, dtype = node.args[:4]
    return float(_constant(node, scale)), int(_constant(node, zp)), dtype


def _constant(node: fx.Node, arg: Any) -> Any:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return node.graph.owning_module.get_buffer(str(arg.target)).item()
    return arg


def kernel_qparam_slots(node: fx.Node) -> tuple[tuple[Any, str], ...]:
    """Where a ``quantized::`` kernel call holds its output qparams as constants: (position
    or keyword, "scale" | "zero_point") for each ``float *scale`` / ``int *zero_point``
    argument of the op's default schema that holds a Python number."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverloadPacket) \
            or not target._qualified_op_name.startswith("quantized::") \
            or "default" not in target.overloads():
        return ()
    slots = []
    for i, arg in enumerate(target.default._schema.arguments):
        key = i if i < len(node.args) else arg.name
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        kind = _qparam_kind(arg, value)
        if kind:
            slots.append((key, kind))
    return tuple(slots)


def _qparam_kind(arg: Any, value: Any) -> Optional[str]:
    type_name = str(arg.type).replace("Optional[", "").rstrip("]").rstrip("?")
    if arg.name.endswith("scale") and type_name == "float" and isinstance(value, float):
        return "scale"
    if arg.name.endswith("zero_point") and type_name == "int" and isinstance(value, int) \
            and not isinstance(value, bool):
        return "zero_point"
    return None


def activation_qparams(observer: nn.Module) -> tuple[float, int, torch.dtype]:
    """Per-tensor (scale, zero_point, dtype) of an activation observer, as Python numbers."""
    scale, zp = observer.calculate_qparams()
    return float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]), observer.dtype


def scalar_op_qparams(rule: str, scale: float, zero_point: int, dtype: torch.dtype,
                      scalar: float) -> Optional[tuple[float, int]]:
    """The output qparams ``quantized::add_scalar`` / ``mul_scalar`` derive for an input with
    these qparams (:func:`fxquant.qmath.add_scalar_qparams` / ``mul_scalar_qparams``, plain
    arithmetic: no quantized kernel runs at convert). The reference graph quantizes
    ``x + c`` / ``x * c`` with them, so that it computes what the kernel does instead of
    clipping to the input's range. None for another rule or dtype."""
    from fxquant.qmath import add_scalar_qparams, mul_scalar_qparams

    if dtype not in (torch.quint8, torch.qint8):
        return None
    qmin, qmax = (0, 255) if dtype == torch.quint8 else (-128, 127)
    if rule == "add_scalar":
        return add_scalar_qparams(scale, zero_point, qmin, qmax, scalar)
    if rule == "mul_scalar":
        return mul_scalar_qparams(scale, zero_point, qmin, qmax, scalar)
    return None


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
