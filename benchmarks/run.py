"""`make bench`: fxquant's int8 models against fp32, torch.ao and the other CPU int8 engines.

For each model of ``benchmarks/models.py`` (ResNet-18/50, MobileNetV2/V3, ShuffleNetV2 and
EfficientNet-B0 look-alikes at 224x224, a dynamic LSTM and a transformer encoder), in one
process, one thread, batch 1 and 8, every available path is timed:

    fp32          the float model, eager
    torch.ao      torch.ao FX int8 (static: x86 qconfig mapping, same calibration; dynamic: Linear/LSTM)
    fxq.native    fxquant.convert_fx, run as a GraphModule on torch's quantized kernels
    fxq.frozen    fxquant.freeze(qmodel, example_inputs): frozen TorchScript
    fxq.inductor  convert_fx(..., representation="int") + fxquant.compile(backend="inductor")
    fxq.ort       fxquant.compile(qmodel, backend="onnxruntime")  (fxquant's own qparams)
    fxq.openvino  fxquant.compile(qmodel, backend="openvino")
    fxq.ov_fused  convert_fx(..., fuse_sums=True, fuse_activations=True) (conv + residual add,
                  conv + SiLU / hardswish rounded once) compiled by OpenVINO: they fuse into the
                  conv as oneDNN post-ops, as in OpenVINO + NNCF models (static models; a
                  different model from fxq.native)
    fxq.ov_sym    as fxq.ov_fused, calibrated with get_default_qconfig_mapping(...,
                  symmetric_activations=True) (zero point 0 or 128, as NNCF quantizes; OpenVINO
                  reads 128 as int8 with zero point 0): another calibration of the same model
    ort.quantize  ONNX Runtime's own quantizer on an fp32 ONNX export of the float model
                  (static models: quantize_static, QDQ, per-channel, same calibration data;
                  dynamic models: quantize_dynamic)
    ov.nncf       OpenVINO + NNCF post-training quantization (only where nncf is installed)

Paths that other work lands later (freeze, the integer representation, the engines) are found
at run time; a missing or failing one is printed as ``n/a (reason)``. Latency is the median over
interleaved rounds (each round times every path once, in turn, so the noise of a shared machine
hits numerator and denominator alike) of wall time and of process CPU time per call; ratios are
against fp32 eager measured in the same rounds. CPU time also shows an engine that used more
than the one thread it was asked for. Each path's output is compared with fp32 (SQNR, dB) and
with fxquant's native model ("vs native", dB: the engines should agree with it), and the float
ops left in fxquant's converted graph are counted ("int8 end to end" = none).

    python benchmarks/run.py                  # every model, 224x224: 20 min on 2 cores, more if shared
    python benchmarks/run.py --quick          # 3 models, 112x112, batch 1, 3 rounds
    python benchmarks/run.py --models mobilenet_v2 --paths fp32,fxq.native,ort.quantize

Not a test: nothing asserts. JSON goes to out/bench.json (``--json``).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import fxquant  # noqa: E402
import models as bench_models  # noqa: E402  (benchmarks/models.py)

BACKEND = "x86"
PATHS = ("fp32", "torch.ao", "fxq.native", "fxq.frozen", "fxq.inductor", "fxq.ort",
         "fxq.openvino", "fxq.ov_fused", "fxq.ov_sym", "ort.quantize", "ov.nncf")
FXQ_PATHS = tuple(p for p in PATHS if p.startswith("fxq."))
PEER_PATHS = ("ort.quantize", "ov.nncf")  # the other tools' own int8 flows
ENGINE_OF = {"fxq.inductor": "inductor", "fxq.ort": "onnxruntime", "fxq.openvino": "openvino"}
QUICK_MODELS = ("mobilenet_v2", "shufflenet_v2", "lstm")
Fn = Callable[[torch.Tensor], Any]


class NotAvailable(Exception):
    """A path cannot run here; the message is the reason printed as ``n/a (reason)``."""


# ------------------------------------------------------------------------------ model context
@dataclass
class ModelCtx:
    """One model's float module, data and the fxquant / torch.ao artifacts paths share."""

    name: str
    kind: str  # "static" | "dynamic"
    model: nn.Module
    calib: list[torch.Tensor]
    workdir: str
    cache: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` the first time, its result (or its exception) afterwards."""
        if key not in self.cache:
            try:
                self.cache[key] = ("ok", make())
            except Exception as e:  # noqa: BLE001 - remembered and re-raised for each user
                self.cache[key] = ("err", e)
        status, value = self.cache[key]
        if status == "err":
            raise value
        return value


def _calibrate(prepared: nn.Module, data: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in data:
            prepared(x)


def _dynamic_spec() -> set:
    return {nn.LSTM, nn.Linear}


def _ao_dynamic_types() -> tuple:
    """torch.ao fuses Linear+ReLU only when the ReLU has the Linear's qconfig too."""
    return (nn.LSTM, nn.Linear, nn.ReLU, torch.nn.functional.relu, torch.relu)


def fxq_prepared(ctx: ModelCtx) -> nn.Module:
    """fxquant's calibrated prepared model (static) — converted into each representation."""
    def make() -> nn.Module:
        mapping = fxquant.get_default_qconfig_mapping(BACKEND)
        prepared = fxquant.prepare_fx(copy.deepcopy(ctx.model), mapping, (ctx.calib[0],),
                                      backend=BACKEND)
        _calibrate(prepared, ctx.calib)
        return prepared
    return ctx.once("fxq.prepared", make)


def fxq_prepared_symmetric(ctx: ModelCtx) -> nn.Module:
    """As :func:`fxq_prepared`, with symmetric activations (zero point 0 or the midpoint)."""
    def make() -> nn.Module:
        if "symmetric_activations" not in inspect.signature(
                fxquant.get_default_qconfig_mapping).parameters:
            raise NotAvailable("get_default_qconfig_mapping has no symmetric_activations option")
        mapping = fxquant.get_default_qconfig_mapping(BACKEND, symmetric_activations=True)
        prepared = fxquant.prepare_fx(copy.deepcopy(ctx.model), mapping, (ctx.calib[0],),
                                      backend=BACKEND)
        _calibrate(prepared, ctx.calib)
        return prepared
    return ctx.once("fxq.prepared.symmetric", make)


def fxq_native(ctx: ModelCtx) -> nn.Module:
    def make() -> nn.Module:
        if ctx.kind == "dynamic":
            return fxquant.quantize_dynamic_fx(copy.deepcopy(ctx.model), _dynamic_spec(),
                                               torch.qint8, (ctx.calib[0],))
        return fxquant.convert_fx(copy.deepcopy(fxq_prepared(ctx)))
    return ctx.once("fxq.native", make)


def fxq_int(ctx: ModelCtx) -> nn.Module:
    """The integer representation (plain uint8/int8 tensors), where convert_fx offers it."""
    def make() -> nn.Module:
        params = inspect.signature(fxquant.convert_fx).parameters
        if "representation" not in params and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise NotAvailable("convert_fx has no representation= option in this checkout")
        if ctx.kind == "dynamic":
            mapping = _dynamic_mapping()
            prepared = fxquant.prepare_fx(copy.deepcopy(ctx.model), mapping, (ctx.calib[0],),
                                          backend=BACKEND)
        else:
            prepared = copy.deepcopy(fxq_prepared(ctx))
        try:
            return fxquant.convert_fx(prepared, representation="int")
        except TypeError as e:
            if "representation" in str(e):
                raise NotAvailable("convert_fx has no representation= option") from e
            raise
    return ctx.once("fxq.int", make)


def _dynamic_mapping() -> Any:
    from fxquant.api import dynamic_qconfig_mapping

    return dynamic_qconfig_mapping(_dynamic_spec(), torch.qint8, BACKEND)


# ------------------------------------------------------------------------------ path builders
def build_fp32(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    return ctx.model


def build_torch_ao(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    def make() -> nn.Module:
        try:
            from torch.ao.quantization import (QConfigMapping, default_dynamic_qconfig,
                                               get_default_qconfig_mapping)
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        except ImportError as e:
            raise NotAvailable(f"torch.ao.quantization not importable ({e})") from e
        model = copy.deepcopy(ctx.model)
        if ctx.kind == "dynamic":
            mapping = QConfigMapping()
            for t in _ao_dynamic_types():
                mapping = mapping.set_object_type(t, default_dynamic_qconfig)
            return convert_fx(prepare_fx(model, mapping, (ctx.calib[0],)))
        prepared = prepare_fx(model, get_default_qconfig_mapping(BACKEND), (ctx.calib[0],))
        _calibrate(prepared, ctx.calib)
        return convert_fx(prepared)
    return ctx.once("torch.ao", make)


def build_fxq_native(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    return fxq_native(ctx)


def build_fxq_frozen(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    freeze = getattr(fxquant, "freeze", None)
    if freeze is None:
        raise NotAvailable("fxquant.freeze not in this checkout")
    return freeze(fxq_native(ctx), (example,))


def _compile(ctx: ModelCtx, backend: str, example: torch.Tensor, qmodels: list[str]) -> Fn:
    """``fxquant.compile`` on the first representation in ``qmodels`` the engine takes."""
    if not hasattr(fxquant, "compile"):
        raise NotAvailable("fxquant.compile not in this checkout")
    from fxquant.compile import EngineUnavailable, _resolve

    try:
        engine_fn = _resolve(backend)
    except ImportError as e:
        raise NotAvailable(f"engine module not in this checkout ({e})") from e
    except EngineUnavailable as e:
        raise NotAvailable(_first_line(e)) from e
    options = _thread_options(engine_fn)
    errors = []
    for rep in qmodels:
        try:
            qmodel = fxq_int(ctx) if rep == "int" else fxq_native(ctx)
            fn = fxquant.compile(qmodel, (example,), backend=backend, **options)
            ctx.cache[f"rep.{backend}"] = ("ok", rep)
            return fn
        except EngineUnavailable as e:
            raise NotAvailable(_first_line(e)) from e
        except NotAvailable as e:
            errors.append(f"{rep}: {e}")
        except Exception as e:  # noqa: BLE001 - the next representation may work
            errors.append(f"{rep}: {type(e).__name__}: {_first_line(e)}")
    raise NotAvailable("failed: " + "; ".join(errors))


def _thread_options(engine_fn: Callable) -> dict[str, Any]:
    """One thread, under whichever option name the engine function takes (if any)."""
    params = inspect.signature(engine_fn).parameters
    for name in ("num_threads", "threads", "intra_op_num_threads"):
        if name in params:
            return {name: 1}
    return {}


def build_fxq_inductor(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    return _compile(ctx, "inductor", example, ["int", "native"])


def build_fxq_ort(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    return _compile(ctx, "onnxruntime", example, ["native", "int"])


def build_fxq_openvino(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    return _compile(ctx, "openvino", example, ["native", "int"])


def _ov_fused(ctx: ModelCtx, example: torch.Tensor, key: str,
              prepared: Callable[[ModelCtx], nn.Module]) -> Fn:
    """The ``prepared`` model converted with both fusions (conv + residual add, conv + SiLU /
    hardswish) and compiled by OpenVINO (static models only)."""
    if ctx.kind != "static":
        raise NotAvailable("static models only (conv + residual add / activation fusion)")
    qmodel = ctx.once(key, lambda: fxquant.convert_fx(
        copy.deepcopy(prepared(ctx)), fuse_sums=True, fuse_activations=True))
    return fxquant.compile(qmodel, (example,), backend="openvino", threads=1)


def build_fxq_ov_fused(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    return _ov_fused(ctx, example, "fxq.native.fused", fxq_prepared)


def build_fxq_ov_sym(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    return _ov_fused(ctx, example, "fxq.native.sym", fxq_prepared_symmetric)


def _export_fp32_onnx(ctx: ModelCtx) -> str:
    def make() -> str:
        try:
            import onnx  # noqa: F401
        except ImportError as e:
            raise NotAvailable("onnx not installed") from e
        path = os.path.join(ctx.workdir, f"{ctx.name}_fp32.onnx")
        torch.onnx.export(ctx.model, (ctx.calib[0],), path, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                          opset_version=17)
        return path
    return ctx.once("onnx.fp32", make)


class _OrtRunner:
    """An onnxruntime session called like a module (torch in, torch out), one thread."""

    def __init__(self, path: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def build_ort_quantize(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    def make() -> str:
        try:
            from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                                  quantize_dynamic, quantize_static)
        except ImportError as e:
            raise NotAvailable("onnxruntime not installed") from e
        src, dst = _export_fp32_onnx(ctx), os.path.join(ctx.workdir, f"{ctx.name}_ort_int8.onnx")
        if ctx.kind == "dynamic":
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
            return dst

        class Reader(CalibrationDataReader):
            def __init__(self, data: list[torch.Tensor]) -> None:
                self.items = iter([{"x": x.numpy()} for x in data])

            def get_next(self) -> Optional[dict]:
                return next(self.items, None)

        quantize_static(src, dst, Reader(ctx.calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        return dst
    return _OrtRunner(ctx.once("ort.quantize", make))


def build_ov_nncf(ctx: ModelCtx, example: torch.Tensor) -> Fn:
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise NotAvailable(f"{e.name or 'nncf'} not installed (optional: pip install nncf)") from e

    def make() -> Any:
        ov_model = ov.convert_model(_export_fp32_onnx(ctx))
        data = nncf.Dataset(ctx.calib, lambda x: x.numpy())
        if ctx.kind == "dynamic":
            return nncf.compress_weights(ov_model)
        return nncf.quantize(ov_model, data)
    compiled = ov.Core().compile_model(ctx.once("ov.nncf", make), "CPU",
                                       {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"})
    return lambda x: torch.from_numpy(compiled(x.numpy())[0])


BUILDERS: dict[str, Callable[[ModelCtx, torch.Tensor], Fn]] = {
    "fp32": build_fp32, "torch.ao": build_torch_ao, "fxq.native": build_fxq_native,
    "fxq.frozen": build_fxq_frozen, "fxq.inductor": build_fxq_inductor, "fxq.ort": build_fxq_ort,
    "fxq.openvino": build_fxq_openvino, "fxq.ov_fused": build_fxq_ov_fused,
    "fxq.ov_sym": build_fxq_ov_sym, "ort.quantize": build_ort_quantize,
    "ov.nncf": build_ov_nncf,
}


# ------------------------------------------------------------------------------- measurement
def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _clip(text: str, limit: int = 200) -> str:
    """A reason short enough for a table line (the JSON keeps it whole)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _as_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if hasattr(out, "dequantize") and getattr(out, "is_quantized", False):
        out = out.dequantize()
    return torch.as_tensor(out).float()


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = (reference - test).norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(reference.norm() / noise))


def build_path(ctx: ModelCtx, path: str, example: torch.Tensor) -> tuple[Optional[Fn], str, float]:
    """(callable, "" or the n/a reason, seconds spent building). The callable is run once on
    ``example`` here, so a path that builds but cannot run is n/a too."""
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            fn = BUILDERS[path](ctx, example)
            fn(example)
        return fn, "", time.perf_counter() - t0
    except NotAvailable as e:
        return None, str(e), time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - any failure is a reported n/a, never a crash
        if os.environ.get("FXQ_BENCH_TRACEBACK"):
            traceback.print_exc()
        return None, f"failed: {type(e).__name__}: {_first_line(e)}", time.perf_counter() - t0


def time_interleaved(fns: dict[str, Fn], x: torch.Tensor, rounds: int, iters: int,
                     warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, process CPU s) per call of each callable; each round times every
    callable once, in turn."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        for _ in range(rounds):
            for name, fn in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    fn(x)
                wall[name].append((time.perf_counter() - w0) / iters)
                cpu[name].append((time.process_time() - c0) / iters)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def float_ops(qmodel: nn.Module, example: torch.Tensor) -> list[str]:
    """The float compute ops of fxquant's converted static graph: ``call_*`` nodes whose output,
    when the graph runs on ``example``, is a (non-quantized) floating-point tensor, other than
    dequantize itself. An int8-end-to-end model has none: its only float values are the input
    before its quantize and the output of its dequantize. Each entry names the op and the
    reason fxquant recorded for keeping it float."""
    from fxquant import report

    if not isinstance(qmodel, torch.fx.GraphModule):
        return []
    why = {r.node: f"{r.op} ({r.module_path or r.node}): {r.reason}"
           for r in report.rows(qmodel, include_qdq=True)}
    produced: dict[str, Any] = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            produced[n.name] = value = super().run_node(n)
            return value
    with torch.no_grad():
        Probe(qmodel).run(example)
    out = []
    for n in qmodel.graph.nodes:
        v = produced.get(n.name)
        if (n.op.startswith("call_") and isinstance(v, torch.Tensor) and not v.is_quantized
                and v.is_floating_point() and not _is_dequantize(n)):
            out.append(why.get(n.name, f"{n.op} {n.target} ({n.name})"))
    return out


def _is_dequantize(n: torch.fx.Node) -> bool:
    return n.target == "dequantize" or getattr(n.target, "__name__", "") == "dequantize"


# --------------------------------------------------------------------------------- one model
def _iters_for(seconds: float, target: float) -> int:
    return max(1, min(50, round(target / max(seconds, 1e-6))))


def bench_model(name: str, paths: list[str], batches: list[int], size: int, rounds: int,
                workdir: str, log: Callable[[str], None]) -> dict[str, Any]:
    spec = bench_models.MODELS[name]
    t0 = time.perf_counter()
    model = bench_models.build(name, size)
    gen = torch.Generator().manual_seed(1234)
    calib = [spec.make_input(4, size, gen) for _ in range(4)]
    ctx = ModelCtx(name, spec.kind, model, calib, workdir)
    params = sum(p.numel() for p in model.parameters())
    shape = f"{size}x{size}" if spec.kind == "static" else "tokens"
    log(f"\n== {name} ({spec.kind}, {shape}, {params / 1e6:.2f} M params)")
    result: dict[str, Any] = {"kind": spec.kind, "input": shape, "params": params, "batches": {},
                              "build_s": {}, "na": {}, "representation": {}}
    fns: dict[str, Fn] = {}
    example1 = spec.make_input(1, size, gen)
    for path in paths:
        fn, reason, secs = build_path(ctx, path, example1)
        result["build_s"][path] = round(secs, 2)
        if fn is None:
            result["na"][path] = reason
            log(f"   {path:<13} n/a ({_clip(reason)})")
        else:
            fns[path] = fn
            rep = ctx.cache.get(f"rep.{ENGINE_OF.get(path)}", (None, None))[1]
            if rep:
                result["representation"][path] = rep
            log(f"   {path:<13} ready in {secs:5.1f} s" + (f" (from the {rep} representation)"
                                                         if rep else ""))
    _count_float_ops(ctx, result, log)
    _sizes(ctx, result, log)
    for batch in batches:
        result["batches"][str(batch)] = _bench_batch(ctx, fns, batch, size, rounds, log)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    log(f"   ({result['total_s']:.0f} s for {name})")
    return result


def _count_float_ops(ctx: ModelCtx, result: dict[str, Any], log: Callable[[str], None]) -> None:
    if ctx.kind == "dynamic":  # activations are float by design: nothing to count
        result["float_ops"] = None
        return
    try:
        ops = float_ops(fxq_native(ctx), ctx.calib[0][:1])
    except Exception as e:  # noqa: BLE001
        result["float_ops"] = None
        log(f"   float ops: n/a ({_first_line(e)})")
        return
    result["float_ops"] = len(ops)
    result["float_op_list"] = ops
    result["int8_end_to_end"] = not ops
    shown = "; ".join(ops[:3]) + (" ..." if len(ops) > 3 else "")
    log(f"   float ops left in fxquant's graph: {len(ops)}" + (f" ({shown})" if ops else ""))


def _sizes(ctx: ModelCtx, result: dict[str, Any], log: Callable[[str], None]) -> None:
    """Checkpoint (state_dict) size of the float and the native int8 model."""
    from fxquant.measure import model_size_bytes

    try:
        fp32, int8 = model_size_bytes(ctx.model), model_size_bytes(fxq_native(ctx))
    except Exception as e:  # noqa: BLE001
        log(f"   size: n/a ({_first_line(e)})")
        return
    result["size_bytes"] = {"fp32": fp32, "fxq.native": int8}
    log(f"   size: fp32 {fp32 / 1e6:.2f} MB, fxquant int8 {int8 / 1e6:.2f} MB ({int8 / fp32:.2f}x)")


def _bench_batch(ctx: ModelCtx, fns: dict[str, Fn], batch: int, size: int, rounds: int,
                 log: Callable[[str], None]) -> dict[str, Any]:
    spec = bench_models.MODELS[ctx.name]
    x = spec.make_input(batch, size, torch.Generator().manual_seed(99 + batch))
    live: dict[str, Fn] = {}
    out: dict[str, Any] = {}
    with torch.no_grad():
        ref = _as_tensor(ctx.model(x))
    ys: dict[str, torch.Tensor] = {}
    for path, fn in fns.items():
        try:
            with torch.no_grad():
                y = fn(x)
        except Exception as first:  # noqa: BLE001 - a shape-specialised engine: rebuild
            fn, reason, _ = build_path(ctx, path, x)
            if fn is None:
                out[path] = {"na": f"batch {batch}: {_first_line(first)}; rebuild: {reason}"}
                continue
            with torch.no_grad():
                y = fn(x)
        live[path] = fn
        ys[path] = _as_tensor(y)
        out[path] = {"sqnr_db": round(sqnr_db(ref, ys[path]), 2)}
    if "fxq.native" in ys:  # agreement with the native model (issue 10: within one step)
        for path, y in ys.items():
            if path != "fp32":
                out[path]["vs_native_db"] = round(sqnr_db(ys["fxq.native"], y), 2)
    with torch.inference_mode():
        w0 = time.perf_counter()
        ctx.model(x)
        fp32_s = time.perf_counter() - w0
    iters = _iters_for(fp32_s, 0.15)
    times = time_interleaved(live, x, rounds, iters, warmup=max(2, iters))
    base = times.get("fp32")
    for path, (wall, cpu) in times.items():
        row = out[path]
        row.update(wall_ms=round(wall * 1e3, 3), cpu_ms=round(cpu * 1e3, 3))
        if base:
            row.update(wall_vs_fp32=round(wall / base[0], 3), cpu_vs_fp32=round(cpu / base[1], 3))
    log(f"   batch {batch}: {rounds} rounds x {iters} calls")
    for line in format_batch(out):
        log("   " + line)
    return out


# ------------------------------------------------------------------------------------ tables
def _fmt_db(x: Optional[float]) -> str:
    if x is None:
        return ""
    return "inf" if math.isinf(x) else f"{x:.1f}"


def format_batch(rows: dict[str, Any]) -> list[str]:
    """Text table of one model at one batch size: ms, ratio to fp32 and SQNR per path."""
    lines = [f"{'path':<13} {'wall ms':>9} {'cpu ms':>9} {'wall/fp32':>9} {'cpu/fp32':>9} "
             f"{'SQNR dB':>8} {'vs native':>9}"]
    for path in PATHS:
        if path not in rows:
            continue
        r = rows[path]
        if "na" in r:
            lines.append(f"{path:<13} n/a ({_clip(r['na'])})")
            continue
        ratio = (f"{r['wall_vs_fp32']:>9.2f} {r['cpu_vs_fp32']:>9.2f}" if "wall_vs_fp32" in r
                 else f"{'':>9} {'':>9}")
        sq, agree = _fmt_db(r["sqnr_db"]), _fmt_db(r.get("vs_native_db"))
        threads = "  (>1 thread)" if r["cpu_ms"] > 1.3 * r["wall_ms"] else ""
        lines.append(f"{path:<13} {r['wall_ms']:>9.2f} {r['cpu_ms']:>9.2f} {ratio} {sq:>8}"
                     f" {agree:>9}{threads}")
    return lines


def acceptance(results: dict[str, Any], batch: str = "1") -> list[dict[str, Any]]:
    """Per model at ``batch``: fxquant's fastest path vs the fastest peer (ORT / OpenVINO
    int8, own quantizers), the slowest fxquant path vs fp32, native vs torch.ao."""
    rows = []
    for name, res in results.items():
        b = res["batches"].get(batch, {})
        timed = {p: r for p, r in b.items() if "wall_ms" in r}

        def best(candidates: tuple[str, ...]) -> Optional[str]:
            have = [p for p in candidates if p in timed]
            return min(have, key=lambda p: timed[p]["wall_ms"]) if have else None
        fxq, peer = best(FXQ_PATHS), best(PEER_PATHS)
        row: dict[str, Any] = {"model": name, "kind": res["kind"], "fxq_best": fxq,
                               "peer_best": peer, "float_ops": res.get("float_ops")}
        if fxq and peer:
            row["fxq_vs_peer_wall"] = round(timed[fxq]["wall_ms"] / timed[peer]["wall_ms"], 3)
            row["fxq_vs_peer_cpu"] = round(timed[fxq]["cpu_ms"] / timed[peer]["cpu_ms"], 3)
        fxq_all = [p for p in FXQ_PATHS if p in timed and "wall_vs_fp32" in timed[p]]
        if fxq_all:
            worst = max(fxq_all, key=lambda p: timed[p]["wall_vs_fp32"])
            row["fxq_worst_vs_fp32"] = (worst, timed[worst]["wall_vs_fp32"])
            row["fxq_vs_fp32"] = {p: timed[p]["wall_vs_fp32"] for p in fxq_all}
        if "fxq.native" in timed and "torch.ao" in timed:
            row["native_vs_torch_ao"] = round(timed["fxq.native"]["wall_ms"]
                                              / timed["torch.ao"]["wall_ms"], 3)
        rows.append(row)
    return rows


def format_acceptance(rows: list[dict[str, Any]]) -> list[str]:
    head = (f"{'model':<16} {'fxq fastest':<13} {'peer fastest':<13} {'fxq/peer':>9} "
            f"{'slowest fxq path / fp32':<26} {'native/torch.ao':>15} {'float ops':>9}")
    lines = [head]
    for r in rows:
        vs_peer = f"{r['fxq_vs_peer_wall']:.2f}" if "fxq_vs_peer_wall" in r else "n/a"
        worst = (f"{r['fxq_worst_vs_fp32'][0]} {r['fxq_worst_vs_fp32'][1]:.2f}"
                 if "fxq_worst_vs_fp32" in r else "n/a")
        nat = f"{r['native_vs_torch_ao']:.2f}" if "native_vs_torch_ao" in r else "n/a"
        fo = ("dynamic" if r.get("kind") == "dynamic" else "n/a") if r["float_ops"] is None \
            else str(r["float_ops"])
        lines.append(f"{r['model']:<16} {r['fxq_best'] or 'n/a':<13} {r['peer_best'] or 'n/a':<13} "
                     f"{vs_peer:>9} {worst:<26} {nat:>15} {fo:>9}")
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The README's tables from a bench JSON: per batch, process CPU ms per call of each path
    with its ratio to fp32; then the batch-1 acceptance view."""
    results = data["models"]  # a partial JSON (a run stopped early) has only the models
    seen = {p for r in results.values() for b in r["batches"].values() for p in b} | {
        p for r in results.values() for p in r.get("na", {})}
    paths = [p for p in PATHS if p in seen]
    batches = sorted({b for r in results.values() for b in r["batches"]}, key=int)
    out = []
    for batch in batches:
        out += [f"CPU ms per call (ratio to fp32 eager), batch {batch}, 1 thread:", "",
                "| model | " + " | ".join(paths) + " |", "|---" * (len(paths) + 1) + "|"]
        for name, res in data["models"].items():
            rows, cells = res["batches"].get(batch, {}), []
            for p in paths:
                r = rows.get(p)
                cells.append("n/a" if r is None or "cpu_ms" not in r else
                             f"{r['cpu_ms']:.1f} ({r.get('cpu_vs_fp32', 1.0):.2f})")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Batch 1: fxquant's fastest path against the fastest peer int8 flow (ORT "
            "`quantize_static` / OpenVINO+NNCF), CPU-time ratio (wall-time ratio); every fxquant "
            "path against fp32; native against torch.ao; float ops left in fxquant's graph; "
            "SQNR of the native int8 model against fp32:", "",
            "| model | fxq fastest | peer fastest | fxq / peer | slowest fxq path / fp32 | "
            "native / torch.ao | float ops | SQNR dB |", "|---" * 8 + "|"]
    for r in data.get("acceptance_batch1") or acceptance(results):
        res = data["models"][r["model"]]
        b1 = res["batches"].get("1", {})

        def cpu(p: Optional[str]) -> Optional[float]:
            return b1.get(p, {}).get("cpu_ms") if p else None
        f, pe = cpu(r["fxq_best"]), cpu(r["peer_best"])
        vs = (f"{f / pe:.2f} ({r['fxq_vs_peer_wall']:.2f})" if f and pe else "n/a")
        slow = [(b1[p]["cpu_vs_fp32"], p) for p in FXQ_PATHS if "cpu_vs_fp32" in b1.get(p, {})]
        worst = f"{max(slow)[0]:.2f} ({max(slow)[1]})" if slow else "n/a"
        nat = (f"{cpu('fxq.native') / cpu('torch.ao'):.2f}"
               if cpu("fxq.native") and cpu("torch.ao") else "n/a")
        fo = "dynamic" if res["kind"] == "dynamic" else str(res.get("float_ops"))
        sq = _fmt_db(b1.get("fxq.native", {}).get("sqnr_db"))
        out.append(f"| {r['model']} | {r['fxq_best'] or 'n/a'} | {r['peer_best'] or 'n/a'} | "
                   f"{vs} | {worst} | {nat} | {fo} | {sq} |")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "quantized_engine": BACKEND}


# -------------------------------------------------------------------------------------- main
def run(models: list[str], paths: list[str], batches: list[int], size: int, rounds: int,
        json_path: Optional[str], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark ``models`` on ``paths``; print progress and tables through ``log``; return
    (and write to ``json_path`` unless None) the results."""
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice lines
    torch.backends.quantized.engine = BACKEND
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fxq_bench_") as workdir:
        for name in models:
            results[name] = bench_model(name, paths, batches, size, rounds, workdir, log)
            if json_path:  # a long run stopped early still leaves the models it finished
                _write_json(json_path, {"partial": True, "machine": machine(),
                                        "models": results})
    acc = acceptance(results)
    log("\n== batch 1, 1 thread: fxquant's fastest path vs the fastest peer (wall-time ratio; "
        "<= 1.00 means fxquant is as fast or faster)")
    for line in format_acceptance(acc):
        log(line)
    e2e = [n for n, r in results.items() if r.get("int8_end_to_end")]
    static = [n for n, r in results.items() if r["kind"] == "static"]
    log(f"\nint8 end to end (no float compute op between input quantize and output dequantize): "
        f"{len(e2e)} of {len(static)} static models" + (f" ({', '.join(e2e)})" if e2e else ""))
    data = {"machine": machine(), "config": {"models": models, "paths": paths, "batches": batches,
                                             "size": size, "rounds": rounds},
            "models": results, "acceptance_batch1": acc,
            "int8_end_to_end": {"models": e2e, "of_static": len(static)},
            "total_s": round(time.perf_counter() - t0, 1)}
    if json_path:
        _write_json(json_path, data)
        log(f"\nJSON: {json_path} ({data['total_s']:.0f} s in all)")
    return data


def _write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK_MODELS)}; 112x112; batch 1; 3 rounds")
    parser.add_argument("--models", help="comma-separated, from: " + ", ".join(bench_models.MODELS))
    parser.add_argument("--paths", help="comma-separated, from: " + ", ".join(PATHS))
    parser.add_argument("--size", default=None,
                        help="CNN input side: full (224, default), small (112) or a number")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,8)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--json", default="out/bench.json", help="'' to write none")
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the README's tables from a bench JSON and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    models = (args.models.split(",") if args.models
              else list(QUICK_MODELS) if args.quick else list(bench_models.MODELS))
    paths = args.paths.split(",") if args.paths else list(PATHS)
    for name in models:
        if name not in bench_models.MODELS:
            parser.error(f"unknown model {name!r}; known: {', '.join(bench_models.MODELS)}")
    for p in paths:
        if p not in BUILDERS:
            parser.error(f"unknown path {p!r}; known: {', '.join(PATHS)}")
    if "fp32" not in paths:
        paths.insert(0, "fp32")  # every ratio is against it
    size_arg = args.size or ("small" if args.quick else "full")
    size = bench_models.SIZES[size_arg] if size_arg in bench_models.SIZES else int(size_arg)
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else [1] if args.quick else [1, 8])
    rounds = args.rounds or (3 if args.quick else 5)
    run(models, paths, batches, size, rounds, args.json or None)


if __name__ == "__main__":
    main()
