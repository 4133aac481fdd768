"""Test helpers: op counting, output quantum, torch.ao oracle access."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx as fx

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
