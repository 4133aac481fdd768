"""Bad input, refused at the earliest point that can name it.

The API calls these before any work is done (``validate_prepare`` at the top of prepare_fx /
prepare_qat_fx), right after prepare (``label_observers``: so that NaN calibration data names
the node it ran into) and at the top of convert (``validate_calibrated``). Each check raises a
subclass of :class:`~fxquant.errors.InputError` (an :class:`~fxquant.errors.FxQuantError`)
naming what is wrong — the submodule, the parameter, the misspelled name with the closest
ones, the observed node — and the fix. Nothing here modifies the user's model.

================================  ==========================================================
bad input                         what happens
================================  ==========================================================
prepare_fx, a module in training  ModelModeError naming the (first) module in training mode
prepare_qat_fx, model in eval     ModelModeError; eval-mode submodules: ModelModeWarning
fp16 / bf16 / fp64 / complex      UnsupportedDtypeError naming the first parameter / buffer /
                                  example input; fix: ``model.float()``
NaN / inf parameter               NonFiniteParameterError naming it
qconfig_mapping of a wrong type   ConfigTypeError naming the type and what is accepted
misspelled module_name           UnknownNameError with "did you mean"; unlike any: ConfigWarning
unknown leaf_names                UnknownNameError (with "did you mean" where one is close)
regex matching no module          ConfigWarning
example_inputs not tuple/tensor   ExampleInputsError; also too many / too few for forward
NaN / inf calibration data        CalibrationDataError from the observer, naming the node
convert without calibration       CalibrationDataError naming the unobserved nodes
================================  ==========================================================
"""
from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.errors import (ConfigTypeError, ConfigWarning, ExampleInputsError,
                            ModelModeError, ModelModeWarning, NonFiniteParameterError,
                            UnknownNameError, UnsupportedDtypeError, did_you_mean)

__all__ = ["validate_prepare", "validate_model", "validate_config", "validate_example_inputs",
           "label_observers", "validate_calibrated", "eval_modes", "describe_value"]

_MAX_LISTED = 5


# ----------------------------------------------------------------------------------------
# Entry point for prepare_fx / prepare_qat_fx
# ----------------------------------------------------------------------------------------


def validate_prepare(model: Any, qconfig_mapping: Any, example_inputs: Any, *, qat: bool,
                     leaf_modules: Sequence[type] = (), leaf_names: Sequence[str] = (),
                     concrete_args: Optional[dict[str, Any]] = None) -> None:
    """Every check prepare can make before tracing: the model's type, train/eval modes,
    dtypes and finite parameters; the mapping's type and names; the leaf options; the example
    inputs' type, dtypes and count. Raises the first problem found."""
    api = "prepare_qat_fx" if qat else "prepare_fx"
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"{api} expects a torch.nn.Module, got {type(model).__name__}",
                              hint="pass the float model (an nn.Module instance)")
    validate_config(model, qconfig_mapping, leaf_modules, leaf_names)
    validate_example_inputs(model, example_inputs, concrete_args)
    validate_model(model, qat=qat)


# ----------------------------------------------------------------------------------------
# The model: modes, dtypes, finite parameters
# ----------------------------------------------------------------------------------------


def validate_model(model: nn.Module, *, qat: bool) -> None:
    """Train/eval modes for the API, float32 parameters and buffers, finite parameters."""
    _check_modes(model, qat)
    _check_tensor_dtypes(model)
    _check_finite_parameters(model)


def _class_source(module: nn.Module) -> str:
    """``file.py:12 in class Net`` for classes of the user's code, "" for torch's own."""
    cls = type(module)
    if cls.__module__.split(".")[0] == "torch":
        return ""
    try:
        line = inspect.getsourcelines(cls)[1]
        path = inspect.getsourcefile(cls) or ""
    except (OSError, TypeError):
        return ""
    return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line} in class {cls.__name__}"


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _check_modes(model: nn.Module, qat: bool) -> None:
    if qat:
        _check_qat_modes(model)
        return
    training = [name for name, m in model.named_modules() if m.training]
    if not training:
        return
    if model.training:
        what = f"the model ({type(model).__name__}) is in training mode"
        path, source = "", _class_source(model)
    else:
        first = model.get_submodule(training[0])
        others = f" (all in training mode: {_listed(training)})" if len(training) > 1 else ""
        what = (f"submodule {training[0]!r} ({type(first).__name__}) is in training mode although "
                f"the model is in eval mode{others}")
        path, source = training[0], _class_source(first)
    raise ModelModeError(
        f"prepare_fx needs a model in eval mode: {what}. BatchNorm would calibrate on batch "
        "statistics and dropout would drop activations: the quantized model would be wrong",
        module_path=path, source=source,
        hint="call model.eval() before prepare_fx; to train with quantization use prepare_qat_fx")


def _check_qat_modes(model: nn.Module) -> None:
    if not model.training:
        raise ModelModeError(
            "prepare_qat_fx needs a model in training mode, got one in eval mode",
            source=_class_source(model),
            hint="call model.train() first; for post-training quantization of an eval-mode "
                 "model use prepare_fx")
    frozen = [name for name, m in model.named_modules() if not m.training]
    if frozen:
        warnings.warn(
            f"prepare_qat_fx: submodules {_listed(frozen)} are in eval mode but the prepared model "
            "trains every module; set their mode on the prepared model after prepare (to freeze "
            "BatchNorm statistics: fxquant.nn.qat.freeze_bn_stats(prepared))",
            ModelModeWarning, stacklevel=6)  # the user's prepare_qat_fx call


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """("parameter" | "buffer", qualified name, tensor) of everything the model holds."""
    for name, p in model.named_parameters():
        yield "parameter", name, p
    for name, b in model.named_buffers():
        if b is not None:
            yield "buffer", name, b


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _is_unsupported_float(t: torch.Tensor) -> bool:
    return t.is_complex() or (t.is_floating_point() and t.dtype != torch.float32)


def _check_tensor_dtypes(model: nn.Module) -> None:
    bad = [(kind, name, t.dtype) for kind, name, t in _named_tensors(model)
           if _is_unsupported_float(t)]
    if not bad:
        return
    kind, name, dtype = bad[0]
    dtypes = sorted({str(d).replace("torch.", "") for _, _, d in bad})
    owner = _owner(name)
    raise UnsupportedDtypeError(
        f"{kind} {name!r} is {str(dtype).replace('torch.', '')} ({len(bad)} tensors of the model "
        f"are {'/'.join(dtypes)}): fxquant quantizes float32 models only",
        module_path=owner, source=_class_source(model.get_submodule(owner)),
        hint="convert the float model first: model.float() (and float32 example inputs); "
             "for fp16 weights use quantize_dynamic_fx(model.float(), dtype=torch.float16)")


def _check_finite_parameters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedTensorMixin) or p.device.type == "meta":
            continue
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
            what = "NaN" if bool(torch.isnan(p.detach()).any()) else "infinite values"
            raise NonFiniteParameterError(
                f"parameter {name!r} holds {what}: its quantized weight would be meaningless",
                module_path=_owner(name),
                hint="load the intended weights (a checkpoint saved after a diverged step "
                     "holds NaN); check with torch.isfinite(model.get_parameter(name))")


def describe_value(value: Any) -> str:
    """``Tensor[2, 3, 8, 8] float32``, ``int 3``, ``tuple(Tensor[...], ...)``: for messages."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe_value(v) for v in value)})"
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in value.items()) + ")"
    return f"{type(value).__name__} {value!r:.40}"


# ----------------------------------------------------------------------------------------
# Example inputs: a tuple (or one tensor), float32, as many as forward takes
# ----------------------------------------------------------------------------------------


def validate_example_inputs(model: nn.Module, example_inputs: Any,
                            concrete_args: Optional[dict[str, Any]] = None) -> None:
    """``example_inputs``: None, a tensor or a tuple of forward's positional arguments, with
    float32 floating tensors and a count forward accepts."""
    if example_inputs is None:
        return
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise ExampleInputsError(
            f"example_inputs must be a tuple of forward's positional arguments (or one tensor), "
            f"got {describe_value(example_inputs)}", hint=_tuple_hint(example_inputs))
    _check_input_dtypes(example_inputs)
    if not concrete_args:
        _check_arity(model, example_inputs)


def _tuple_hint(value: Any) -> str:
    if isinstance(value, list):
        return "pass tuple(example_inputs), or (example_inputs,) if forward takes one list"
    if isinstance(value, dict):
        return "pass the arguments in forward's order as a tuple: (x, y)"
    return "wrap it: (example_input,)"


def _flat_tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _flat_tensors(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _flat_tensors(v, f"{where}[{k!r}]")


def _check_input_dtypes(example_inputs: tuple[Any, ...]) -> None:
    for where, t in _flat_tensors(example_inputs, "example_inputs"):
        if _is_unsupported_float(t):
            raise UnsupportedDtypeError(
                f"{where} is {describe_value(t)}: fxquant quantizes float32 models, and "
                "observers calibrated on another dtype would not match the float32 model",
                hint=f"pass {where}.float() (and call model.float() if the model is not float32)")


def _check_arity(model: nn.Module, example_inputs: tuple[Any, ...]) -> None:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    unbounded = any(p.kind is p.VAR_POSITIONAL for p in params)
    n = len(example_inputs)
    if len(required) <= n and (unbounded or n <= len(positional)):
        return
    names = ", ".join(p.name for p in positional) + (", *args" if unbounded else "")
    count = f"{len(required)}" + ("" if len(required) == len(positional) else f" to {len(positional)}")
    raise ExampleInputsError(
        f"{type(model).__name__}.forward({names}) takes {count} positional argument"
        f"{'' if count == '1' else 's'} but example_inputs has {n}: {describe_value(example_inputs)}",
        source=_class_source(model),
        hint="example_inputs is the tuple of positional arguments of forward: (x,) for one input")


def _value_text(node: fx.Node) -> str:
    from fxquant.meta import qinfo_or_none

    info = qinfo_or_none(node)
    value = info.value if info is not None else None
    if value is None:
        return f"'{node.name}' (not computed)"
    if value.kind == "tensor":
        return f"'{node.name}' Tensor{list(value.shape or ())} {str(value.dtype).replace('torch.', '')}"
    if value.kind == "tensors":
        shapes = ", ".join(f"Tensor{list(shape)}" for shape in value.items or ())
        return f"'{node.name}' {value.python_type}({shapes})"
    return f"'{node.name}' {value.python_type}"


def example_inputs_rejected(gm: fx.GraphModule, example_inputs: tuple[Any, ...],
                            err: BaseException) -> ExampleInputsError:
    """The error for a traced model that raised on ``example_inputs`` (while values were
    recorded): the input shapes, the node that failed (the first without a recorded value)
    with its module path, source line and the shapes it received, and torch's own message."""
    from fxquant.meta import qinfo_or_none

    failing = next((n for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"
                    and (qinfo_or_none(n) is None or qinfo_or_none(n).value is None)), None)
    cause = (str(err).strip().splitlines() or [""])[0]
    at = ""
    if failing is not None:
        args = ", ".join(_value_text(a) for a in failing.all_input_nodes) or "no tensor inputs"
        at = f" at node '{failing.name}', which got {args}"
    return ExampleInputsError(
        f"the traced model failed on example_inputs {describe_value(example_inputs)}{at}: "
        f"{type(err).__name__}: {cause}", failing,
        hint="pass example_inputs that the float model accepts: a tuple of positional "
             "arguments to forward, with the shapes forward expects")


# ----------------------------------------------------------------------------------------
# The options: the mapping's type, module names, regexes, leaf options
# ----------------------------------------------------------------------------------------


def _module_paths(model: nn.Module) -> list[str]:
    """Every dotted path of a submodule, shared submodules under each of their names."""
    return [name for name, _ in model.named_modules(remove_duplicate=False) if name]


def validate_config(model: nn.Module, qconfig_mapping: Any, leaf_modules: Sequence[type] = (),
                    leaf_names: Sequence[str] = ()) -> None:
    """The mapping is a QConfigMapping (or a qconfig_dict); each module name it or
    ``leaf_names`` gives is a submodule of ``model``: a misspelled one (a path is close to it)
    is an :class:`UnknownNameError`, one like nothing in the model only warns for the mapping
    (mappings are shared between models) and is an error in ``leaf_names``; regexes that match
    nothing warn."""
    from fxquant.qconfig import as_qconfig_mapping

    mapping = as_qconfig_mapping(qconfig_mapping)
    paths = _module_paths(model)
    known = set(paths)
    for name in mapping.module_name_qconfigs:
        _check_name(name, known, paths, model, f"QConfigMapping.set_module_name({name!r}, ...)",
                    strict=False)
    for name, _, _ in mapping.module_name_object_type_order_qconfigs:
        if name:
            _check_name(name, known, paths, model, strict=False, where=(
                f"QConfigMapping.set_module_name_object_type_order({name!r}, ...)"))
    for pattern in mapping.module_name_regex_qconfigs:
        if not any(re.match(pattern, path) for path in paths):
            warnings.warn(f"QConfigMapping.set_module_name_regex({pattern!r}, ...) matches no module "
                          f"of {type(model).__name__} (module paths look like {_listed(paths[:3])})",
                          ConfigWarning, stacklevel=4)  # the user's prepare_fx call
    _check_leaf_options(model, leaf_modules, leaf_names, known, paths)


def _check_name(name: str, known: set[str], paths: list[str], model: nn.Module, where: str,
                strict: bool = True) -> None:
    """A name that is no module path is an error when ``strict`` or when a path is close to it
    (a misspelling); otherwise a :class:`ConfigWarning` (a mapping shared by several models,
    e.g. "head" kept float wherever there is one)."""
    if name in known:
        return
    close = did_you_mean(name, paths)
    message = (f"{where} names no submodule of {type(model).__name__}{close}: the rule applies "
               "to nothing")
    if strict or close:
        raise UnknownNameError(message, module_path=name,
                               hint="use a dotted path from model.named_modules(), e.g. "
                                    + _listed(paths[:3]))
    warnings.warn(message, ConfigWarning, stacklevel=5)  # the user's prepare_fx call


def _check_leaf_options(model: nn.Module, leaf_modules: Any, leaf_names: Any, known: set[str],
                        paths: list[str]) -> None:
    if isinstance(leaf_names, str) or not isinstance(leaf_names, (list, tuple, set, frozenset)):
        raise ConfigTypeError(f"leaf_names must be a list of module paths, got {leaf_names!r:.60}",
                              hint=f"leaf_names=[{leaf_names!r:.40}]")
    if isinstance(leaf_modules, type) or not isinstance(leaf_modules, (list, tuple, set, frozenset)):
        raise ConfigTypeError(f"leaf_modules must be a list of module classes, got {leaf_modules!r:.60}",
                              hint="leaf_modules=[MyBlock]")
    for cls in leaf_modules:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigTypeError(f"leaf_modules holds {cls!r:.60}, not an nn.Module subclass",
                                  hint="list module classes (MyBlock); use leaf_names for paths")
    for name in leaf_names:
        if not isinstance(name, str):
            raise ConfigTypeError(f"leaf_names holds {name!r:.60}, not a module path string",
                                  hint="use leaf_modules for classes, leaf_names for paths")
        _check_name(name, known, paths, model, f"leaf_names entry {name!r}")


# ----------------------------------------------------------------------------------------
# After prepare: observers know their node; before convert: they saw data
# ----------------------------------------------------------------------------------------


def _is_observer(module: Any) -> bool:
    from fxquant.fake_quantize import FakeQuantizeBase
    from fxquant.observers import ObserverBase

    return isinstance(module, (ObserverBase, FakeQuantizeBase))


def _graphs(model: nn.Module) -> Iterator[tuple[str, fx.GraphModule]]:
    """(path, GraphModule) of ``model`` itself and of every GraphModule inside it (a model
    that fallback prepared piece by piece holds several)."""
    for path, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            yield path, module


def label_observers(model: nn.Module) -> int:
    """Give each observer / fake-quant module of a prepared model its
    :class:`~fxquant.observers.ObserverSite`: its path and, for the ones in a graph, the node
    it observes with that node's module path and source line, so that bad calibration data
    raises naming the node. A shared observer is labelled with its first node. Returns how
    many observers were labelled with a node."""
    from fxquant.meta import qinfo_or_none
    from fxquant.observers import ObserverSite, label_observer

    for path, module in model.named_modules(remove_duplicate=False):
        if _is_observer(module):
            label_observer(module, ObserverSite(path))  # weight fake-quant of QAT modules
    done: set[int] = set()
    for prefix, gm in _graphs(model):
        for node in gm.graph.nodes:
            module = _observer_of(gm, node)
            if module is None or id(module) in done or not isinstance(node.args[0], fx.Node):
                continue
            value = node.args[0]
            info = qinfo_or_none(value)
            path = info.module_path if info is not None else ""
            source = (info.source if info is not None else "") or ""
            target = f"{prefix}.{node.target}" if prefix else str(node.target)
            label_observer(module, ObserverSite(target, value.name, path, source))
            done.add(id(module))
    return len(done)


def _observer_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module" or not node.args:
        return None
    try:
        module = gm.get_submodule(str(node.target))
    except AttributeError:
        return None
    return module if _is_observer(module) else None


def _saw_no_data(module: nn.Module) -> bool:
    from fxquant.backends.reference_ops import INTEGER_DTYPES

    if getattr(module, "dtype", None) not in INTEGER_DTYPES or getattr(module, "is_dynamic", False):
        return False
    min_val = getattr(module, "min_val", None)
    if not isinstance(min_val, torch.Tensor):
        return False  # fixed qparams: nothing to see
    return min_val.numel() == 0 or bool(torch.isinf(min_val).all())


def validate_calibrated(prepared: nn.Module) -> None:
    """Before convert: every observer of an integer dtype in the graph saw data. Raises
    :class:`~fxquant.errors.CalibrationDataError` naming the observed nodes otherwise
    (converting would quantize them with scale 1.0 and zero point 0)."""
    from fxquant.errors import CalibrationDataError

    if not isinstance(prepared, nn.Module):
        return  # convert names what it needs itself
    observers = [(node, m) for _, gm in _graphs(prepared) for node in gm.graph.nodes
                 if (m := _observer_of(gm, node)) is not None]
    missing = [node for node, m in observers if _saw_no_data(m)]
    if not missing:
        return
    nodes = [n.args[0].name if isinstance(n.args[0], fx.Node) else n.name for n in missing]
    what = (f"the prepared model was not calibrated: none of its {len(observers)} observers saw "
            "data" if len(missing) == len(observers) else
            f"{len(missing)} of {len(observers)} observers saw no data (their values were never "
            "computed, or only as empty tensors)")
    first = missing[0].args[0] if isinstance(missing[0].args[0], fx.Node) else missing[0]
    raise CalibrationDataError(
        f"convert: {what}; unobserved nodes: {_listed(nodes)}", first,
        hint="run the prepared model on representative inputs (prepared(batch) for each "
             "calibration batch) before convert_fx; QAT: train it first")


# ----------------------------------------------------------------------------------------
# quantize_dynamic_fx: eval mode for the duration, every module's own flag restored
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode for the ``with`` block, then give each its
    own train/eval flag back (``model.train(was_training)`` would overwrite mixed modes)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training

