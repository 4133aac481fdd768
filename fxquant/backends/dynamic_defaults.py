"""Which weight granularity the default dynamic qconfig uses on a backend (issue 11 item 7).

Per-channel int8 weights (one scale per output row) lose less than per-tensor ones wherever
rows differ in magnitude — the common case in trained Linear / LSTM / GRU layers. Every
dynamic kernel fxquant lowers to (``quantized::linear_dynamic`` and ``linear_relu_dynamic``,
``torch.quantized_lstm`` / ``quantized_gru`` and the RNN cells, whose cell parameters are
``linear_prepack`` packs too) reads its weights from ``quantized::linear_prepack``, so one
question decides them all: does this engine's ``linear_prepack`` keep per-channel scales?

:func:`dynamic_weights_per_channel` answers it by running the kernel, not from a table: it
packs a weight whose rows differ by powers of two, runs ``linear_dynamic`` and compares with
the float product of the dequantized weight. An engine that ignored (or refused) the
per-channel scales would be off by the row ratios; then the default stays per-tensor. On
torch 2.13 fbgemm, x86, onednn and qnnpack all pass (tests/test_dynamic_per_channel.py pins
that, and checks LSTM / GRU / cells against torch.ao with a per-channel qconfig).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["DynamicWeights", "dynamic_weights_per_channel"]

_MIN_SQNR_DB = 25.0  # a correct 8-bit dynamic linear on this probe reaches > 35 dB


@dataclass(frozen=True)
class DynamicWeights:
    """The default dynamic weight granularity on an engine, and why."""

    engine: str
    per_channel: bool
    reason: str


@lru_cache(maxsize=None)
def dynamic_weights_per_channel(engine: str) -> DynamicWeights:
    """Whether ``engine``'s dynamic int8 kernels compute correctly with per-channel weights
    here (checked once per process on random data; see the module docstring)."""
    from fxquant.backends.engine import engine as use_engine, supported_engines

    if engine not in supported_engines():
        return DynamicWeights(engine, False, f"per-tensor int8 weights: engine {engine!r} is not "
                                             f"in this torch build, nothing to check")
    try:
        with use_engine(engine), torch.no_grad():
            sqnr = _probe()
    except Exception as e:  # noqa: BLE001 - a refusal means "not supported here"
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return DynamicWeights(engine, False, f"per-tensor int8 weights: {engine}'s "
                                             f"linear_prepack refuses per-channel weights ({first})")
    if sqnr < _MIN_SQNR_DB:
        return DynamicWeights(engine, False, f"per-tensor int8 weights: {engine}'s dynamic "
                                             f"kernel with per-channel weights is off "
                                             f"({sqnr:.1f} dB on a check, < {_MIN_SQNR_DB} dB)")
    return DynamicWeights(engine, True, f"per-channel int8 weights (one scale per output "
                                        f"channel): {engine}'s dynamic kernels take them "
                                        f"(checked: {sqnr:.0f} dB on random data); rows of "
                                        f"different magnitude keep their precision")


def _probe() -> float:
    """SQNR (dB) of ``linear_dynamic`` with a per-channel weight against the float product of
    the same dequantized weight; rows scaled by 1/64 .. 1 so that a kernel using one scale for
    all rows loses the small rows entirely."""
    gen = torch.Generator().manual_seed(11)
    rows = torch.tensor([2.0 ** -(i % 7) for i in range(16)]).unsqueeze(1)
    w = torch.randn(16, 32, generator=gen) * rows
    x = torch.randn(8, 32, generator=gen)
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-8).to(torch.double)
    qw = torch.quantize_per_channel(w, scales, torch.zeros(16, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    y = torch.ops.quantized.linear_dynamic(x, packed, True)
    ref = x @ qw.dequantize().t()
    err = (y - ref) / rows.t()  # each output column relative to its row's magnitude
    return float(20 * torch.log10((ref / rows.t()).norm() / err.norm().clamp_min(1e-12)))
