"""ONNX export and the ONNX Runtime engine.

``export_onnx(qmodel, path, example_inputs)`` writes a converted fxquant model as a QDQ ONNX
model built from fxquant's own decisions and qparams (see :mod:`fxquant.backends.onnx_export`
for how each node is written). ``fxquant.compile(qmodel, example_inputs,
backend="onnxruntime")`` runs that model in an ONNX Runtime session behind an ``nn.Module``.

onnx and onnxruntime are optional (``pip install fxquant[onnx]``) and imported only inside the
functions here, so importing fxquant never needs them; a missing one raises
:class:`fxquant.compile.EngineUnavailable` naming the extra.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from fxquant.compile import EngineUnavailable
from fxquant.errors import FxQuantError, OnnxExportError

if TYPE_CHECKING:  # numpy and the graph builder load with the first export, not with fxquant
    import numpy as np

    from fxquant.backends.onnx_export import GraphIO

__all__ = ["export_onnx", "compile_onnxruntime", "OnnxExportError", "EngineModule"]


def require(module: str, extra: str) -> Any:
    """Import an optional engine package, or raise EngineUnavailable naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailable(f"{module} is not installed ({e})",
                                hint=f"pip install fxquant[{extra}]  (or: pip install {module})"
                                ) from e


def _check_converted(qmodel: Any) -> fx.GraphModule:
    if not isinstance(qmodel, fx.GraphModule):
        raise FxQuantError(
            f"ONNX export takes the GraphModule fxquant.convert_fx returns, got "
            f"{type(qmodel).__name__}",
            hint="a model fallback converted piece by piece (not one GraphModule) runs on the "
                 "native path only; export its converted submodules one by one")
    from fxquant.fake_quantize import FakeQuantizeBase
    from fxquant.observers import ObserverBase

    for name, mod in qmodel.named_modules():
        if isinstance(mod, (ObserverBase, FakeQuantizeBase)):
            raise FxQuantError(f"the model still holds observer '{name}': it is prepared, not "
                               "converted", module_path=name,
                               hint="call fxquant.convert_fx(prepared) and export the result")
    return qmodel


def _example_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)


def build(qmodel: nn.Module, example_inputs: Any, bias: str = "int32",
          round_sum_inputs: bool = False, int8_midpoint: bool = False) -> tuple[Any, GraphIO]:
    """(onnx ModelProto, GraphIO) of a converted model at the example inputs' shapes
    (``round_sum_inputs``: see ``Builder.sum_input``, ``int8_midpoint``: see
    ``int8_midpoint_values`` in :mod:`fxquant.backends.onnx_export`)."""
    onnx = require("onnx", "onnx")
    from fxquant.backends.onnx_export import build_model

    gm = _check_converted(qmodel)
    model, io = build_model(gm, _example_tuple(example_inputs), onnx, bias, round_sum_inputs,
                            int8_midpoint)
    meta = {"output_qparams": [None if q is None else [q.scale, q.zero_point, str(q.dtype)]
                               for q in io.output_q]}
    onnx.helper.set_model_props(model, {"fxquant": json.dumps(meta)})
    return model, io


def export_onnx(qmodel: nn.Module, path: Union[str, os.PathLike], example_inputs: Any, *,
                bias: str = "int32") -> Any:
    """Write ``qmodel`` (a :func:`fxquant.convert_fx` result) to ``path`` as a QDQ ONNX model.

    Every quantized tensor of the converted graph becomes a uint8/int8 tensor made by a
    QuantizeLinear with exactly fxquant's scale and zero point; int8 weights are initializers
    behind a DequantizeLinear (per-channel ``axis`` where fxquant quantized per channel); ops
    fxquant kept float stay float. Shapes are those of ``example_inputs`` (batch included).
    ``bias``: "int32" (scale input scale x weight scale, zero point 0: what ONNX Runtime fuses
    into QLinearConv / QGemm) or "float" (the float bias as fbgemm adds it: closer to the
    native model on deep models, but ONNX Runtime then runs the conv in float; docs/onnx.md)
    or "auto" (int32 where that is exact: a model converted with ``convert_fx(...,
    bias="int32")``, else float).
    Returns the ``onnx.ModelProto``. Raises :class:`OnnxExportError` naming the node, module
    path and source line of an op the exporter cannot write.
    """
    onnx = require("onnx", "onnx")
    model, _ = build(qmodel, example_inputs, bias)
    onnx.save(model, os.fspath(path))
    return model


# ------------------------------------------------------------------------ engine modules
Runner = Callable[[list], list]  # numpy arrays in, numpy arrays out


class EngineModule(nn.Module):
    """An ``nn.Module`` running a converted model's ONNX form on another engine: torch tensors
    in, torch tensors out (a quantized output comes back as a quantized tensor with its
    qparams, as the native model returns it).

    Shapes are static in the exported graph, so the module keeps one compiled engine per input
    shape: a call with new shapes exports the converted model again at those shapes (the
    converted model is kept for that) and compiles once more.
    """

    engine = "engine"
    round_sum_inputs = False  # True where the engine fuses an Add into a conv (OpenVINO)
    # True where the engine's int8 kernels prefer int8 with zero point 0 to uint8 with 128
    int8_midpoint = False

    def __init__(self, qmodel: nn.Module, example_inputs: tuple, threads: Optional[int],
                 bias: str = "int32") -> None:
        super().__init__()
        self.bias = bias
        self._qmodel = [qmodel]  # a list: not a submodule (no double state_dict, no .to())
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        self._runners: dict[tuple, tuple[Runner, GraphIO]] = {}
        self._example = tuple(example_inputs)
        self._runner_for(self._example)

    def _make_runner(self, model: Any) -> Runner:
        raise NotImplementedError

    def onnx_model(self, *inputs: Any) -> Any:
        """The ONNX ModelProto run for inputs of these shapes (the example inputs' if none)."""
        return build(self._qmodel[0], inputs or self._example, self.bias,
                     self.round_sum_inputs, self.int8_midpoint)[0]

    def _runner_for(self, inputs: tuple) -> tuple[Runner, GraphIO]:
        key = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in inputs)
        if key not in self._runners:
            model, io = build(self._qmodel[0], inputs, self.bias, self.round_sum_inputs,
                              self.int8_midpoint)
            self._runners[key] = (self._make_runner(model), io)
        return self._runners[key]

    def forward(self, *inputs: Any) -> Any:
        import numpy as np

        runner, io = self._runner_for(inputs)
        arrays = []
        for pos in io.input_positions:
            t = inputs[pos]
            if not isinstance(t, torch.Tensor):
                raise FxQuantError(f"{self.engine}: input {pos} must be a tensor, got "
                                   f"{type(t).__name__}")
            arrays.append(np.ascontiguousarray(t.detach().cpu().numpy()))
        outs = runner(arrays)
        leaves = []
        for kind, value in io.leaves:
            if kind == "const":
                leaves.append(value)
                continue
            t = torch.from_numpy(np.asarray(outs[value]).copy())
            q = io.output_q[value]
            leaves.append(t if q is None else _requantized(t, q))
        return pytree.tree_unflatten(leaves, io.spec)

    def extra_repr(self) -> str:
        return f"engine={self.engine}, threads={self.threads}, compiled_shapes={len(self._runners)}"


def _requantized(ints: torch.Tensor, q: Any) -> torch.Tensor:
    """A uint8/int8 engine output as the quantized tensor the native model returns."""
    return torch._make_per_tensor_quantized_tensor(ints, q.scale, q.zero_point)


class OnnxRuntimeModule(EngineModule):
    """A converted model running in an ONNX Runtime CPU session."""

    engine = "onnxruntime"

    def __init__(self, qmodel: nn.Module, example_inputs: tuple, threads: Optional[int] = None,
                 optimization: str = "all", bias: str = "int32") -> None:
        self._ort = require("onnxruntime", "onnx")
        self.optimization = optimization
        super().__init__(qmodel, example_inputs, threads, bias)

    def _make_runner(self, model: Any) -> Runner:
        ort = self._ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if self.optimization not in levels:
            raise FxQuantError(f"onnxruntime: unknown optimization {self.optimization!r}",
                               hint=f"use one of {sorted(levels)}")
        opts.graph_optimization_level = levels[self.optimization]
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
            return session.run(None, dict(zip(names, arrays)))
        run.session = session  # type: ignore[attr-defined]
        return run


def compile_onnxruntime(qmodel: nn.Module, example_inputs: tuple, *,
                        threads: Optional[int] = None, optimization: str = "all",
                        bias: str = "int32") -> nn.Module:
    """``fxquant.compile(qmodel, example_inputs, backend="onnxruntime")``: the converted model
    as a QDQ ONNX graph in an ONNX Runtime CPU session.

    ``threads``: intra-op threads (default: ``torch.get_num_threads()``, so a benchmark that
    sets torch to 1 thread gets a 1-thread session too); ``optimization``: ONNX Runtime's
    graph optimization level ("all", "extended", "basic", "none"); ``bias``: as for
    :func:`export_onnx`.
    """
    return OnnxRuntimeModule(qmodel, _example_tuple(example_inputs), threads, optimization, bias)
