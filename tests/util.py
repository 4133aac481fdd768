"""Test helpers: op counting, output quantum, torch.ao oracle access, int16 saturation bounds."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxquant.meta import qinfo


def op_counts(gm: fx.GraphModule) -> Counter[str]:
    """Counter of what the graph runs: quantized module class names (``quantized.Conv2d``),
    ``quantized::add``-style kernels, ``quantize_per_tensor`` and ``dequantize``."""
    modules = dict(gm.named_modules())
    out: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = modules[n.target]
            prefix = m.__module__.replace("fxquant.nn.", "").split(".")[0]
            out[f"{prefix}.{type(m).__name__}" if "fxquant.nn" in m.__module__
                else type(m).__name__] += 1
        elif n.op == "call_function":
            t = n.target
            name = getattr(t, "_qualified_op_name", None) if hasattr(t, "_qualified_op_name") \
                else getattr(t, "__name__", str(t))
            if isinstance(t, torch._ops.OpOverloadPacket):
                name = t._qualified_op_name
            out[name] += 1
        elif n.op == "call_method":
            out[f".{n.target}"] += 1
    return out


def output_scale(gm: fx.GraphModule) -> float | None:
    """Scale of the quantized tensor that the final dequantize reads (None: float output)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    dq = out.args[0]
    if not (dq.op == "call_method" and dq.target == "dequantize"):
        return None
    src = dq.args[0]
    qp = qinfo(src).qparams
    assert qp is not None, f"no qparams recorded on {src.name}"
    return float(qp["scale"])


def ao_quantize_fx():
    return pytest.importorskip("torch.ao.quantization.quantize_fx")


def ao_quantization():
    return pytest.importorskip("torch.ao.quantization")


def ao_default_qconfig_mapping(backend: str, qat: bool = False):
    """torch.ao's default (QAT) QConfigMapping for ``backend`` with the activation range
    fxquant's default picks on this CPU (8-bit where the engine accumulates in int32, 7-bit
    reduce_range elsewhere; torch.ao fixes it by backend name): the differential tests then
    compare the same configuration on every CPU. Only the qconfigs that share the global
    activation factory (global, transposed convs, layer_norm) change."""
    import fxquant

    ao = ao_quantization()
    theirs = (ao.get_default_qat_qconfig_mapping if qat else ao.get_default_qconfig_mapping)(backend)
    reduce_range = fxquant.qconfig.activation_range(backend).reduce_range
    old = theirs.global_qconfig.activation  # a torch.ao _PartialWrapper around a partial
    new = old.p.func.with_args(**{**old.p.keywords, "reduce_range": reduce_range})
    theirs.set_global(ao.QConfig(activation=new, weight=theirs.global_qconfig.weight))
    for key, qc in list(theirs.object_type_qconfigs.items()):
        if qc is not None and qc.activation is old:
            theirs.set_object_type(key, ao.QConfig(activation=new, weight=qc.weight))
    return theirs


# ---------------------------------------------------------------------------------------------
# int16 saturation of uint8 x int8 kernels without VNNI (see fxquant.backends.cpu)

INT16_PAIR_LIMIT = 32767.0


def int16_pair_saturation_bound(module: nn.Module, x_int: torch.Tensor, w_int: torch.Tensor,
                                x_zero_point: int) -> torch.Tensor:
    """Per output element, in accumulator units (x_scale * w_scale): how far a kernel that adds
    uint8 x int8 products pairwise into a saturating int16 (``vpmaddubsw``: fbgemm / onednn
    without VNNI) can be from the exact int32 sum of ``module`` (Linear, Conv*d, ConvTranspose*d).

    A pair of products (p, q) clips by max(0, |p + q| - L) <= max(0, |p| - L/2) + max(0, |q| - L/2)
    (L = 32767), whichever products the kernel pairs; so the sum of max(0, x * |w| - L/2) over the
    products of an output bounds its error. It is computed per weight magnitude v as ``module``'s
    op on max(0, x * v - L/2) with the weight 1[|w| == v] (only v > L/2 / 255 can clip). Padding
    and other entries holding the zero point add nothing when zero_point * max|w| <= L/2 (checked).
    """
    half = INT16_PAIR_LIMIT / 2
    w_abs = w_int.abs().float()
    assert x_zero_point * float(w_abs.max()) <= half, "zero-point products could clip too"
    x = x_int.float()
    total = torch.zeros_like(_linear_op(module, x, torch.zeros_like(w_abs)))
    for v in w_abs.unique().tolist():
        if v * 255 > half:
            total += _linear_op(module, (x * v - half).clamp_min(0), (w_abs == v).float())
    return total


def _linear_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s linear map (no bias) with another weight: F.linear, conv, transposed conv."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        op = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[x.dim() - 3]
        return op(x, weight, None, module.stride, module.padding, module.output_padding,
                  module.groups, module.dilation)
    if isinstance(module, nn.modules.conv._ConvNd):
        return module._conv_forward(x, weight, None)
    raise TypeError(f"no linear map for {type(module).__name__}")


def inductor_or_skip() -> None:
    """Skip unless FXQUANT_INDUCTOR_TESTS=1 (``make test-inductor``) and Inductor can compile
    here: its C++ compiles take minutes on a busy 2-core machine."""
    if os.environ.get("FXQUANT_INDUCTOR_TESTS") != "1":
        pytest.skip("Inductor compiles take minutes on a busy 2-core machine: set "
                    "FXQUANT_INDUCTOR_TESTS=1")
    from fxquant.backends.inductor import inductor_available

    why = inductor_available()
    if why:
        pytest.skip(why)


def calibrated(model: nn.Module, mapping: object, backend: str = "x86",
               shape: tuple[int, ...] = (2, 3, 16, 16), calib_seed: int | None = None,
               copy_model: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """``model`` in eval mode with trained-looking BatchNorm statistics (means in [-0.2, 0.2],
    variances in [0.5, 1.5]), prepared with ``mapping`` (a QConfigMapping) for ``backend`` and
    calibrated on 4 random batches of 4 (after ``torch.manual_seed(calib_seed)`` when given);
    returns (prepared, example input of ``shape``). ``copy_model``: prepare a deep copy (the
    caller keeps ``model`` as its float reference). Draws from torch's global generator: seed
    it before building the model."""
    import copy

    import fxquant

    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    example = torch.randn(shape)
    prepared = fxquant.prepare_fx(copy.deepcopy(model) if copy_model else model, mapping,
                                  (example,), backend=backend)
    if calib_seed is not None:
        torch.manual_seed(calib_seed)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(4, *shape[1:]))
    return prepared, example
