"""`make bench`: speed and size of fxquant's int8 models, as ratios measured in one process.

Latency ratios are medians of interleaved rounds (each round times every model once), so the
noise of a shared machine hits numerator and denominator alike. Not a test: nothing asserts.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
warnings.filterwarnings("ignore")

import fxquant  # noqa: E402
from fxquant.measure import interleaved_latency, model_size_bytes  # noqa: E402


def _calibrate(prepared, shape, n=8):
    with torch.no_grad():
        for _ in range(n):
            prepared(torch.randn(*shape))


def bench_static_cnn(backend: str, rounds: int) -> None:
    from static_ptq_resnet import make_model

    model = make_model()
    example = (torch.randn(1, 3, 64, 64),)
    torch.backends.quantized.engine = backend
    ours = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), example,
                              backend=backend)
    _calibrate(ours, (8, 3, 64, 64))
    ours = fxquant.convert_fx(ours)
    models = {"fp32": model, "fxquant": ours}
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        theirs = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(backend), example)
        _calibrate(theirs, (8, 3, 64, 64))
        models["torch.ao"] = convert_fx(theirs)
    except ImportError:
        print("torch.ao.quantization not available: no fxquant/torch.ao ratio")
    print(f"\n== static PTQ, example ResNet-style CNN (examples/static_ptq_resnet.py), {backend}, "
          f"{torch.get_num_threads()} threads")
    print(f"size: fp32 {model_size_bytes(model) / 1e6:.2f} MB, int8 "
          f"{model_size_bytes(ours) / 1e6:.2f} MB ({model_size_bytes(ours) / model_size_bytes(model):.2f}x)")
    for batch in (1, 8):
        t = interleaved_latency(models, (torch.randn(batch, 3, 64, 64),), rounds=rounds, iters=10,
                                warmup=20)
        line = (f"batch {batch}: fp32 {t['fp32'] * 1e3:7.2f} ms  fxquant int8 {t['fxquant'] * 1e3:7.2f} ms"
                f"  int8/fp32 = {t['fxquant'] / t['fp32']:.3f}")
        if "torch.ao" in t:
            line += (f"  torch.ao int8 {t['torch.ao'] * 1e3:7.2f} ms  fxquant/torch.ao = "
                     f"{t['fxquant'] / t['torch.ao']:.3f}")
        print(line)


def _dynamic_bench(title: str, model: torch.nn.Module, inputs: tuple, spec, weights_of,
                   rounds: int) -> None:
    quantized = fxquant.quantize_dynamic_fx(model, spec, torch.qint8, inputs)
    t = interleaved_latency({"fp32": model, "int8": quantized}, inputs, rounds=rounds, iters=10,
                            warmup=20)
    size = model_size_bytes(quantized) / model_size_bytes(model)
    w = weights_of(quantized) / weights_of(model)
    print(f"\n== dynamic int8, {title}, batch 1, {torch.get_num_threads()} threads")
    print(f"latency: fp32 {t['fp32'] * 1e3:7.2f} ms  int8-dynamic {t['int8'] * 1e3:7.2f} ms  "
          f"int8/fp32 = {t['int8'] / t['fp32']:.3f}")
    print(f"size: whole model {size:.3f}x of fp32; quantized weights {w:.3f}x of fp32 (target <= 0.3)")


def bench_dynamic_lstm(backend: str, rounds: int) -> None:
    from dynamic_lstm import LSTMClassifier

    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    spec = {torch.nn.LSTM, torch.nn.Linear}
    _dynamic_bench("LSTM text classifier (examples/dynamic_lstm.py)", model,
                   (torch.randint(0, 5000, (1, 50)),), spec,
                   lambda m: model_size_bytes(m.lstm) + model_size_bytes(m.fc), rounds)


def bench_dynamic_transformer(backend: str, rounds: int) -> None:
    from dynamic_transformer import Encoder, linear_weight_bytes

    torch.manual_seed(0)
    model = Encoder().eval()
    _dynamic_bench("transformer encoder (examples/dynamic_transformer.py)", model,
                   (torch.randint(0, 1000, (1, 64)),), None, linear_weight_bytes, rounds)


BENCHES = {"static_cnn": bench_static_cnn, "dynamic_lstm": bench_dynamic_lstm,
           "dynamic_transformer": bench_dynamic_transformer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    args = parser.parse_args()
    for name in args.only or list(BENCHES):
        BENCHES[name](args.backend, args.rounds)


if __name__ == "__main__":
    main()
