"""The public entry points: build a pipeline from the options and run it. No graph logic here."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.errors import FxQuantError
from fxquant.meta import META_KEY, QNodeInfo
from fxquant.pipeline import Instrument, Pass, PassContext, PassManager
from fxquant.trace import TraceConfig, record_values, trace

OPTIONS_KEY = "fxquant_options"


def _example_tuple(example_inputs: Any) -> Optional[tuple[Any, ...]]:
    if example_inputs is None:
        return None
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _resolve_backend(backend: str, qconfig_mapping: Any) -> str:
    from fxquant.backends.base import get_backend
    from fxquant.qconfig import resolve_backend

    if backend == "auto" and getattr(qconfig_mapping, "backend", None):
        backend = qconfig_mapping.backend
    name = resolve_backend(backend) if backend == "auto" else backend
    return get_backend(name).name


def _run(gm: fx.GraphModule, passes: Sequence[Pass], options: dict[str, Any], *,
         dump_dir: Optional[str], instruments: Iterable[Instrument], verify: bool,
         facts: Iterable[str]) -> fx.GraphModule:
    ctx = PassContext(options=dict(options))
    pm = PassManager(passes, verify=verify, instruments=instruments, dump_dir=dump_dir,
                     initial_facts=facts)
    result = pm.run(gm, ctx)
    result.gm.meta[OPTIONS_KEY] = dict(options)
    # every pass that ever ran on this model: prepare's, then convert's
    result.gm.meta["fxquant_timings"] = {**gm.meta.get("fxquant_timings", {}), **ctx.timings}
    result.gm.meta["fxquant_stats"] = {**gm.meta.get("fxquant_stats", {}),
                                       **{k: dict(v) for k, v in ctx.stats.items()}}
    return result.gm


def _traced(model: nn.Module, example_inputs: Any, leaf_modules: Sequence[type],
            leaf_names: Sequence[str], concrete_args: Optional[dict[str, Any]]) -> fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise FxQuantError(f"expected a torch.nn.Module, got {type(model).__name__}")
    config = TraceConfig(tuple(leaf_modules), tuple(leaf_names), concrete_args)
    gm = trace(model, config)
    record_values(gm, _example_tuple(example_inputs))
    return gm


def prepare_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: Any,
               backend: str = "auto", *, leaf_modules: Sequence[type] = (),
               leaf_names: Sequence[str] = (), concrete_args: Optional[dict[str, Any]] = None,
               passes: Optional[Sequence[Pass]] = None, dump_dir: Optional[str] = None,
               instruments: Iterable[Instrument] = (), verify: bool = True) -> fx.GraphModule:
    """Trace a copy of ``model``, fuse, assign qconfigs, and insert observers.

    Run the returned GraphModule on calibration data, then call :func:`convert_fx`. The user's
    ``model`` is not modified. ``backend``: "x86", "fbgemm", "qnnpack", "onednn" or "auto"
    (the mapping's backend if it has one, else x86 on x86 CPUs and qnnpack on ARM).
    """
    from fxquant.passes import prepare_pipeline
    from fxquant.qconfig import QConfigMapping

    if isinstance(qconfig_mapping, dict):
        qconfig_mapping = QConfigMapping.from_dict(qconfig_mapping)
    name = _resolve_backend(backend, qconfig_mapping)
    gm = _traced(model, example_inputs, leaf_modules, leaf_names, concrete_args)
    options = {"qconfig_mapping": qconfig_mapping, "backend": name,
               "is_qat": False, "example_inputs": None,
               "trace_config": TraceConfig(tuple(leaf_modules), tuple(leaf_names), concrete_args)}
    gm.eval() if not model.training else gm.train()
    gm = _run(gm, passes or prepare_pipeline(), options, dump_dir=dump_dir,
              instruments=instruments, verify=verify, facts={"traced"})
    return gm


def prepare_qat_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: Any,
                   backend: str = "auto", *, leaf_modules: Sequence[type] = (),
                   leaf_names: Sequence[str] = (), concrete_args: Optional[dict[str, Any]] = None,
                   passes: Optional[Sequence[Pass]] = None, dump_dir: Optional[str] = None,
                   instruments: Iterable[Instrument] = (), verify: bool = True) -> fx.GraphModule:
    """Quantization-aware training: trace a copy of ``model`` (in training mode), fuse
    (conv-bn kept for simulated folding), assign qconfigs, insert fake-quant modules on the
    activations and swap the weighted modules for QAT modules (:mod:`fxquant.nn.qat`).

    ``qconfig_mapping`` holds fake-quant factories, e.g.
    ``fxquant.get_default_qat_qconfig_mapping("x86")``. Train the returned GraphModule, then
    call :func:`convert_fx` (BatchNorm is folded there). The user's ``model`` is not modified.
    """
    from fxquant.fake_quantize import qat_observer_wrapper
    from fxquant.passes import prepare_qat_pipeline
    from fxquant.passes.swap_qat_modules import qat_backend
    from fxquant.qconfig import QConfigMapping

    if not model.training:
        raise FxQuantError("prepare_qat_fx needs a model in training mode, got one in eval mode",
                           hint="call model.train() first; for post-training quantization of an "
                                "eval-mode model use prepare_fx")
    if isinstance(qconfig_mapping, dict):
        qconfig_mapping = QConfigMapping.from_dict(qconfig_mapping)
    name = _resolve_backend(backend, qconfig_mapping)
    gm = _traced(model, example_inputs, leaf_modules, leaf_names, concrete_args)
    options = {"qconfig_mapping": qconfig_mapping, "backend": qat_backend(name), "is_qat": True,
               "example_inputs": None, "observer_factory_wrapper": qat_observer_wrapper}
    gm.train()
    gm = _run(gm, passes or prepare_qat_pipeline(), options, dump_dir=dump_dir,
              instruments=instruments, verify=verify, facts={"traced"})
    gm.meta[OPTIONS_KEY]["backend"] = name  # convert lowers with the plain backend
    return gm


def _options_of(prepared: fx.GraphModule) -> dict[str, Any]:
    opts = getattr(prepared, "meta", {}).get(OPTIONS_KEY)
    if opts is None:
        raise FxQuantError(f"{type(prepared).__name__} was not prepared by fxquant",
                           hint="call fxquant.prepare_fx (or prepare_qat_fx) first")
    return opts


def _convert(prepared: fx.GraphModule, passes: Sequence[Pass], dump_dir: Optional[str],
             instruments: Iterable[Instrument], verify: bool) -> fx.GraphModule:
    options = dict(_options_of(prepared))
    gm = copy.deepcopy(prepared)
    for node in gm.graph.nodes:  # deepcopy shares node.meta values: give the copy its own records
        if isinstance(node.meta.get(META_KEY), QNodeInfo):
            node.meta[META_KEY] = node.meta[META_KEY].copy()
    gm.eval()
    return _run(gm, passes, options, dump_dir=dump_dir, instruments=instruments,
                verify=verify, facts={"traced", "normalized", "fused", "qconfig", "annotated",
                                      "observed"})


def convert_fx(prepared: fx.GraphModule, *, passes: Optional[Sequence[Pass]] = None,
               dump_dir: Optional[str] = None, instruments: Iterable[Instrument] = (),
               verify: bool = True) -> fx.GraphModule:
    """Calibrated (or QAT-trained) prepared model → quantized GraphModule on the backend's
    kernels. The prepared model is not modified."""
    from fxquant.passes import convert_pipeline

    return _convert(prepared, passes or convert_pipeline(), dump_dir, instruments, verify)


def convert_to_reference_fx(prepared: fx.GraphModule, *, dump_dir: Optional[str] = None,
                            instruments: Iterable[Instrument] = (), verify: bool = True
                            ) -> fx.GraphModule:
    """The reference quantized graph: quantize/dequantize around float ops, weights
    quantized→dequantized. Numerically what the backend computes, readable, portable."""
    from fxquant.passes import reference_pipeline

    return _convert(prepared, reference_pipeline(), dump_dir, instruments, verify)


def fuse_fx(model: nn.Module, example_inputs: Any = None, *, leaf_modules: Sequence[type] = (),
            leaf_names: Sequence[str] = (), verify: bool = True) -> fx.GraphModule:
    """Trace and fuse only (conv-bn-relu, linear-relu, ...). In eval mode BatchNorm is folded."""
    from fxquant.passes import fuse_pipeline

    gm = _traced(model, example_inputs, leaf_modules, leaf_names, None)
    options = {"is_qat": model.training, "backend": None}
    return _run(gm, fuse_pipeline(), options, dump_dir=None, instruments=(), verify=verify,
                facts={"traced"})


_DYNAMIC_DEFAULT_TYPES: tuple[type, ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.RNNCell,
                                            nn.GRUCell)


def dynamic_qconfig_mapping(qconfig_spec: Any = None, dtype: torch.dtype = torch.qint8) -> Any:
    """The QConfigMapping that ``torch.quantization.quantize_dynamic``'s ``qconfig_spec`` means:
    None → the default module types; a set of module types; or a dict whose keys are module
    types or submodule names and whose values are qconfigs. No global qconfig: everything else
    stays float."""
    from fxquant.qconfig import QConfigMapping, default_dynamic_qconfig, float16_dynamic_qconfig

    default = {torch.qint8: default_dynamic_qconfig, torch.float16: float16_dynamic_qconfig}
    if dtype not in default:
        raise FxQuantError(f"quantize_dynamic_fx: dtype {dtype} is not supported",
                           hint="use torch.qint8 or torch.float16")
    if qconfig_spec is None:
        qconfig_spec = set(_DYNAMIC_DEFAULT_TYPES)
    if isinstance(qconfig_spec, (set, frozenset, list, tuple)):
        qconfig_spec = {t: default[dtype] for t in qconfig_spec}
    if not isinstance(qconfig_spec, dict):
        raise FxQuantError(f"qconfig_spec must be None, a set of module types or a dict, got "
                           f"{type(qconfig_spec).__name__}")
    mapping = QConfigMapping()
    for key, qconfig in qconfig_spec.items():
        if isinstance(key, str):
            mapping.set_module_name(key, qconfig)
        else:
            mapping.set_object_type(key, qconfig)
    return mapping


def quantize_dynamic_fx(model: nn.Module, qconfig_spec: Any = None, dtype: torch.dtype = torch.qint8,
                        example_inputs: Any = None, backend: str = "auto", **kwargs: Any
                        ) -> fx.GraphModule:
    """Graph-mode ``torch.quantization.quantize_dynamic``: weights of Linear / LSTM / GRU / the
    RNN cells (by default) quantized ahead of time to ``dtype`` (qint8 or float16), activations
    quantized by the kernels at run time. No calibration. ``example_inputs`` (optional) lets
    fxquant tell tensors from Python values. Embeddings take a weight-only qconfig in a dict:
    ``{nn.Embedding: float_qparams_weight_only_qconfig}``."""
    mapping = dynamic_qconfig_mapping(qconfig_spec, dtype)
    was_training = model.training
    model.eval()
    try:
        prepared = prepare_fx(model, mapping, example_inputs, backend=backend, **kwargs)
    finally:
        model.train(was_training)
    return convert_fx(prepared)
