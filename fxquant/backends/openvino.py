"""The OpenVINO engine: ``fxquant.compile(qmodel, example_inputs, backend="openvino")``.

The converted model is written as the same QDQ ONNX graph as for ONNX Runtime
(:mod:`fxquant.backends.onnx_export`, fxquant's own scales and zero points) and read by
OpenVINO's ONNX front end, which turns each QuantizeLinear/DequantizeLinear pair into the
FakeQuantize its CPU plugin runs as int8. OpenVINO (and onnx, to build the graph) are optional
(``pip install fxquant[openvino]``) and imported only here, inside the functions.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch.nn as nn

from fxquant.backends.onnx import EngineModule, Runner, _example_tuple, require
from fxquant.errors import FxQuantError

__all__ = ["compile_openvino", "OpenVINOModule", "SNIPPETS_MODES"]

# the CPU plugin's SNIPPETS_MODE: "auto" compiles with it on and off and keeps the faster
SNIPPETS_MODES = ("auto", "enable", "disable")
_TIMING_ROUNDS, _TIMING_CALLS = 5, 3


class OpenVINOModule(EngineModule):
    """A converted model compiled by OpenVINO for its CPU plugin."""

    engine = "openvino"
    # uint8 activations with zero point 128 (symmetric_activations) as int8 with zero point 0:
    # the same values, and the CPU plugin's int8 convs skip the zero-point work (EfficientNet-B0
    # ~10% faster, measured)
    int8_midpoint = True

    def __init__(self, qmodel: nn.Module, example_inputs: tuple, threads: Optional[int] = None,
                 device: str = "CPU", config: Optional[dict[str, Any]] = None,
                 bias: str = "auto", fuse_sums: bool = False, snippets: str = "auto") -> None:
        if snippets not in SNIPPETS_MODES:
            raise FxQuantError(f"openvino: unknown snippets mode {snippets!r}",
                               hint=f"use one of {list(SNIPPETS_MODES)}")
        self.snippets = snippets
        # per compiled input shape: the SNIPPETS_MODE used and, when measured, each one's ms
        self.snippets_choices: list[dict[str, Any]] = []
        self._ov = require("openvino", "openvino")
        require("onnx", "openvino")  # the graph is built with onnx
        self.device = device
        self.config = dict(config or {})
        # the CPU plugin fuses an Add into the conv before it and then skips the rounding of
        # the conv's output: keep that rounding unless the user trades it for speed
        self.round_sum_inputs = not fuse_sums
        super().__init__(qmodel, example_inputs, threads, bias)

    def _make_runner(self, model: Any) -> Runner:
        ov = self._ov
        core = ov.Core()
        ov_model = core.read_model(model.SerializeToString(), b"")  # ONNX bytes, no weights file
        # f32 where the graph is float: the CPU plugin would otherwise pick bf16/f16 on hardware
        # that has it, and fxquant's float islands must stay float.
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1, **self.config}
        if "SNIPPETS_MODE" in config or self.device != "CPU":
            compiled = core.compile_model(ov_model, self.device, config)
            self.snippets_choices.append({"mode": config.get("SNIPPETS_MODE", "default")})
        elif self.snippets != "auto":
            compiled = core.compile_model(ov_model, self.device,
                                          {**config, "SNIPPETS_MODE": self.snippets.upper()})
            self.snippets_choices.append({"mode": self.snippets.upper()})
        else:
            compiled = self._fastest(core, ov_model, config)
        request = compiled.create_infer_request()
        outputs = list(compiled.outputs)

        def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
            # inputs by index in a dict (a list costs ~60 us more per call), not copied;
            # outputs are the request's own buffers: EngineModule.forward copies them out
            result = request.infer(dict(enumerate(arrays)), share_inputs=True,
                                   share_outputs=True)
            return [np.asarray(result[o]) for o in outputs]
        run.compiled = compiled  # type: ignore[attr-defined]
        return run

    def _fastest(self, core: Any, ov_model: Any, config: dict[str, Any]) -> Any:
        """Compile with the CPU plugin's snippets (its fused elementwise subgraphs) on and off,
        time both on random inputs (interleaved, median process CPU time) and keep the faster:
        neither wins everywhere (off: ResNet-18 with fused sums 2-3% and EfficientNet-B0 13%
        faster, ResNet-18 unfused 8% and MobileNetV2 4% slower; AVX-512 VNNI + AMX machine).
        Both compute the same graph; the choice is in ``snippets_choices``."""
        import time

        compiled = {mode: core.compile_model(ov_model, self.device,
                                             {**config, "SNIPPETS_MODE": mode})
                    for mode in ("ENABLE", "DISABLE")}
        rng = np.random.default_rng(0)
        inputs = {}
        for i, port in enumerate(next(iter(compiled.values())).inputs):
            dtype = port.get_element_type().to_dtype()
            shape = list(port.get_shape())
            inputs[i] = (rng.standard_normal(shape).astype(dtype)
                         if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype))
        requests = {mode: c.create_infer_request() for mode, c in compiled.items()}
        times: dict[str, list[float]] = {mode: [] for mode in requests}
        for request in requests.values():
            request.infer(inputs)
        for _ in range(_TIMING_ROUNDS):
            for mode, request in requests.items():
                t = time.process_time()
                for _ in range(_TIMING_CALLS):
                    request.infer(inputs, share_inputs=True)
                times[mode].append((time.process_time() - t) / _TIMING_CALLS)
        ms = {mode: float(np.median(v)) * 1e3 for mode, v in times.items()}
        chosen = min(ms, key=ms.get)
        self.snippets_choices.append({"mode": chosen, "ms": ms})
        return compiled[chosen]


def compile_openvino(qmodel: nn.Module, example_inputs: tuple, *,
                     threads: Optional[int] = None, device: str = "CPU",
                     config: Optional[dict[str, Any]] = None, bias: str = "auto",
                     fuse_sums: bool = False, snippets: str = "auto") -> nn.Module:
    """``fxquant.compile(qmodel, example_inputs, backend="openvino")``: the converted model's QDQ
    ONNX graph compiled by OpenVINO.

    ``threads``: ``INFERENCE_NUM_THREADS`` (default: ``torch.get_num_threads()``); ``device``:
    the OpenVINO device ("CPU"); ``config``: more ``compile_model`` properties (they win);
    ``bias``: as for :func:`fxquant.export_onnx`, but "auto" by default here: each conv /
    linear bias in float, as fbgemm and onednn add it in the native model, unless it is a
    whole number of int32 accumulator units (input scale x weight scale; a model converted
    with ``convert_fx(..., bias="int32")``), where the int32 form is exact and faster. Rounding
    a float bias to those units moves a rounding boundary of every output by up to half a unit
    and flips outputs that sit near one: on the small test CNNs (12 seeds each, AVX-512 VNNI)
    5 of 24 cases had fewer than 99% of the logits within one native step with "int32", none
    with a float bias; at 224x224, ResNet-18 / ResNet-50 / MobileNetV2 logits within one native
    step go from 92% / 24% / 22% to 98% / 51% / 48%. OpenVINO adds a float bias as an f32
    post-op: 0-15% slower (MobileNetV2 the most); ``bias="int32"`` for that speed, or convert
    with ``bias="int32"`` and have both.
    ``fuse_sums``: let OpenVINO fuse each
    residual add into the conv / linear before it (oneDNN's sum post-op). It then skips the
    rounding of that conv's output to its uint8 grid, which the native add sees, so outputs
    are no longer within one step of the native model (76-99% of a small CNN's logits); faster
    where adds are many (ResNet-18 about 10% on an AVX-512 VNNI machine). Off by default: the
    graph repeats the exact QDQ pair on those add operands so that OpenVINO keeps the rounding.
    ``snippets``: the CPU plugin's ``SNIPPETS_MODE`` (its generated kernels for fused
    elementwise subgraphs): "auto" (default) compiles with it on and with it off, times both on
    random inputs of the compiled shape and keeps the faster (``module.snippets_choices``
    says which, with the times: compile takes about twice as long); "enable" / "disable" fix
    it. A ``SNIPPETS_MODE`` in ``config`` wins.
    """
    return OpenVINOModule(qmodel, _example_tuple(example_inputs), threads, device, config, bias,
                          fuse_sums, snippets)
