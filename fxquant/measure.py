"""Size and latency measurement for quantized models, done the way shared noisy machines need:
latencies as ratios against a baseline timed in the same process, interleaved, median of runs."""
from __future__ import annotations

import io
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's serialized state_dict (what a checkpoint of it weighs)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def interleaved_latency(models: Mapping[str, Callable[..., Any]], inputs: Sequence[Any], *,
                        rounds: int = 7, iters: int = 10, warmup: int = 10) -> dict[str, float]:
    """Median seconds per call of each model. Each round times every model once, in turn, so
    that machine noise hits all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for fn in models.values():
            for _ in range(warmup):
                fn(*inputs)
        for _ in range(rounds):
            for name, fn in models.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn(*inputs)
                samples[name].append((time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in samples.items()}


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB."""
    noise = (reference.float() - test.float()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(reference.float().norm() / noise))
