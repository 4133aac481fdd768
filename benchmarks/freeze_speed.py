"""Latency of a converted GraphModule against ``fxquant.freeze`` of it (not a test: nothing asserts
but the outputs being identical).

    python benchmarks/freeze_speed.py [--rounds 9] [--size 224] [--backend x86] [--json out.json]

Models: a MobileNetV2-style int8 CNN (inverted residuals, depthwise 3x3, ReLU6, residual adds;
width 1.0, batch 1, 3xSIZExSIZE) and the dynamic LSTM classifier of examples/dynamic_lstm.py
(qint8 and float16 weights, batch 1, 50 tokens). One thread; every round times each variant in
turn (interleaved), medians of wall time and of process CPU time per call (CPU time is what a
shared, noisy machine distorts least). Variants: "graph" (the converted GraphModule), "frozen"
(``fxquant.freeze``, method auto), and for the CNN also "frozen.trace" / "frozen.script".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
warnings.filterwarnings("ignore")

import fxquant  # noqa: E402
from fxquant.backends.engine import engine  # noqa: E402
from fxquant.qconfig import (default_dynamic_qconfig, float16_dynamic_qconfig,  # noqa: E402
                             float_qparams_weight_only_qconfig)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             relu6: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if relu6 else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   _conv_bn(hidden, cout, 1, relu6=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2ish(nn.Module):
    """torchvision's MobileNetV2 layout (width 1.0), written out so the benchmark has no
    torchvision dependency."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def static_cnn(backend: str, size: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = _randomize_bn(MobileNetV2ish()).eval()
    x = torch.randn(1, 3, size, size)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (x,),
                                  backend=backend)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(1, 3, size, size))
    return fxquant.convert_fx(prepared), (x,)


def dynamic_lstm(dtype: torch.dtype) -> tuple[nn.Module, tuple]:
    from dynamic_lstm import LSTMClassifier

    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    tokens = torch.randint(0, 5000, (1, 50))
    dyn = default_dynamic_qconfig if dtype == torch.qint8 else float16_dynamic_qconfig
    spec = {nn.LSTM: dyn, nn.Linear: dyn, nn.Embedding: float_qparams_weight_only_qconfig}
    return fxquant.quantize_dynamic_fx(model, spec, dtype, (tokens,)), (tokens,)


def time_interleaved(fns: dict[str, Callable[..., Any]], inputs: tuple, rounds: int,
                     iters: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU milliseconds per call of each function, interleaved."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(5):
                fn(*inputs)
        for _ in range(rounds):
            for name, fn in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    fn(*inputs)
                wall[name].append((time.perf_counter() - w0) / iters * 1e3)
                cpu[name].append((time.process_time() - c0) / iters * 1e3)
    return {k: {"wall_ms": statistics.median(wall[k]), "cpu_ms": statistics.median(cpu[k])}
            for k in fns}


def bench(name: str, qmodel: nn.Module, inputs: tuple, methods: tuple[str, ...], rounds: int,
          iters: int) -> dict[str, Any]:
    fns: dict[str, Callable[..., Any]] = {"graph": qmodel}
    freeze_s = {}
    for method in methods:
        t0 = time.perf_counter()
        frozen = fxquant.freeze(qmodel, inputs, method=method)
        freeze_s[method] = time.perf_counter() - t0
        with torch.no_grad():
            assert torch.equal(frozen(*inputs), qmodel(*inputs)), f"{name}: {method} differs"
        fns["frozen" if method == "auto" else f"frozen.{method}"] = frozen
    times = time_interleaved(fns, inputs, rounds, iters)
    base = times["graph"]
    print(f"\n{name}")
    print(f"  {'variant':<14}{'wall ms':>9}{'cpu ms':>9}{'wall x':>8}{'cpu x':>8}")
    for k, t in times.items():
        print(f"  {k:<14}{t['wall_ms']:>9.2f}{t['cpu_ms']:>9.2f}"
              f"{t['wall_ms'] / base['wall_ms']:>8.2f}{t['cpu_ms'] / base['cpu_ms']:>8.2f}")
    print("  freeze took " + ", ".join(f"{m} {s:.1f} s" for m, s in freeze_s.items()))
    return {"times": times, "freeze_seconds": freeze_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
          f"1 thread, backend {args.backend}, {args.rounds} interleaved rounds, medians")
    results = {}
    with engine(args.backend):
        qmodel, inputs = static_cnn(args.backend, args.size)
        results["mobilenet_v2ish"] = bench(
            f"MobileNetV2-style int8, 1x3x{args.size}x{args.size}", qmodel, inputs,
            ("auto", "trace"), args.rounds, iters=5)
        for dtype in (torch.qint8, torch.float16):
            qmodel, inputs = dynamic_lstm(dtype)
            results[f"lstm_{str(dtype).split('.')[-1]}"] = bench(
                f"dynamic LSTM classifier ({dtype}), 1x50 tokens", qmodel, inputs, ("auto",),
                args.rounds, iters=5)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
