"""The public entry points: build a pipeline from the options and run it. No graph logic here."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, TypedDict, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.errors import FxQuantError
from fxquant.options import OPTIONS_KEY, QuantOptions, options_of
from fxquant.pipeline import Instrument, Pass, PassContext, PassManager
from fxquant.pickling import keep_meta_when_pickled, restore_pickled_meta
from fxquant.trace import TraceConfig, record_values, trace
from fxquant.validate import eval_modes, label_observers, validate_calibrated, validate_prepare

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fxquant.backends.base import Backend


class PrepareOptions(TypedDict, total=False):
    """The keyword options of :func:`prepare_fx` and :func:`prepare_qat_fx` (see prepare_fx)."""

    leaf_modules: Sequence[type]
    leaf_names: Sequence[str]
    concrete_args: Optional[dict[str, Any]]
    passes: Optional[Sequence[Pass]]
    dump_dir: Optional[str]
    instruments: Iterable[Instrument]
    verify: bool
    fallback: bool


@dataclass(frozen=True)
class _RunSettings:
    """How a pipeline runs (not what it computes): dumps, instruments, verification."""

    dump_dir: Optional[str] = None
    instruments: tuple[Instrument, ...] = ()
    verify: bool = True

    def under(self, path: str) -> _RunSettings:
        """The same, dumping into ``path`` below the dump directory (a fallback piece's)."""
        if not self.dump_dir or not path:
            return self
        return replace(self, dump_dir=os.path.join(self.dump_dir, path))


def _example_tuple(example_inputs: Any) -> Optional[tuple[Any, ...]]:
    if example_inputs is None:
        return None
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _resolve_backend(backend: Union[str, Backend], qconfig_mapping: Any) -> Backend:
    """The one place a backend name is resolved: "auto" is the mapping's backend if it names
    one, else this CPU's default."""
    from fxquant.backends.registry import get_backend
    from fxquant.backends.names import AUTO

    if backend == AUTO and getattr(qconfig_mapping, "backend", None):
        backend = qconfig_mapping.backend
    return get_backend(backend)


def _run(gm: fx.GraphModule, passes: Sequence[Pass], options: QuantOptions, run: _RunSettings,
         facts: Iterable[str]) -> fx.GraphModule:
    ctx = PassContext(options=options)
    pm = PassManager(passes, verify=run.verify, instruments=run.instruments,
                     dump_dir=run.dump_dir, initial_facts=facts)
    result = pm.run(gm, ctx)
    label_observers(result.gm)  # so that NaN calibration data names the node it ran into
    result.gm.meta[OPTIONS_KEY] = options
    keep_meta_when_pickled(result.gm)  # torch.save drops node.meta / gm.meta otherwise
    # every pass that ever ran on this model: prepare's, then convert's
    result.gm.meta["fxquant_timings"] = {**gm.meta.get("fxquant_timings", {}), **ctx.timings}
    result.gm.meta["fxquant_stats"] = {**gm.meta.get("fxquant_stats", {}),
                                       **{k: dict(v) for k, v in ctx.stats.items()}}
    return result.gm


def _traced(model: nn.Module, example_inputs: Any, leaf_modules: Sequence[type],
            leaf_names: Sequence[str], concrete_args: Optional[dict[str, Any]]) -> fx.GraphModule:
    _check_module(model)
    config = TraceConfig(tuple(leaf_modules), tuple(leaf_names), concrete_args)
    gm = trace(model, config)
    record_values(gm, _example_tuple(example_inputs))
    return gm


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise FxQuantError(f"expected a torch.nn.Module, got {type(model).__name__}")


def _prepare(model: nn.Module, example_inputs: Any, config: TraceConfig, options: QuantOptions,
             passes: Sequence[Pass], fallback: bool, run: _RunSettings) -> nn.Module:
    """Trace (with fallback, see :mod:`fxquant.fallback`) and run ``passes`` on each piece."""
    from fxquant.fallback import Flow, prepare_model

    _check_module(model)

    def prepare_unit(gm: fx.GraphModule, values: Optional[tuple[Any, ...]],
                     unit_config: TraceConfig, path: str) -> fx.GraphModule:
        record_values(gm, values)
        return _run(gm, passes, replace(options, trace_config=unit_config), run.under(path),
                    facts={"traced"})

    flow = Flow(config, prepare_unit, options.qconfig_mapping, fallback)
    return prepare_model(model, _example_tuple(example_inputs), flow)


def _check_keywords(entry: str, kwargs: Mapping[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(PrepareOptions.__annotations__))
    if unknown:
        raise TypeError(f"{entry}() got an unexpected keyword argument {unknown[0]!r}")


def _prepare_entry(model: nn.Module, qconfig_mapping: Any, example_inputs: Any,
                   backend: Union[str, Backend], qat: bool, kw: PrepareOptions) -> nn.Module:
    """What :func:`prepare_fx` (``qat`` False) and :func:`prepare_qat_fx` (True) do: check the
    arguments, build the options once (backend resolved here), then trace and prepare."""
    from fxquant.fake_quantize import qat_observer_wrapper
    from fxquant.passes import prepare_pipeline, prepare_qat_pipeline
    from fxquant.qconfig import QConfigMapping

    _check_keywords("prepare_qat_fx" if qat else "prepare_fx", kw)
    leaves, names = kw.get("leaf_modules", ()), kw.get("leaf_names", ())
    concrete_args = kw.get("concrete_args")
    validate_prepare(model, qconfig_mapping, example_inputs, qat=qat, leaf_modules=leaves,
                     leaf_names=names, concrete_args=concrete_args)  # before any conversion
    if isinstance(qconfig_mapping, dict):
        qconfig_mapping = QConfigMapping.from_dict(qconfig_mapping)
    options = QuantOptions.build(_resolve_backend(backend, qconfig_mapping),
                                 qconfig_mapping=qconfig_mapping, is_qat=qat,
                                 observer_factory_wrapper=qat_observer_wrapper if qat else None)
    passes = kw.get("passes") or (prepare_qat_pipeline() if qat else prepare_pipeline())
    run = _RunSettings(kw.get("dump_dir"), tuple(kw.get("instruments", ())), kw.get("verify", True))
    config = TraceConfig(tuple(leaves), tuple(names), concrete_args)
    return _prepare(model, example_inputs, config, options, passes, kw.get("fallback", True), run)


def prepare_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: Any,
               backend: Union[str, Backend] = "auto", **kwargs: Unpack[PrepareOptions]
               ) -> nn.Module:
    """Trace a copy of ``model``, fuse, assign qconfigs, and insert observers.

    Run the returned model on calibration data, then call :func:`convert_fx`. The user's
    ``model`` is not modified. ``backend``: "x86", "fbgemm", "qnnpack", "onednn" or "auto"
    (the mapping's backend if it has one, else x86 on x86 CPUs and qnnpack on ARM).

    Keyword options (:class:`PrepareOptions`): ``leaf_modules`` / ``leaf_names`` (traced as
    one call), ``concrete_args`` (as for ``torch.fx.symbolic_trace``), ``passes`` (the
    pipeline, default :func:`fxquant.passes.prepare_pipeline`), ``dump_dir`` (the graph after
    each pass), ``instruments``, ``verify`` (check the graph after each pass, default True).

    ``fallback`` (default True): when torch.fx cannot trace the model, retry with the failing
    submodules as leaves and quantize their traceable submodules on their own; when the root's
    own forward fails, keep it eager and prepare each submodule (see :mod:`fxquant.fallback`).
    The result is then a copy of the user's root, not a GraphModule; what fallback did is in
    ``fxquant.fallback.fallback_records(prepared)``. ``fallback=False`` raises a
    :class:`fxquant.trace.TraceFailed` naming the submodule, source line, cause and fix.
    """
    return _prepare_entry(model, qconfig_mapping, example_inputs, backend, False, kwargs)


def prepare_qat_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: Any,
                   backend: Union[str, Backend] = "auto", **kwargs: Unpack[PrepareOptions]
                   ) -> nn.Module:
    """Quantization-aware training: trace a copy of ``model`` (in training mode), fuse
    (conv-bn kept for simulated folding), assign qconfigs, insert fake-quant modules on the
    activations and swap the weighted modules for QAT modules (:mod:`fxquant.nn.qat`).

    ``qconfig_mapping`` holds fake-quant factories, e.g.
    ``fxquant.get_default_qat_qconfig_mapping("x86")``. Train the returned GraphModule, then
    call :func:`convert_fx` (BatchNorm is folded there). The user's ``model`` is not modified.
    ``backend`` and the keyword options: as for :func:`prepare_fx` (the default pipeline is
    :func:`fxquant.passes.prepare_qat_pipeline`).
    """
    return _prepare_entry(model, qconfig_mapping, example_inputs, backend, True, kwargs)


def _options_of(prepared: fx.GraphModule) -> QuantOptions:
    opts = options_of(prepared)
    if opts is None:
        raise FxQuantError(f"{type(prepared).__name__} was not prepared by fxquant",
                           hint="call fxquant.prepare_fx (or prepare_qat_fx) first")
    return opts


BIAS_MODES = ("float", "int32")


def _convert(prepared: nn.Module, passes: Sequence[Pass], run: _RunSettings,
             range_check: str = "fix", bias: str = "float", fuse_sums: bool = False,
             fuse_activations: bool = False) -> nn.Module:
    """Convert a copy of ``prepared``: the GraphModule itself, or each prepared piece of a
    model that fallback prepared piece by piece."""
    from fxquant.fallback import PATH_KEY, convert_tree, copy_model, is_prepared

    from fxquant.range_check import check_mode

    check_mode(range_check)
    if bias not in BIAS_MODES:
        raise FxQuantError(f"convert: unknown bias mode {bias!r}",
                           hint="bias='float' (as torch.ao) or 'int32' (accumulator units)")
    restore_pickled_meta(prepared)  # records and options of a torch.save'd prepared model
    validate_calibrated(prepared)
    if not is_prepared(prepared):
        _options_of(prepared)  # raises, naming the fix

    def convert_unit(gm: fx.GraphModule) -> fx.GraphModule:
        path = gm.meta.get(PATH_KEY, "")
        gm.eval()
        options = replace(_options_of(gm), range_check=range_check, bias=bias,
                          fuse_sums=bool(fuse_sums), fuse_activations=bool(fuse_activations))
        return _run(gm, passes, options, run.under(path),
                    facts={"traced", "normalized", "fused", "qconfig", "annotated", "observed"})

    return convert_tree(copy_model(prepared), convert_unit)


def convert_fx(prepared: nn.Module, *, passes: Optional[Sequence[Pass]] = None,
               dump_dir: Optional[str] = None, instruments: Iterable[Instrument] = (),
               verify: bool = True, representation: str = "native", range_check: str = "fix",
               bias: str = "float", fuse_sums: bool = False,
               fuse_activations: bool = False) -> nn.Module:
    """Calibrated (or QAT-trained) prepared model → quantized GraphModule on the backend's
    kernels. The prepared model is not modified. A model that fallback prepared piece by piece
    is converted piece by piece (the eager parts stay as they are).

    ``representation="int"``: instead of the backend's quantized kernels, the reference graph
    on plain uint8/int8 tensors with fxquant's q/dq ops (no quantized dtypes): it runs on any
    torch build, exports with ``torch.export`` and compiles with Inductor; see docs/integer.md.

    ``range_check``: "fix" (default) checks every observed range first and fixes what would
    ruin the model (an overflowing scale, a -1e4 / -inf mask in the range: that tensor stays
    float), with a RangeWarning naming the node; "warn" only warns; "off" skips the check
    (:mod:`fxquant.range_check`, docs/calibration.md).

    ``bias``: "float" (default) keeps conv / linear biases as they are, added in float as
    torch.ao's models and fbgemm / onednn add them; "int32" rounds each bias to the int32
    accumulator units of its op (input scale x weight scale, per output channel), what ONNX
    Runtime's QLinearConv / QGemm, OpenVINO's int8 convs and integer-only runtimes add. The
    change is at most half an accumulator unit (far below an output step), and the native
    model, its reference graph and the engines then add the same bias: ONNX Runtime and
    OpenVINO agree with it within one output step on every test seed (docs/onnx.md). Static
    ops only: a dynamic op's input scale is known at run time.

    ``fuse_sums=True``: a Conv2d whose output only feeds a residual add (ResNet's and
    MobileNetV2's blocks) is computed with the add (and the ReLU after it), rounded once:
    ``quantize(relu(conv(x) + other))``, oneDNN's int8 conv with a sum post-op natively
    (:class:`fxquant.nn.conv_add.ConvAdd2d`), and what OpenVINO fuses the exported graph into
    (with it, ``compile(backend="openvino")`` runs residual CNNs as fast as OpenVINO + NNCF
    models). One rounding fewer than the default model's separate conv and add kernels, so
    the model differs from it (within a step per op); off by default. x86 backends only; the decision
    is recorded on each conv (docs/onnx.md). Such a model cannot be frozen to TorchScript, and
    natively and on ONNX Runtime it is slower than the default convert: it is for OpenVINO.

    ``fuse_activations=True``: a Conv2d whose output only feeds a SiLU or hardswish
    (EfficientNet's and MobileNetV3's blocks) is computed with it, rounded once:
    ``quantize(silu(conv(x)))``, oneDNN's int8 conv with that activation as a post-op natively
    (:class:`fxquant.nn.conv_add.ConvAct2d`), and what OpenVINO fuses the exported graph into
    (the graph OpenVINO + NNCF runs). The default model rounds the conv's output, and for SiLU
    also the sigmoid (quantized::sigmoid's fixed 1/256 grid) before quantized::mul; this one
    does not, so it differs from the default model (within a step per op). Off by default;
    x86 backends only; recorded on each conv; not freezable to TorchScript (docs/onnx.md)."""
    from fxquant.passes import convert_pipeline

    if representation not in ("native", "int"):
        raise FxQuantError(f"unknown representation '{representation}'",
                           hint="use representation='native' (quantized kernels) or 'int'")
    if representation == "int":
        if passes is not None:
            raise FxQuantError("convert_fx: pass either passes= or representation='int'",
                               hint="the int representation runs its own pipeline")
        from fxquant.passes.convert import Convert
        from fxquant.passes.cleanup import Cleanup
        from fxquant.passes.lower_to_int import LowerToInt

        passes = (Convert(), Cleanup(), LowerToInt())
    return _convert(prepared, passes or convert_pipeline(),
                    _RunSettings(dump_dir, tuple(instruments), verify), range_check, bias,
                    fuse_sums, fuse_activations)


def convert_to_reference_fx(prepared: nn.Module, *, dump_dir: Optional[str] = None,
                            instruments: Iterable[Instrument] = (), verify: bool = True,
                            range_check: str = "fix", bias: str = "float",
                            fuse_sums: bool = False, fuse_activations: bool = False
                            ) -> nn.Module:
    """The reference quantized graph: quantize/dequantize around float ops, weights
    quantized→dequantized. Numerically what the backend computes, readable, portable.
    ``range_check``, ``bias``, ``fuse_sums``, ``fuse_activations``: as for
    :func:`convert_fx`."""
    from fxquant.passes import reference_pipeline

    run = _RunSettings(dump_dir, tuple(instruments), verify)
    return _convert(prepared, reference_pipeline(), run, range_check, bias, fuse_sums,
                    fuse_activations)


def fuse_fx(model: nn.Module, example_inputs: Any = None, *, leaf_modules: Sequence[type] = (),
            leaf_names: Sequence[str] = (), verify: bool = True) -> fx.GraphModule:
    """Trace and fuse only (conv-bn-relu, linear-relu, ...). In eval mode BatchNorm is folded."""
    from fxquant.passes import fuse_pipeline

    gm = _traced(model, example_inputs, leaf_modules, leaf_names, None)
    return _run(gm, fuse_pipeline(), QuantOptions(is_qat=model.training),
                _RunSettings(verify=verify), facts={"traced"})


_DYNAMIC_DEFAULT_TYPES: tuple[type, ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.RNNCell,
                                            nn.GRUCell)


def dynamic_qconfig_mapping(qconfig_spec: Any = None, dtype: torch.dtype = torch.qint8,
                            backend: str = "auto") -> Any:
    """The QConfigMapping that ``torch.quantization.quantize_dynamic``'s ``qconfig_spec`` means:
    None → the default module types; a set of module types; or a dict whose keys are module
    types or submodule names and whose values are qconfigs. No global qconfig: everything else
    stays float. The qint8 default (None or a set) uses per-channel weights where ``backend``'s
    dynamic kernels take them (every native engine on torch 2.13), per-tensor elsewhere
    (:mod:`fxquant.backends.dynamic_defaults`); torch.ao's default is per-tensor. A dict's
    qconfigs are used as given."""
    from fxquant.backends.dynamic_defaults import dynamic_weights_per_channel
    from fxquant.qconfig import (QConfigMapping, default_dynamic_qconfig, float16_dynamic_qconfig,
                                 per_channel_dynamic_qconfig)

    default = {torch.qint8: default_dynamic_qconfig, torch.float16: float16_dynamic_qconfig}
    if dtype not in default:
        raise FxQuantError(f"quantize_dynamic_fx: dtype {dtype} is not supported",
                           hint="use torch.qint8 or torch.float16")
    note = None
    if dtype == torch.qint8 and not isinstance(qconfig_spec, dict):
        weights = dynamic_weights_per_channel(_resolve_backend(backend, None).name)
        default[dtype] = per_channel_dynamic_qconfig if weights.per_channel else default[dtype]
        note = weights.reason
    if qconfig_spec is None:
        qconfig_spec = set(_DYNAMIC_DEFAULT_TYPES)
    if isinstance(qconfig_spec, (set, frozenset, list, tuple)):
        qconfig_spec = {t: default[dtype] for t in qconfig_spec}
    if not isinstance(qconfig_spec, dict):
        raise FxQuantError(f"qconfig_spec must be None, a set of module types or a dict, got "
                           f"{type(qconfig_spec).__name__}")
    mapping = QConfigMapping()
    mapping.dynamic_weights = note
    for key, qconfig in qconfig_spec.items():
        if isinstance(key, str):
            mapping.set_module_name(key, qconfig)
        else:
            mapping.set_object_type(key, qconfig)
    return mapping


def quantize_dynamic_fx(model: nn.Module, qconfig_spec: Any = None, dtype: torch.dtype = torch.qint8,
                        example_inputs: Any = None, backend: str = "auto", **kwargs: Any
                        ) -> nn.Module:
    """Graph-mode ``torch.quantization.quantize_dynamic``: weights of Linear / LSTM / GRU / the
    RNN cells (by default) quantized ahead of time to ``dtype`` (qint8 or float16), activations
    quantized by the kernels at run time. qint8 weights are per-channel by default where the
    backend's kernels take them (:func:`dynamic_qconfig_mapping`). No calibration.
    ``example_inputs`` (optional) lets fxquant tell tensors from Python values. Embeddings take
    a weight-only qconfig in a dict: ``{nn.Embedding: float_qparams_weight_only_qconfig}``.

    Models torch.fx cannot trace are handled by fallback (``kwargs`` go to :func:`prepare_fx`,
    e.g. ``fallback=False``): every module eager ``quantize_dynamic`` would quantize is
    quantized, whether it sits in a traced graph or under an eager module. ``example_inputs``
    let fallback trace untraceable modules' traceable submodules whole (more ops fused)."""
    mapping = dynamic_qconfig_mapping(qconfig_spec, dtype, backend)
    with eval_modes(model):  # each module's own train/eval flag comes back afterwards
        prepared = prepare_fx(model, mapping, example_inputs, backend=backend, **kwargs)
    return convert_fx(prepared)
