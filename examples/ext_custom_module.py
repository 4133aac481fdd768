"""A custom module with its own quantized implementation, on the public API only.

``Mish`` (x * tanh(softplus(x))) is the user's leaf module. Its quantized implementation,
``QuantizedMish``, is a 256-entry table: for a uint8 input every output is known ahead, so the
table maps input integers to output integers (exact up to the output rounding). A user rule
(own output qparams) lowers the leaf to it on a backend composed from "x86"; lower_to_backend
checks it numerically against the float module. The test expects > 25 dB SQNR vs float.

    python examples/ext_custom_module.py
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.extend import (OWN, LowerCtx, NoMatch, Op, Rule, compose_backend, input_qparams,
                            register_backend, unregister_backend)


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(F.softplus(x))


class QuantizedMish(nn.Module):
    """uint8 in -> uint8 out through a table computed from the float function."""

    def __init__(self, in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> None:
        super().__init__()
        x = (torch.arange(256, dtype=torch.float32) - in_zp) * in_scale
        y = Mish()(x)
        self.register_buffer("table", torch.clamp(torch.round(y / out_scale) + out_zp, 0, 255)
                             .to(torch.uint8))
        self.out_scale, self.out_zp = out_scale, out_zp

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        ints = self.table[q.int_repr().long()]
        return torch._make_per_tensor_quantized_tensor(ints, self.out_scale, self.out_zp)


def lower_mish(ctx: LowerCtx):
    qp = input_qparams(ctx)
    if qp is None or qp[2] != torch.quint8 or ctx.out_dtype != torch.quint8:
        return NoMatch("QuantizedMish needs static quint8 input and output qparams")
    ctx.set_module(QuantizedMish(qp[0], qp[1], ctx.out_scale, ctx.out_zero_point))
    return ctx.gm.graph.call_module(ctx.node.target, (ctx.qinputs[0],))


MISH_RULE = Rule("mish_table", Op(Mish), OWN, "QuantizedMish (256-entry table)", lower_mish)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), Mish(), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


def quantize(model: nn.Module, backend: str) -> fx.GraphModule:
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"),
                                  (torch.randn(1, 3, 12, 12),), backend=backend,
                                  leaf_modules=[Mish])
    for _ in range(4):
        prepared(torch.randn(4, 3, 12, 12))
    return fxquant.convert_fx(prepared)


def main() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    register_backend(compose_backend("x86", MISH_RULE, name="x86+mish"))
    try:
        q = quantize(model, "x86+mish")
    finally:
        unregister_backend("x86+mish")
    x = torch.randn(8, 3, 12, 12)
    ref, out = model(x), q(x)
    print(type(q.act).__name__, f"SQNR {float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())):.1f} dB")


if __name__ == "__main__":
    main()
