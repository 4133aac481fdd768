"""Run fxquant's int8 model on ONNX Runtime and OpenVINO, with fxquant's own qparams.

The ResNet-style CNN of ``static_ptq_resnet.py`` is calibrated and converted once; the converted
model is written as a QDQ ONNX file (``fxquant.export_onnx``) and run by ONNX Runtime and
OpenVINO (``fxquant.compile``), each an ``nn.Module``. ``bias="int32"`` at convert rounds the
conv / linear biases to the int32 accumulator units the engines add, so that their outputs are
the native model's (within one output step); the example prints how many are. Engines that are
not installed (``pip install fxquant[onnx]``, ``fxquant[openvino]``) are skipped with a note.
Last, the same model converted with ``fuse_sums=True`` (each residual add computed with the conv
before it, rounded once) runs on OpenVINO, which fuses those adds into its int8 convs.

    python examples/onnx_engines.py [--out model.onnx] [--size 64]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxquant  # noqa: E402
from fxquant.measure import interleaved_latency  # noqa: E402
from static_ptq_resnet import make_model  # noqa: E402

ENGINES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # backend -> package
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}  # backend -> pip extra


def quantize(size: int = 64, **convert_options: object
             ) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The float model, its int8 conversion (x86 kernels, int32 biases unless
    ``convert_options`` say otherwise) and an example input."""
    torch.manual_seed(0)
    model = make_model()
    example = torch.randn(1, 3, size, size)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (example,),
                                  backend="x86")
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(8, 3, size, size))
    return model, fxquant.convert_fx(prepared, **{"bias": "int32", **convert_options}), example


def within_one_step(native: torch.Tensor, other: torch.Tensor, qmodel: torch.nn.Module) -> float:
    """Fraction of outputs in the same integer step as the native model's, or the next one
    (the step: the scale of the quantized tensor the model's last dequantize reads)."""
    from fxquant.meta import qinfo

    out = next(n for n in qmodel.graph.nodes if n.op == "output").args[0]
    scale = float(qinfo(out.args[0]).qparams["scale"])
    return float(((other - native) / scale).round().abs().le(1).float().mean())


def run(size: int = 64, out: Optional[str] = None) -> dict[str, float]:
    """Quantize, export, run on every installed engine; returns each engine's agreement."""
    model, qmodel, example = quantize(size)
    agreement = {}
    if importlib.util.find_spec("onnx") is None:
        print("onnx is not installed: pip install fxquant[onnx]")
        return agreement
    with tempfile.TemporaryDirectory() as tmp:
        path = out or os.path.join(tmp, "model.onnx")
        fxquant.export_onnx(qmodel, path, (example,))
        size_mb = os.path.getsize(path) / 1e6
        print(f"wrote {path} ({size_mb:.2f} MB, fxquant's scales and zero points)")
    x = torch.randn(16, 3, size, size)
    runners = {"native": qmodel}
    with torch.no_grad():
        native = qmodel(x)
        for backend, package in ENGINES.items():
            if importlib.util.find_spec(package) is None:
                print(f"{backend:12s} not installed (pip install fxquant[{EXTRAS[backend]}])")
                continue
            engine = fxquant.compile(qmodel, (example,), backend=backend, threads=1)
            agreement[backend] = within_one_step(native, engine(x), qmodel)
            runners[backend] = engine
            print(f"{backend:12s} {agreement[backend]:.1%} of the outputs within one native step")
    if "openvino" in runners:  # residual adds fused into the convs: a model of its own
        fused = quantize(size, fuse_sums=True)[1]
        engine = fxquant.compile(fused, (example,), backend="openvino", threads=1)
        with torch.no_grad():
            agreement["openvino fuse_sums"] = within_one_step(fused(x), engine(x), fused)
        runners["openvino fuse_sums"] = engine
        print(f"{'openvino fuse_sums':12s} {agreement['openvino fuse_sums']:.1%} of the "
              f"outputs within one step of its own native model")
    times = interleaved_latency(runners, (example,), rounds=5, iters=5)
    print("batch 1 latency    " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))
    return agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="keep the ONNX file here")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.size, args.out)


if __name__ == "__main__":
    main()
