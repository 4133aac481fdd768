"""Speed of the integer representation and Inductor on a MobileNetV2-style CNN, or on a bench
model (``--model mobilenet_v3``, benchmarks/models.py) (not a test).

Times, interleaved in one process on 1 thread (round-robin over the paths, median of the
rounds, plus process CPU time per call because shared machines are noisy):

  fp32 eager | fxquant native int8 (quantized:: kernels) | int representation eager |
  int representation + Inductor (freezing) | AOTInductor .pt2 (with --aoti) |
  Inductor as it was before post-op fusion, the C++ wrapper and guard skipping (with --baseline:
  fuse_post_ops=False, cpp_wrapper=False, skip_guards=False) |
  Inductor with int8 convs and linears, with fp32 convs, with fp32 convs and linears (with
  --float-convs: float_convs / float_linears forced; the one this CPU's "auto" picks is marked;
  otherwise the one Inductor path is "auto")

and the agreement of every int8 path with the native model in output steps. Inductor compiles
C++ (g++): minutes on a busy 2-core machine.

    python benchmarks/inductor_speed.py [--blocks 7] [--size 96] [--rounds 30] [--aoti] [--baseline]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/inductor_speed.py \
        --model mobilenet_v3 --size 224 --float-convs --inductor-only   # a CPU without VNNI
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxquant  # noqa: E402


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2ish(nn.Module):
    """MobileNetV2's shape (stem, inverted residuals with ReLU6 and depthwise 3x3, 1x1 head,
    pool, classifier), width and depth cut so that Inductor compiles it in minutes."""

    SETTINGS = [(16, 1, 1), (24, 2, 2), (24, 1, 6), (32, 2, 6), (32, 1, 6), (64, 2, 6),
                (64, 1, 6), (96, 1, 6), (160, 2, 6), (160, 1, 6), (320, 1, 6)]

    def __init__(self, blocks: int = 7) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                                   nn.ReLU6()]
        c = 32
        for cout, stride, expand in self.SETTINGS[:blocks]:
            layers.append(InvertedResidual(c, cout, stride, expand))
            c = cout
        layers += [nn.Conv2d(c, 640, 1, bias=False), nn.BatchNorm2d(640), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(640, 100)

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


def _model(name: str, blocks: int, size: int) -> nn.Module:
    if name == "mobilenet_v2ish":
        return _randomize_bn(MobileNetV2ish(blocks)).eval()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import models as bench_models  # benchmarks/models.py

    if name not in bench_models.MODELS or bench_models.MODELS[name].kind != "static":
        raise SystemExit(f"--model: mobilenet_v2ish or a static model of benchmarks/models.py, "
                         f"got {name!r}")
    return bench_models.build(name, size)


def _time(paths: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for fn in paths.values():  # warm up
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in paths.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: {"wall_ms": 1e3 * statistics.median(wall[k]),
                "cpu_ms": 1e3 * statistics.median(cpu[k])} for k in paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2ish",
                    help="mobilenet_v2ish (this file's, default) or a static model of "
                         "benchmarks/models.py (mobilenet_v3, efficientnet_b0, ...)")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--backend", default="x86")
    ap.add_argument("--aoti", action="store_true", help="also build and time an AOTInductor .pt2")
    ap.add_argument("--baseline", action="store_true",
                    help="also time Inductor without post-op fusion, C++ wrapper, guard skipping")
    ap.add_argument("--float-convs", action="store_true",
                    help="time Inductor with int8 convs, fp32 convs, fp32 convs and linears "
                         "(float_convs / float_linears forced) instead of the one 'auto' path")
    ap.add_argument("--inductor-only", action="store_true",
                    help="time fp32 eager and the Inductor paths only (no native / eager int)")
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.backends.quantized.engine = args.backend
    torch.manual_seed(0)
    model = _model(args.model, args.blocks, args.size)
    shape = (args.batch, 3, args.size, args.size)
    example = (torch.randn(*shape),)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(args.backend),
                                  example, backend=args.backend)
    with torch.no_grad():
        for _ in range(8):
            prepared(torch.randn(*shape))
    native = fxquant.convert_fx(prepared)
    integer = fxquant.convert_fx(prepared, representation="int")
    x = torch.randn(*shape)
    paths: dict[str, Callable[[], object]] = {"fp32 eager": lambda: model(x)}
    if not args.inductor_only:
        paths["fxquant native int8"] = lambda: native(x)
        paths["int repr eager"] = lambda: integer(x)
    extra: dict[str, float] = {}
    from fxquant.backends.inductor import float_conv_plan

    auto = float_conv_plan("auto")
    print(f"float_convs / float_linears = 'auto' on this CPU: {auto.enabled} ({auto.reason})")
    variants = {"inductor int8 convs": (False, False), "inductor fp32 convs": (True, False),
                "inductor fp32 convs+linears": (True, True)} if args.float_convs \
        else {"int repr + inductor": ("auto", "auto")}
    for name, (float_convs, float_linears) in variants.items():
        if float_convs is auto.enabled and float_linears is auto.enabled:
            name += " (auto)"
        t0 = time.perf_counter()
        compiled = fxquant.compile(integer, example, backend="inductor", float_convs=float_convs,
                                   float_linears=float_linears)
        extra[f"{name} compile_s"] = time.perf_counter() - t0
        paths[name] = functools.partial(compiled, x)
    if args.baseline:
        t0 = time.perf_counter()
        baseline = fxquant.compile(integer, example, backend="inductor", fuse_post_ops=False,
                                   float_convs=False, float_linears=False,
                                   skip_guards=False, cpp_wrapper=False)
        extra["baseline_compile_s"] = time.perf_counter() - t0
        paths["inductor baseline"] = lambda: baseline(x)
    if args.aoti:
        from fxquant.backends import inductor

        path = str(Path(tempfile.mkdtemp()) / "mobilenet_ish.pt2")
        t0 = time.perf_counter()
        inductor.package(integer, example, path)
        extra["aoti_package_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        aoti = inductor.load_package(path)
        extra["aoti_load_s"] = time.perf_counter() - t0
        paths["AOTInductor .pt2"] = lambda: aoti(x)
    with torch.no_grad():
        ref = native(x)
        scale = float(next(n for n in native.graph.nodes if n.op == "output").args[0]
                      .args[0].meta["fxquant"].qparams["scale"])
        agree = {k: float(((fn() - ref).abs() / scale <= 1.001).float().mean())
                 for k, fn in paths.items() if k != "fp32 eager"}
        figures = _time(paths, args.rounds)
    base = figures["fp32 eager"]["wall_ms"]
    what = f"MobileNetV2-ish ({args.blocks} blocks)" if args.model == "mobilenet_v2ish" \
        else args.model
    print(f"{what}, input {shape}, 1 thread, "
          f"{args.rounds} interleaved rounds, median")
    print(f"{'path':31s} {'wall ms':>9s} {'cpu ms':>9s} {'x fp32 time':>11s} {'<=1 step':>9s}")
    for k, v in figures.items():
        a = f"{agree[k]:.2%}" if k in agree else "-"
        print(f"{k:31s} {v['wall_ms']:9.2f} {v['cpu_ms']:9.2f} {v['wall_ms'] / base:10.2f}x "
              f"{a:>9s}")
    print(", ".join(f"{k}={v:.2f}" for k, v in extra.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figures,
                                               "agreement": agree, **extra}, indent=2))


if __name__ == "__main__":
    main()
