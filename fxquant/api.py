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
    result.gm.meta["fxquant_timings"] = dict(ctx.timings)
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
               "is_qat": False, "example_inputs": None}
    gm.eval() if not model.training else gm.train()
    gm = _run(gm, passes or prepare_pipeline(), options, dump_dir=dump_dir,
              instruments=instruments, verify=verify, facts={"traced"})
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
