"""Safe model files: a quantized model as tensors and JSON, never as pickled code.

    fxquant.save(quantized, "model.fxq")
    quantized = fxquant.load(MyModel(), "model.fxq", example_inputs)  # identical outputs
    skeleton = fxquant.serialize.read_graph("model.fxq")  # records only: report / viz

Opening a pickle runs code: ``torch.load(path, weights_only=False)`` of a crafted file executes
whatever its ``__reduce__`` says, and a pickled GraphModule *is* code (torch.fx stores its
generated Python source and re-runs it). So fxquant never writes or reads one. A model file
(format ``"fxquant/1"``) is one ``torch.save`` of a dict holding only strings and tensors,
which ``torch.load(path, weights_only=True)`` reads without running anything::

    {"format": "fxquant/1", "json": "<text>",
     "tensors": {"prepared": {...}, "converted": {...}}}

``tensors["prepared"]`` is the prepared model's state (weights, observer / fake-quant
statistics) that ``convert`` started from; ``tensors["converted"]`` is the quantized model's
``state_dict``. The JSON holds the options (backend, QAT or not, the QConfigMapping, trace
options), each converted graph (node names, ops, targets and arguments as strings) with every
node's decision record (plain data), the module types, and the key/shape lists.

:func:`load` rebuilds the model the way it was made, from the user's own float model: it
traces and prepares it with the saved options, loads the prepared state, converts, and then
checks that the graph and every tensor of the result equal the saved ones (``torch.equal``),
refusing with :class:`ArtifactMismatch` otherwise. Names in the JSON (observer classes, module
types, functions, dtypes, qschemes) resolve only through fixed registries of fxquant, torch.nn,
torch.nn.functional, torch and operator names, and of the classes in the user's own model:
never ``importlib`` on a string from the file. A name outside them is refused.

A QConfigMapping whose observers or keys are not in those registries (user observer classes,
lambdas, ``with_callable_args``) is saved without its mapping (the file says why); :func:`load`
then needs ``qconfig_mapping=`` (and checks the result as always).
"""
from __future__ import annotations

import functools
import json
import operator
import os
import pickle
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.errors import FxQuantError
# _PickledMeta: pickles of prepared models made before fxquant.pickling name it here
from fxquant.pickling import _PickledMeta  # noqa: F401
from fxquant.pickling import PREPARED_STATE_KEY, qualname, target_text
from fxquant.options import OPTIONS_KEY, QuantOptions, options_of

FORMAT = "fxquant/1"
_SAVE_HINT = "write it with fxquant.save(quantized, path) or `fxquant quantize ... --out path`"


class ArtifactError(FxQuantError):
    """A model file that fxquant cannot use: the message says what it is and what to do."""


class UnsafeFileError(ArtifactError):
    """The file holds pickled Python objects: opening it would run code. Refused."""


class NotAnArtifactError(ArtifactError):
    """The file is not an fxquant model file (a state_dict, a tensor, text, ...)."""


class ArtifactMismatch(ArtifactError):
    """The file was made from another model (architecture, shapes, options) than the one given."""


class NotSaveableError(ArtifactError):
    """The model cannot be written as a safe file (it was not converted by fxquant, ...)."""


class _Unsaveable(Exception):
    """A value with no JSON form (a lambda, a user observer class): names it."""


# ---------------------------------------------------------------------------------- registries
def _torch_constants(kind: type) -> dict[str, Any]:
    return {str(v).replace("torch.", ""): v for v in vars(torch).values() if isinstance(v, kind)}


_DTYPES = _torch_constants(torch.dtype)
_QSCHEMES = _torch_constants(torch.qscheme)


@functools.lru_cache(maxsize=None)
def _library_classes() -> dict[str, type]:
    """Module and observer classes of torch.nn and fxquant, by qualified name."""
    import importlib

    spaces = [vars(nn)] + [vars(importlib.import_module(f"fxquant.{m}")) for m in _FXQUANT_MODULES]
    return {qualname(v): v for space in spaces for v in space.values()
            if isinstance(v, type) and issubclass(v, nn.Module)}


_FXQUANT_MODULES = ("observers", "fake_quantize", "nn.fused", "nn.qat", "nn.reference",
                    "nn.quantized", "nn.dynamic", "nn.embedding")  # a fixed list, not file data


@functools.lru_cache(maxsize=None)
def _functions() -> dict[str, Any]:
    """torch.nn.functional, torch and operator callables, as ``F.relu`` / ``torch.add`` /
    ``operator.add``: object types of a QConfigMapping and ops in records."""
    out: dict[str, Any] = {}
    for prefix, space in (("operator", vars(operator)), ("torch", vars(torch)),
                          ("F", vars(F))):
        for name, v in space.items():
            if callable(v) and not isinstance(v, type) and not name.startswith("__"):
                out[f"{prefix}.{name}"] = v
    return out


def _is_observer_class(cls: type) -> bool:
    from fxquant.fake_quantize import FakeQuantizeBase
    from fxquant.observers import ObserverBase

    return issubclass(cls, (ObserverBase, FakeQuantizeBase))


class _Names:
    """Name <-> object for everything a model file may name. ``model``: its classes resolve
    too (the user's own, already imported). ``user_classes``: when writing, a module class
    outside the registries (not an observer) is written by qualified name, for :func:`load` to
    find among the float model's classes."""

    def __init__(self, model: Optional[nn.Module] = None, user_classes: bool = False) -> None:
        self.classes = dict(_library_classes())
        if model is not None:
            self.classes.update({qualname(type(m)): type(m) for m in model.modules()})
        self.functions = _functions()
        self.user_classes = user_classes
        self._class_names = {id(v): k for k, v in self.classes.items()}
        self._function_names = {id(v): k for k, v in reversed(list(self.functions.items()))}

    def class_name(self, cls: type) -> Optional[str]:
        name = self._class_names.get(id(cls))
        if name is not None and self.classes[name] is cls:
            return name
        if self.user_classes and issubclass(cls, nn.Module) and not _is_observer_class(cls):
            return qualname(cls)
        return None

    def function_name(self, fn: Any) -> Optional[str]:
        name = self._function_names.get(id(fn))
        return name if name is not None and self.functions[name] is fn else None

    def resolve(self, kind: str, name: str) -> Any:
        table = {"class": self.classes, "function": self.functions, "dtype": _DTYPES,
                 "qscheme": _QSCHEMES}[kind]
        if name not in table:
            raise ArtifactError(
                f"the model file names {kind} {name!r}, which is not an fxquant, torch.nn or "
                f"torch name (nor a class of the given float model): refused, nothing is "
                f"imported from a file", hint="re-create the file with fxquant.save; a file "
                "edited by hand or by someone else cannot be trusted")
        return table[name]


# ---------------------------------------------------------------------------------- values
def _enc(v: Any, names: _Names, strict: bool = True) -> Any:
    """The JSON form of a value; ``strict``: raise :class:`_Unsaveable` where there is none,
    else write its text (``{"repr": ...}``, read back as a string)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).replace("torch.", "")}
    if isinstance(v, torch.qscheme):
        return {"qscheme": str(v).replace("torch.", "")}
    if isinstance(v, (tuple, list)):
        items = [_enc(x, names, strict) for x in v]
        return {"tuple": items} if isinstance(v, tuple) else items
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _enc(x, names, strict) for k, x in v.items()}}
    found = _enc_named(v, names, strict)
    if found is not None:
        return found
    if strict:
        raise _Unsaveable(f"{v!r}")
    return {"repr": str(v)}


def _enc_named(v: Any, names: _Names, strict: bool) -> Optional[dict[str, Any]]:
    from fxquant.observers import ObserverFactory

    if isinstance(v, type):
        name = names.class_name(v)
        return {"class": name} if name else None
    if isinstance(v, ObserverFactory):
        if v.callable_kwargs:
            raise _Unsaveable(f"{v!r} (with_callable_args)")
        return {"factory": {"class": _enc(v.cls, names, strict),
                            "kwargs": _enc(v.kwargs, names, strict)}}
    if callable(v):
        name = names.function_name(v)
        return {"function": name} if name else None
    return None


def _dec(j: Any, names: _Names) -> Any:
    if j is None or isinstance(j, (bool, int, float, str)):
        return j
    if isinstance(j, list):
        return [_dec(x, names) for x in j]
    if not isinstance(j, dict) or len(j) != 1:
        raise ArtifactError(f"malformed value in the model file: {str(j)[:80]}",
                            hint="re-create the file with fxquant.save")
    (kind, body), = j.items()
    if kind == "tuple":
        return tuple(_dec(x, names) for x in body)
    if kind == "dict":
        return {str(k): _dec(x, names) for k, x in body.items()}
    if kind == "repr":
        return str(body)
    if kind == "factory":
        from fxquant.observers import ObserverFactory

        cls, kwargs = _dec(body["class"], names), _dec(body["kwargs"], names)
        if not isinstance(cls, type) or not isinstance(kwargs, dict):
            raise ArtifactError("malformed observer factory in the model file")
        return ObserverFactory(cls, kwargs)
    if kind in ("class", "function", "dtype", "qscheme"):
        return names.resolve(kind, str(body))
    raise ArtifactError(f"unknown value kind {kind!r} in the model file",
                        hint="re-create the file with fxquant.save")


# ---------------------------------------------------------------------------------- options
def _enc_qconfig(qc: Any, names: _Names) -> Any:
    if qc is None:
        return None
    return {"activation": _enc(qc.activation, names, True),
            "weight": _enc(qc.weight, names, True)}


def _dec_qconfig(j: Any, names: _Names) -> Any:
    from fxquant.qconfig import QConfig

    if j is None:
        return None
    return QConfig(_dec(j["activation"], names), _dec(j["weight"], names))


def _enc_key(key: Any, names: _Names) -> Any:
    return {"method": key} if isinstance(key, str) else _enc(key, names, True)


def _dec_key(j: Any, names: _Names) -> Any:
    return j["method"] if isinstance(j, dict) and "method" in j else _dec(j, names)


def encode_mapping(mapping: Any, names: _Names) -> dict[str, Any]:
    """A QConfigMapping as JSON (raises :class:`_Unsaveable` naming what has no JSON form)."""
    q = lambda qc: _enc_qconfig(qc, names)  # noqa: E731
    return {
        "global": q(mapping.global_qconfig),
        "object_type": [[_enc_key(k, names), q(v)] for k, v in mapping.object_type_qconfigs.items()],
        "module_name_regex": [[k, q(v)] for k, v in mapping.module_name_regex_qconfigs.items()],
        "module_name": [[k, q(v)] for k, v in mapping.module_name_qconfigs.items()],
        "order": [[n, _enc_key(t, names), i, q(v)]
                  for (n, t, i), v in mapping.module_name_object_type_order_qconfigs.items()],
        "backend": mapping.backend}


def decode_mapping(j: dict[str, Any], names: _Names) -> Any:
    from fxquant.qconfig import QConfigMapping

    q = lambda x: _dec_qconfig(x, names)  # noqa: E731
    m = QConfigMapping().set_global(q(j["global"]))
    for k, v in j["object_type"]:
        m.set_object_type(_dec_key(k, names), q(v))
    for k, v in j["module_name_regex"]:
        m.set_module_name_regex(str(k), q(v))
    for k, v in j["module_name"]:
        m.set_module_name(str(k), q(v))
    for n, t, i, v in j["order"]:
        m.set_module_name_object_type_order(str(n), _dec_key(t, names), int(i), q(v))
    m.backend = j.get("backend")
    return m


# ---------------------------------------------------------------------------------- records
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


class _NodeRef:
    def __init__(self, name: str) -> None:
        self.name = name


def _record_types() -> dict[str, type]:
    from fxquant.meta import Decision, QNodeInfo, QSpec, SharedSpec, ValueInfo

    return {c.__name__: c for c in (Decision, QNodeInfo, QSpec, SharedSpec, ValueInfo)}


def _enc_plain(v: Any, names: _Names) -> Any:
    """Records and graph arguments: dataclasses of fxquant.meta, node references, dicts with
    any keys; what has no JSON form becomes its text."""
    import dataclasses

    if isinstance(v, _NodeRef):
        return {"node": v.name}
    if dataclasses.is_dataclass(v) and not isinstance(v, type) \
            and type(v).__name__ in _record_types():
        fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
        if "qconfig" in fields:  # a QConfig's factories may be anything: its text is enough
            fields["qconfig"] = None if fields["qconfig"] is None else str(fields["qconfig"])
        return {"record": [type(v).__name__, {k: _enc_plain(x, names) for k, x in fields.items()}]}
    if isinstance(v, dict) and not all(isinstance(k, str) for k in v):
        return {"pairs": [[_enc_plain(k, names), _enc_plain(x, names)] for k, x in v.items()]}
    if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
        items = [_enc_plain(x, names) for x in v]
        return {"tuple": items} if isinstance(v, tuple) else items
    if isinstance(v, dict):
        return {"dict": {k: _enc_plain(x, names) for k, x in v.items()}}
    try:
        return _enc(v, names, strict=True)
    except _Unsaveable:
        return {"repr": str(v)}


def _dec_plain(j: Any, names: _Names, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(j, list):
        return [_dec_plain(x, names, nodes) for x in j]
    if not isinstance(j, dict) or len(j) != 1:
        return _dec(j, names)
    (kind, body), = j.items()
    if kind == "node":
        if body not in nodes:
            raise ArtifactError(f"the model file's graph reads node {body!r} before defining it")
        return nodes[body]
    if kind == "record":
        cls = _record_types().get(body[0])
        if cls is None:
            raise ArtifactError(f"unknown record type {body[0]!r} in the model file")
        known = {f for f in getattr(cls, "__dataclass_fields__", {})}
        return cls(**{k: _dec_plain(x, names, nodes) for k, x in body[1].items() if k in known})
    if kind == "pairs":
        return {_freeze(_dec_plain(k, names, nodes)): _dec_plain(x, names, nodes) for k, x in body}
    if kind == "tuple":
        return tuple(_dec_plain(x, names, nodes) for x in body)
    if kind == "dict":
        return {str(k): _dec_plain(x, names, nodes) for k, x in body.items()}
    return _dec(j, names)


def _freeze(k: Any) -> Any:
    return tuple(_freeze(x) for x in k) if isinstance(k, list) else k


# ---------------------------------------------------------------------------------- graphs
def graph_signature(gm: fx.GraphModule) -> list[list[str]]:
    """[op, target] of every node, in order: what :func:`load` compares."""
    return [[n.op, target_text(n)] for n in gm.graph.nodes]


def _enc_graph(gm: fx.GraphModule, names: _Names) -> list[dict[str, Any]]:
    from fxquant.meta import qinfo_or_none
    from fxquant.patterns import target_name

    out = []
    for n in gm.graph.nodes:
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: _NodeRef(a.name))
        out.append({"name": n.name, "op": n.op, "target": target_text(n),
                    "label": target_name(n.target) if n.op == "call_function" else str(n.target),
                    "args": _enc_plain(args, names), "kwargs": _enc_plain(kwargs, names),
                    "record": _enc_plain(qinfo_or_none(n), names)})
    return out


_MODULE_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size",
                 "groups", "stride", "padding", "dilation")


def _enc_modules(model: nn.Module) -> dict[str, Any]:
    """Type name and shape attributes of every module (what report / viz show of them)."""
    from fxquant.status import core_module

    out, names = {}, _Names()
    for path, m in model.named_modules():
        core = core_module(m)
        attrs = {a: getattr(core, a) for a in _MODULE_ATTRS if isinstance(
            getattr(core, a, None), (int, tuple)) and not isinstance(getattr(core, a), bool)}
        out[path] = {"type": type(m).__name__, "attrs": _enc_plain(attrs, names)}
    return out


# ---------------------------------------------------------------------------------- save
def _units(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    from fxquant.fallback import units

    return list(units(model))


def _prepared_state(model: nn.Module, units: list[tuple[str, fx.GraphModule]]
                    ) -> dict[str, torch.Tensor]:
    """The whole prepared model's state: each unit's prepared state (outermost first, inner
    units replacing their part), the rest (eager modules, unchanged by convert) as it is."""
    state = dict(model.state_dict())
    for path, unit in units:
        prefix = f"{path}." if path else ""
        kept = unit.meta.get(PREPARED_STATE_KEY)
        if "convert" not in unit.meta.get("fxquant_timings", {"convert": 0}):
            raise NotSaveableError(
                f"{type(model).__name__} is prepared, not converted: a model file holds a "
                f"quantized model", hint="calibrate it, call fxquant.convert_fx and save the "
                "result (a prepared model of your own can go through torch.save / torch.load)")
        if kept is None:
            raise NotSaveableError(
                f"the converted piece {path or '(root)'!r} does not hold the state it was "
                f"converted from", hint="save a model that fxquant.convert_fx (or "
                "convert_to_reference_fx) returned, not one rebuilt or loaded another way")
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({prefix + k: v for k, v in kept.items()})
    return state


def _options_json(units: list[tuple[str, fx.GraphModule]], model: nn.Module) -> dict[str, Any]:
    from fxquant.fallback import fallback_records

    opts = options_of(units[0][1])
    assert opts is not None  # a unit has options
    config = opts.trace_config
    auto_leaves = {r.module_path for r in fallback_records(model) if r.action == "leaf"}
    out: dict[str, Any] = {
        "backend": opts.backend_name, "is_qat": bool(opts.is_qat),
        "kind": "converted" if "lower_to_backend" in units[0][1].meta.get("fxquant_timings", {})
        else "reference",
        "leaf_classes": [qualname(c) for c in getattr(config, "leaf_classes", ())],
        "leaf_names": [n for n in getattr(config, "leaf_names", ()) if n not in auto_leaves],
        "concrete_args": None, "qconfig_mapping": None, "qconfig_mapping_unsaved": None,
        "engine_choices": [list(c) for c in _engine_choices(units)],
        "convert": {"bias": opts.bias, "fuse_sums": bool(opts.fuse_sums),
                    "fuse_activations": bool(opts.fuse_activations)}}
    names = _Names(user_classes=True)
    try:
        if units[0][0] == "" and getattr(config, "concrete_args", None) is not None:
            out["concrete_args"] = _enc(config.concrete_args, names, strict=True)
        out["qconfig_mapping"] = encode_mapping(opts.qconfig_mapping, names)
    except _Unsaveable as e:
        out["qconfig_mapping_unsaved"] = f"it holds {e}, which has no safe (JSON) form"
    return out


def _split_state(state: dict[str, Any], what: str) -> tuple[dict[str, torch.Tensor],
                                                              dict[str, Any]]:
    """Tensors, and the JSON form of the other entries (a reference module's weight dtype and
    qscheme ...); anything else has no safe form."""
    tensors, values = {}, {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v.detach().cpu()
            continue
        try:
            values[k] = _enc(v, _Names(), strict=True)
        except _Unsaveable:
            raise NotSaveableError(f"the {what} state entry {k!r} holds a "
                                   f"{type(v).__name__}, which cannot be written without "
                                   f"pickling code") from None
    return tensors, values


def _refuse_rebuild_mismatch(units: list[tuple[str, fx.GraphModule]]) -> None:
    """:func:`load` rebuilds a model by preparing and converting the user's float model
    again: models changed after ``convert_fx`` in ways it does not replay are refused here,
    at save, rather than by load's exact check later with a misleading message."""
    for path, unit in units:
        where = f" (in {path!r})" if path else ""
        if any(n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "fxquant"
               for n in unit.graph.nodes):
            raise NotSaveableError(
                f"the model{where} is in the integer representation "
                "(convert_fx(..., representation='int')), which fxquant.save does not rebuild",
                hint="save it with torch.export.save(torch.export.export(model, example_inputs), "
                     "path) (docs/integer.md), or save the native model")
        if "fxquant_bias_correction" in unit.meta:
            raise NotSaveableError(
                f"the model{where} was bias-corrected after convert (fxquant.bias_correction), "
                "which fxquant.load does not replay: the loaded model would differ",
                hint="save the model's state_dict and load it into a model converted and "
                     "corrected the same way (docs/accuracy.md)")


def save(model: nn.Module, path: Any) -> str:
    """Write ``model`` (returned by :func:`fxquant.convert_fx` / ``convert_to_reference_fx`` /
    ``quantize_dynamic_fx``) to ``path`` as a safe model file: tensors and JSON, no pickled
    code. Read it back with :func:`load` (runnable, identical outputs) or :func:`read_graph`
    (its records, for report / viz). Returns the path."""
    path = os.fspath(path)
    units = _units(model)
    if not units:
        raise NotSaveableError(f"{type(model).__name__} is not a model converted by fxquant",
                               hint="save what fxquant.convert_fx returned")
    _refuse_rebuild_mismatch(units)
    prepared, prepared_values = _split_state(_prepared_state(model, units), "prepared")
    converted, converted_values = _split_state(model.state_dict(), "converted")
    tensors = {"prepared": prepared, "converted": converted}
    doc = {"format": FORMAT, "fxquant_version": _version(), "torch_version": torch.__version__,
           "class_name": type(model).__name__, "options": _options_json(units, model),
           "units": {p: _enc_graph(u, _Names()) for p, u in units},
           "modules": _enc_modules(model),
           "values": {"prepared": prepared_values, "converted": converted_values},
           "state": {k: {n: [str(t.dtype).replace("torch.", ""), list(t.shape)]
                         for n, t in v.items()} for k, v in tensors.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"format": FORMAT, "json": json.dumps(doc), "tensors": tensors}, tmp)
    os.replace(tmp, path)
    return path


def _version() -> str:
    import fxquant

    return getattr(fxquant, "__version__", "")


# ---------------------------------------------------------------------------------- read
class Artifact:
    """A model file as read: ``doc`` (the JSON) and ``tensors`` ({"prepared", "converted"})."""

    def __init__(self, path: str, doc: dict[str, Any], tensors: dict[str, dict[str, Any]]):
        self.path, self.doc, self.tensors = path, doc, tensors


def _torch_load_safely(path: str) -> Any:
    if not os.path.exists(path):
        raise ArtifactError(f"model file {path!r} not found", hint=_SAVE_HINT)
    if os.path.isdir(path):
        raise NotAnArtifactError(f"{path!r} is a directory, not a model file", hint=_SAVE_HINT)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if pickled_code(e):
            raise UnsafeFileError(
                f"{path!r} holds pickled Python objects ({_unsafe_global(e)}): opening it "
                f"would run code stored in the file, so fxquant refuses. A GraphModule saved "
                f"with torch.save is such a file (torch.fx stores the model as Python code)",
                hint=f"open only fxquant model files; {_SAVE_HINT}") from None
        raise NotAnArtifactError(f"{path!r} is not a file torch.save wrote ({e})",
                                 hint=_SAVE_HINT) from None
    except Exception as e:  # noqa: BLE001 - text, truncated or foreign files
        raise NotAnArtifactError(f"{path!r} is not a file torch.save wrote "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                                 hint=_SAVE_HINT) from None


def pickled_code(e: BaseException) -> bool:
    """Did ``torch.load(weights_only=True)`` refuse the file because it names Python objects
    (functions, classes) to call, i.e. code?"""
    return "unsupported global" in str(e).lower() or "GLOBAL " in str(e)


def _unsafe_global(e: Exception) -> str:
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"it calls {found.group(1)}" if found else "not only tensors"


def read_artifact(path: Any) -> Artifact:
    """Read a model file without running anything from it (``torch.load(weights_only=True)``
    and ``json.loads``); refuse pickles and anything else with a clear :class:`ArtifactError`."""
    path = os.fspath(path)
    data = _torch_load_safely(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = (f"a dict with keys {sorted(map(str, data))[:4]} (a state_dict?)"
                if isinstance(data, dict) else f"a {type(data).__name__}")
        raise NotAnArtifactError(f"{path!r} holds {what}, not an fxquant model file "
                                 f"(format {FORMAT!r})", hint=_SAVE_HINT)
    try:
        doc = json.loads(data["json"])
        tensors = {k: dict(data["tensors"][k]) for k in ("prepared", "converted")}
        assert doc["format"] == FORMAT and isinstance(doc["units"], dict)
    except Exception as e:  # noqa: BLE001 - malformed or hand-edited
        raise ArtifactError(f"{path!r} is a damaged fxquant model file ({type(e).__name__})",
                            hint=_SAVE_HINT) from None
    return Artifact(path, doc, tensors)


# ---------------------------------------------------------------------------------- load
def load(float_model: nn.Module, path: Any, example_inputs: Any = None, *,
         qconfig_mapping: Any = None, **prepare_kwargs: Any) -> nn.Module:
    """Rebuild the quantized model written by :func:`save` from ``float_model`` (an instance of
    the user's own float model class; its weights need not be trained: the file's are used),
    without calibration. ``example_inputs``: as for :func:`fxquant.prepare_fx` (None for a
    dynamic model saved without them). ``qconfig_mapping``: needed only when the file says its
    mapping could not be saved. ``prepare_kwargs`` (``leaf_modules``, ``leaf_names``,
    ``concrete_args``, ``fallback``) override what the file recorded.

    The result is checked against the file (graph and every tensor, exactly); a file made
    from another model or other options raises :class:`ArtifactMismatch`. A file holding
    pickled objects is refused (:class:`UnsafeFileError`) without being opened as a pickle."""
    art = read_artifact(path)
    opts = art.doc["options"]
    names = _Names(float_model, user_classes=True)
    mapping = qconfig_mapping if qconfig_mapping is not None else _saved_mapping(art, names)
    kwargs = {**_saved_trace_options(art, names, float_model), **prepare_kwargs}
    prepared = _reprepare(float_model, mapping, example_inputs, opts, kwargs, art)
    _load_prepared_state(prepared, art)
    from fxquant import api
    from fxquant.backends import engine_choice

    convert = api.convert_fx if opts["kind"] == "converted" else api.convert_to_reference_fx
    saved_choices = tuple((str(t), str(e)) for t, e in opts.get("engine_choices") or ())
    # convert's own options (files written before they were saved: the defaults)
    convert_options = {k: v for k, v in (opts.get("convert") or {}).items()
                       if k in ("bias", "fuse_sums", "fuse_activations")}
    with engine_choice.options(replay=saved_choices):  # the saved packing, not new timings
        converted = convert(prepared, **convert_options)
    check_matches(converted, art)
    return converted


def _engine_choices(units: list[tuple[str, fx.GraphModule]]) -> tuple[tuple[str, str], ...]:
    from fxquant.backends.engine_choice import saved_choices

    return saved_choices(gm for _, gm in units)


def _saved_mapping(art: Artifact, names: _Names) -> Any:
    opts = art.doc["options"]
    if opts.get("qconfig_mapping") is None:
        raise ArtifactError(
            f"{art.path!r} was saved without its QConfigMapping: "
            f"{opts.get('qconfig_mapping_unsaved') or 'unknown reason'}",
            hint="pass the mapping you quantized with: fxquant.load(model, path, example_inputs, "
                 "qconfig_mapping=mapping) (the result is checked against the file)")
    return decode_mapping(opts["qconfig_mapping"], names)


def _saved_trace_options(art: Artifact, names: _Names, model: nn.Module) -> dict[str, Any]:
    opts = art.doc["options"]
    out: dict[str, Any] = {}
    if opts.get("leaf_classes"):
        out["leaf_modules"] = [names.resolve("class", n) for n in opts["leaf_classes"]]
    if opts.get("leaf_names"):
        out["leaf_names"] = [str(n) for n in opts["leaf_names"]]
    if opts.get("concrete_args") is not None:
        out["concrete_args"] = _dec(opts["concrete_args"], names)
    return out


def _reprepare(model: nn.Module, mapping: Any, example_inputs: Any, opts: dict[str, Any],
               kwargs: dict[str, Any], art: Artifact) -> nn.Module:
    from fxquant import api

    was_training = model.training
    try:
        if opts["is_qat"]:
            return api.prepare_qat_fx(model.train(), mapping, example_inputs,
                                      backend=opts["backend"], **kwargs)
        return api.prepare_fx(model.eval(), mapping, example_inputs,
                              backend=opts["backend"], **kwargs)
    except FxQuantError as e:
        raise ArtifactMismatch(
            f"{art.path!r}: preparing the given {type(model).__name__} with the file's options "
            f"failed: {e.raw_message}", hint="pass the float model the file was made from "
            "(same class and constructor arguments) and example inputs it accepts") from e
    finally:
        model.train(was_training)


def _state(art: Artifact, which: str) -> dict[str, Any]:
    """The saved state: its tensors and its other (JSON) entries."""
    values = art.doc.get("values", {}).get(which, {})
    return {**art.tensors[which], **{k: _dec(v, _Names()) for k, v in values.items()}}


def _load_prepared_state(prepared: nn.Module, art: Artifact) -> None:
    state = _state(art, "prepared")
    mine = prepared.state_dict()
    missing = sorted(set(mine) - set(state))
    extra = sorted(set(state) - set(mine))
    if missing or extra:
        raise ArtifactMismatch(
            f"{art.path!r} was made from another model (or with other options): the given "
            f"float model, prepared, has "
            f"{len(missing)} state entries the file lacks ({_few(missing)}) and the file has "
            f"{len(extra)} it lacks ({_few(extra)})", hint=_MISMATCH_HINT)
    try:
        prepared.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactMismatch(f"{art.path!r} does not fit the given float model: "
                               f"{_first_lines(e)}", hint=_MISMATCH_HINT) from None


_MISMATCH_HINT = ("load it with the float model class (and constructor arguments) it was saved "
                  "from; to quantize a different model, run fxquant.prepare_fx / convert_fx")


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") if keys else "none"


def _first_lines(e: Exception, n: int = 3) -> str:
    return " ".join(str(e).strip().splitlines()[:n])[:400]


def check_matches(model: nn.Module, art: Artifact) -> None:
    """The rebuilt model is the saved one: same pieces, same graphs, every tensor equal."""
    units = dict((p, u) for p, u in _units(model))
    saved = art.doc["units"]
    if sorted(units) != sorted(saved):
        raise ArtifactMismatch(f"{art.path!r}: the rebuilt model's quantized pieces "
                               f"{sorted(units)} are not the saved {sorted(saved)}",
                               hint=_MISMATCH_HINT)
    for path, unit in units.items():
        _check_graph(path, graph_signature(unit), [[n["op"], n["target"]] for n in saved[path]],
                     art)
    _check_state(model.state_dict(), _state(art, "converted"), art)


def _check_graph(path: str, mine: list, theirs: list, art: Artifact) -> None:
    if mine == theirs:
        return
    i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    got = " ".join(mine[i]) if i < len(mine) else "(end)"
    want = " ".join(theirs[i]) if i < len(theirs) else "(end)"
    raise ArtifactMismatch(f"{art.path!r}: the rebuilt graph of {path or '(root)'!r} differs "
                           f"from the saved one at node {i}: {got} where the file has {want}",
                           hint=_MISMATCH_HINT)


def _check_state(mine: dict[str, Any], saved: dict[str, Any], art: Artifact) -> None:
    if set(mine) != set(saved):
        diff = sorted(set(mine) ^ set(saved))
        raise ArtifactMismatch(f"{art.path!r}: the rebuilt model's state differs from the "
                               f"saved one in its keys ({_few(diff)})", hint=_MISMATCH_HINT)
    for k, v in mine.items():
        w = saved[k]
        if isinstance(v, torch.Tensor):
            same = isinstance(w, torch.Tensor) and v.dtype == w.dtype and v.shape == w.shape \
                and torch.equal(v, w)
        else:
            same = type(v) is type(w) and v == w
        if not same:
            raise ArtifactMismatch(f"{art.path!r}: the rebuilt model's {k!r} differs from the "
                                   f"saved one", hint=_MISMATCH_HINT)


# ---------------------------------------------------------------------------------- records only
class RecordedModel(nn.Module):
    """What :func:`read_graph` returns: a model file's graph (``.graph``, an ``fx.Graph`` whose
    nodes carry the decision records), its modules as stand-ins of the same type names and
    shapes, and its tensors as buffers. Report and viz read it; it does not run."""

    def __init__(self, graph: fx.Graph, meta: dict[str, Any]) -> None:
        super().__init__()
        self.graph = graph
        self.meta = meta

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ArtifactError("a model read with fxquant.serialize.read_graph only describes the "
                            "quantized model; it does not run",
                            hint="rebuild it with fxquant.load(float_model, path, example_inputs)")


class _Stub(nn.Module):
    """A stand-in for a module of the saved model: its type name and shape attributes."""


def _stub_class(name: str, cache: dict[str, type]) -> type:
    name = name if name.isidentifier() else "Module"
    if name not in cache:
        cache[name] = type(name, (_Stub,), {"__module__": __name__})
    return cache[name]


class _Target:
    """A stand-in for a call_function target: ``target_name`` reads ``_qualified_op_name``."""

    def __init__(self, label: str, text: str) -> None:
        self._qualified_op_name = label
        self.__name__ = "".join(c if c.isalnum() else "_" for c in text.rsplit(".", 1)[-1]) or "op"
        self.text = text

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ArtifactError(f"{self.text} of a model read with read_graph does not run",
                            hint="rebuild the model with fxquant.load")

    def __repr__(self) -> str:
        return self.text


def read_graph(path: Any) -> nn.Module:
    """The saved model's graph and decision records, from the file alone (no float model,
    nothing run or imported): a :class:`RecordedModel` (or, for a model fallback prepared
    piece by piece, a stand-in root holding one per piece) for :mod:`fxquant.report` and
    :func:`fxquant.visualize`."""
    art = read_artifact(path)
    try:
        return _build_recorded(art)
    except ArtifactError:
        raise
    except (RecursionError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{art.path!r} is a damaged fxquant model file "
                            f"({type(e).__name__}: {e})", hint=_SAVE_HINT) from None


def _build_recorded(art: Artifact) -> nn.Module:
    names, cache = _Names(), {}
    root = _stub_class(str(art.doc["class_name"]), cache)()
    for path in sorted(art.doc["modules"], key=lambda p: p.count(".") if p else -1):
        if path:
            _attach(root, path, _stub(art.doc["modules"][path], cache))
    units = sorted(art.doc["units"].items(), key=lambda kv: -kv[0].count(".") if kv[0] else 1)
    options = QuantOptions(backend_name=art.doc["options"].get("backend"))
    for path, nodes in units:
        host = root.get_submodule(path) if path else root
        recorded = type(str(art.doc["class_name"]) if not path else type(host).__name__,
                        (RecordedModel,), {"__module__": __name__})(_graph(nodes, names), {
                            OPTIONS_KEY: options})
        for name, child in list(host.named_children()):
            recorded.add_module(name, child)
        if not path:
            root = recorded
        else:
            _attach(root, path, recorded)
    _add_tensors(root, art.tensors["converted"])
    return root


def _stub(info: dict[str, Any], cache: dict[str, type]) -> nn.Module:
    m = _stub_class(str(info["type"]), cache)()
    attrs = _dec_plain(info.get("attrs", {"dict": {}}), _Names(), {})
    for k, v in (attrs or {}).items():
        if k in _MODULE_ATTRS and isinstance(v, (int, tuple)):
            setattr(m, k, v)
    return m


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if not name.replace("_", "a").isalnum():
        raise ArtifactError(f"bad module path {path!r} in the model file")
    parent.add_module(name, module)


def _add_tensors(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        owner_path, _, name = key.rpartition(".")
        try:
            owner = root.get_submodule(owner_path) if owner_path else root
        except AttributeError:
            continue  # e.g. kernel qparams kept by state_dict hooks, no module of their own
        if name.isidentifier() and name not in owner._modules and not hasattr(owner, name):
            owner.register_buffer(name, t)


def _graph(nodes: list[dict[str, Any]], names: _Names) -> fx.Graph:
    from fxquant.meta import META_KEY, QNodeInfo

    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for nd in nodes:
        op = nd["op"]
        if op not in _OPS:
            raise ArtifactError(f"unknown node op {op!r} in the model file")
        target = _Target(str(nd["label"]), str(nd["target"])) if op == "call_function" \
            else _checked_target(op, str(nd["target"]))
        args = _dec_plain(nd["args"], names, env)
        kwargs = _dec_plain(nd["kwargs"], names, env)
        node = g.create_node(op, target, tuple(args), dict(kwargs), name=str(nd["name"]))
        record = _dec_plain(nd["record"], names, env)
        if isinstance(record, QNodeInfo):
            node.meta[META_KEY] = record
        env[str(nd["name"])] = node
    return g


def _checked_target(op: str, target: str) -> str:
    """Targets are module paths, attribute paths, method or argument names: nothing else."""
    parts = target.lstrip("*").split(".") if op in ("call_module", "get_attr") \
        else [target.lstrip("*")]
    if not all(p.replace("_", "a").isalnum() for p in parts):
        raise ArtifactError(f"bad {op} target {target!r} in the model file")
    return target
