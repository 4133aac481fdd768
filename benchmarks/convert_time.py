"""Convert time with and without lowering's numeric kernel self-check (not a test: nothing asserts).

    python benchmarks/convert_time.py [--backend x86] [--rounds 7]

For each model, ``convert_fx`` runs in interleaved rounds in three ways: the check off
(``LowerToBackend(check_kernels=False)``), the check on with an empty cache (``clear_cache()``
first: a process's first convert) and the check on with the cache the earlier converts filled
(a repeated convert in one process). Medians; ratios against "off".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
warnings.filterwarnings("ignore")

import fxquant  # noqa: E402
from fxquant.backends import kernel_check  # noqa: E402
from fxquant.passes import Cleanup, Convert, LowerToBackend  # noqa: E402


def _models() -> dict[str, tuple[torch.nn.Module, tuple]]:
    from dynamic_transformer import Encoder
    from static_ptq_resnet import make_model

    torch.manual_seed(0)
    return {
        "ResNet-ish CNN (examples/static_ptq_resnet.py), 1x3x64x64":
            (make_model(), (torch.randn(1, 3, 64, 64),)),
        "transformer encoder (examples/dynamic_transformer.py), static, 1x64 tokens":
            (Encoder().eval(), (torch.randint(0, 1000, (1, 64)),)),
    }


def _prepared(model: torch.nn.Module, example: tuple, backend: str) -> torch.nn.Module:
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), example,
                                  backend=backend)
    with torch.no_grad():
        for _ in range(4):
            prepared(*example)
    return prepared


def _time(prepared: torch.nn.Module, check: bool, cold: bool) -> float:
    if cold:
        kernel_check.clear_cache()
    passes = (Convert(), LowerToBackend(check_kernels=check), Cleanup())
    start = time.perf_counter()
    fxquant.convert_fx(prepared, passes=passes)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = args.backend
    print(f"{args.backend}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for name, (model, example) in _models().items():
        prepared = _prepared(model, example, args.backend)
        _time(prepared, True, True)  # warm up the interpreter and torch
        runs: dict[str, list[float]] = {"off": [], "cold": [], "warm": []}
        for _ in range(args.rounds):
            runs["off"].append(_time(prepared, False, False))
            runs["cold"].append(_time(prepared, True, True))
            runs["warm"].append(_time(prepared, True, False))
        t = {k: statistics.median(v) for k, v in runs.items()}
        print(f"\n== {name}\nconvert_fx: check off {t['off'] * 1e3:7.1f} ms, "
              f"on (empty cache) {t['cold'] * 1e3:7.1f} ms = {t['cold'] / t['off']:.2f}x, "
              f"on (cached) {t['warm'] * 1e3:7.1f} ms = {t['warm'] / t['off']:.2f}x")


if __name__ == "__main__":
    main()
