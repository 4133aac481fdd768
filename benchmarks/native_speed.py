"""Native int8 speed (issue 10 items 0-1): fp32 vs fxquant int8 before / after the ReLU6 fusion
and the per-layer engine choice, and torch.ao FX int8 where importable.

Not a test: prints a table (median wall ms and median process-CPU ms per call, batch 1,
1 thread, every variant timed round-robin in one process so that machine noise hits them
alike) and, per model, how many ops stay float. Run from the repository root:

    python benchmarks/native_speed.py [--runs 30] [--size 224] [--backend x86] [--json out.json]

Variants:
  fp32                      the float model, eager
  fxq int8 (before)         ReLU6 / clamp not fused with conv+bn (fusion table without the
                            clamp patterns) and the engine choice off: fxquant before this work
  fxq int8 (no eng choice)  ReLU6 fused (bound in the output qparams), engine choice off
  fxq int8                  ReLU6 fused and the measured per-layer engine choice on (default)
  torch.ao fx int8          torch.ao.quantization.quantize_fx with its default mapping
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxquant  # noqa: E402
from fxquant.backends import engine_choice, kernel_check  # noqa: E402


# ------------------------------------------------------------------ models (in-file)
def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True
         ) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups,
                                         bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = _cbr(cin, hidden, 1) if expand != 1 else []
        layers += _cbr(hidden, hidden, 3, stride, groups=hidden) + _cbr(hidden, cout, 1,
                                                                         act=False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout (width 1.0), random weights."""

    CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_cbr(3, 32, 3, 2))]
        cin = 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(nn.Sequential(*_cbr(cin, 1280, 1)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, branch, 1, bias=False), nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True))
        first = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(
            nn.Conv2d(first, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision's ShuffleNetV2 x1.0 layout (116 / 232 / 464 channels: depthwise convs of
    58 / 116 / 232 channels), random weights."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 24
        for repeats, cout in ((4, 116), (8, 232), (4, 464)):
            stages += [ShuffleBlock(cin, cout, 2)] + [ShuffleBlock(cout, cout, 1)
                                                      for _ in range(repeats - 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(nn.Conv2d(cin, 1024, 1, bias=False), nn.BatchNorm2d(1024),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(1024, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


MODELS: dict[str, Callable[[], nn.Module]] = {"MobileNetV2": MobileNetV2,
                                              "ShuffleNetV2": ShuffleNetV2}


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


# ------------------------------------------------------------------ variants
def _before_passes() -> tuple:
    """The prepare pipeline with the fusion table as it was before the clamp patterns."""
    from fxquant.fusion import default_module_fusions
    from fxquant.passes import prepare_pipeline
    from fxquant.passes.fuse import Fuse

    fusions = tuple(f for f in default_module_fusions() if not f.clamp_root)
    return tuple(Fuse(module_fusions=fusions) if isinstance(p, Fuse) else p
                 for p in prepare_pipeline())


def fxquant_int8(model: nn.Module, x: torch.Tensor, calib: list[torch.Tensor], backend: str,
                 *, fused: bool, choice: bool) -> tuple[nn.Module, float]:
    mapping = fxquant.get_default_qconfig_mapping(backend)
    prepared = fxquant.prepare_fx(model, mapping, (x,), backend=backend,
                                  passes=None if fused else _before_passes())
    with torch.no_grad():
        for b in calib:
            prepared(b)
    kernel_check.clear_cache()
    engine_choice.clear_cache()
    t0 = time.perf_counter()
    with engine_choice.options(enabled=choice):
        quantized = fxquant.convert_fx(prepared)
    return quantized, time.perf_counter() - t0


def torch_ao_int8(model: nn.Module, x: torch.Tensor, calib: list[torch.Tensor], backend: str
                  ) -> nn.Module | None:
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError:
        return None
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(backend), (x,))
        with torch.no_grad():
            for b in calib:
                prepared(b)
        return convert_fx(prepared)


def float_islands(gm: nn.Module) -> int:
    """Tensor ops that run float between dequantize and quantize (their last decision says
    keep_float / keep_reference): 0 means the model is int8 end to end."""
    from fxquant.meta import qinfo_or_none

    graph = getattr(gm, "graph", None)
    if graph is None:
        return -1
    count = 0
    for n in graph.nodes:
        info = qinfo_or_none(n)
        value = info.value if info is not None else None
        if n.op.startswith("call_") and info is not None and info.decisions and \
                value is not None and value.kind == "tensor" and value.is_float_tensor and \
                info.decisions[-1].action in ("keep_float", "keep_reference"):
            count += 1
    return count


def count_ops(gm: nn.Module, names: tuple[str, ...]) -> int:
    graph = getattr(gm, "graph", None)
    if graph is None:
        return -1
    modules = dict(gm.named_modules())
    total = 0
    for n in graph.nodes:
        label = type(modules[n.target]).__name__ if n.op == "call_module" else str(n.target)
        total += any(k in label for k in names) and n.op.startswith("call_")
    return total


def engine_choices(gm: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in gm.modules():
        packed = getattr(m, "packed_engine", None)
        if isinstance(packed, str):
            out[packed] = out.get(packed, 0) + 1
    return out


def time_round_robin(fns: dict[str, Callable[[], Any]], runs: int
                     ) -> dict[str, tuple[float, float]]:
    """name -> (median wall ms, median process CPU ms), the variants interleaved."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(), fn()
        for _ in range(runs):
            for k, fn in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                cpu[k].append((time.process_time() - c0) * 1e3)
                wall[k].append((time.perf_counter() - w0) * 1e3)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - x).norm().clamp_min(1e-12)))


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _randomize_bn(MODELS[name]())
    shape = (1, 3, args.size, args.size)
    x = torch.randn(shape)
    calib = [torch.randn(shape) for _ in range(args.calib)]
    torch.backends.quantized.engine = args.backend
    variants: dict[str, nn.Module] = {"fp32": model}
    info: dict[str, Any] = {"fp32": {}}
    for label, fused, choice in (("fxq int8 (before)", False, False),
                                 ("fxq int8 (no eng choice)", True, False),
                                 ("fxq int8", True, True)):
        q, seconds = fxquant_int8(model, x, calib, args.backend, fused=fused, choice=choice)
        variants[label] = q
        info[label] = {"convert_s": round(seconds, 2), "float_ops": float_islands(q),
                       "clamp_ops": count_ops(q, ("hardtanh", "relu6", "clamp", "ReLU6")),
                       "packed_engines": engine_choices(q)}
    ao = torch_ao_int8(model, x, calib, args.backend) if not args.no_ao else None
    if ao is not None:
        variants["torch.ao fx int8"] = ao
    with torch.no_grad():
        ref = model(x)
        for label, m in variants.items():
            info.setdefault(label, {})["sqnr_db"] = round(sqnr(ref, m(x)), 1)
    times = time_round_robin({k: (lambda m=m: m(x)) for k, m in variants.items()}, args.runs)
    for label, (w, c) in times.items():
        info[label].update(wall_ms=round(w, 3), cpu_ms=round(c, 3))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calib", type=int, default=4)
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-ao", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.models.split(","):
        results[name] = info = bench_model(name, args)
        fp32 = info["fp32"]["wall_ms"]
        print(f"\n{name} ({args.size}x{args.size}, batch 1, 1 thread, backend {args.backend}, "
              f"median of {args.runs})")
        print(f"  {'variant':26s} {'wall ms':>9s} {'cpu ms':>9s} {'vs fp32':>8s} {'SQNR dB':>8s}"
              f"  notes")
        for label, r in info.items():
            notes = ""
            if "float_ops" in r:
                notes = (f"float ops {r['float_ops']}, clamp ops {r['clamp_ops']}, packed "
                         f"{r['packed_engines']}, convert {r['convert_s']} s")
            print(f"  {label:26s} {r['wall_ms']:9.2f} {r['cpu_ms']:9.2f} "
                  f"{fp32 / r['wall_ms']:7.2f}x {r['sqnr_db']:8.1f}  {notes}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
