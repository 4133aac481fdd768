"""fxquant: a graph-mode (torch.fx) quantization compiler for PyTorch.

    import fxquant
    prepared = fxquant.prepare_fx(model.eval(), fxquant.get_default_qconfig_mapping("x86"),
                                  example_inputs)
    for batch in calibration_data:
        prepared(batch)
    quantized = fxquant.convert_fx(prepared)
"""
from fxquant import report
from fxquant import compare  # callable: fxquant.compare(float_model, model, inputs)
from fxquant.compare import skip_layers
from fxquant.graph import to_networkx
from fxquant.viz import visualize
from fxquant.api import (convert_fx, convert_to_reference_fx, fuse_fx, prepare_fx,
                         prepare_qat_fx, quantize_dynamic_fx)
from fxquant.errors import FxQuantError, PassFailed
from fxquant.fake_quantize import get_default_qat_qconfig, get_default_qat_qconfig_mapping
from fxquant.pipeline import Pass, PassContext, PassManager, PassResult
from fxquant.qconfig import (QConfig, QConfigMapping, get_default_qconfig,
                             get_default_qconfig_mapping)
from fxquant.serialize import load, save
from fxquant.compile import compile, register_engine  # noqa: A004
from fxquant.bias_correction import bias_correction
from fxquant.budget import quantize_with_budget
from fxquant.freeze import freeze
from fxquant import extend  # public extension API (docs/extending.md)
from fxquant.backends.onnx import export_onnx  # onnx itself is imported lazily
import fxquant.backends.integer  # noqa: E402,F401 - registers the fxquant:: q/dq ops (torch.export.load)

__all__ = [
    "prepare_fx", "convert_fx", "convert_to_reference_fx", "fuse_fx", "quantize_dynamic_fx",
    "QConfig", "QConfigMapping", "get_default_qconfig", "get_default_qconfig_mapping",
    "prepare_qat_fx", "get_default_qat_qconfig", "get_default_qat_qconfig_mapping",
    "Pass", "PassContext", "PassManager", "PassResult", "FxQuantError", "PassFailed",
]
# See every decision: fxquant.report(gm, ...) (callable module), fxquant.compare(...),
# skip_layers, visualize, to_networkx.
__all__ += ["report", "compare", "skip_layers", "visualize", "to_networkx"]
# Safe model files (tensors + JSON, no pickled code): fxquant.save(quantized, path),
# fxquant.load(float_model, path, example_inputs).
__all__ += ["save", "load"]
# Other execution engines (fxquant/compile.py): fxquant.compile(qmodel, example_inputs,
# backend="inductor" | "onnxruntime" | "openvino").
__all__ += ["compile", "register_engine"]
# Accuracy (docs/accuracy.md): fxquant.bias_correction(prepared, calib_data),
# fxquant.quantize_with_budget(model, mapping, example_inputs, calib_data, eval_fn, max_drop).
__all__ += ["bias_correction", "quantize_with_budget"]
# QDQ ONNX from fxquant's own qparams: fxquant.export_onnx(qmodel, path, example_inputs).
__all__ += ["export_onnx"]
# Frozen TorchScript of a converted model (no Python dispatch): fxquant.freeze(qmodel, example_inputs).
__all__ += ["freeze"]
__all__ += ["extend"]
__version__ = "0.1.0"
