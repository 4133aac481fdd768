"""Errors that name the pass, the node, its module path, its source line and the fix."""
from __future__ import annotations

import difflib
from typing import Iterable, Optional, Sequence

import torch.fx as fx


def node_location(node: Optional[fx.Node]) -> tuple[str, str]:
    """(module path, source line) of a node, from its fxquant record or fx's own meta."""
    if node is None:
        return "", ""
    from fxquant.meta import qinfo_or_none, source_line

    info = qinfo_or_none(node)
    path = info.module_path if info is not None else ""
    src = (info.source if info is not None else None) or source_line(node) or ""
    return path, src


class FxQuantError(RuntimeError):
    """A user-facing error about one node of the graph.

    The message always says which node, which module (dotted path in the user's model), which
    source line of the user's code, and what to do about it. Errors found before there is a
    graph (about the model or the options) pass ``module_path`` / ``source`` / ``node_name``
    themselves.
    """

    def __init__(self, message: str, node: Optional[fx.Node] = None, hint: str = "",
                 pass_name: str = "", *, node_name: str = "", module_path: str = "",
                 source: str = "") -> None:
        self.node_name = node.name if node is not None else node_name
        path, src = node_location(node)
        self.module_path, self.source = path or module_path, src or source
        self.hint = hint
        self.pass_name = pass_name
        self.raw_message = message
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.raw_message]
        if self.pass_name:
            parts.append(f"  pass: {self.pass_name}")
        if self.node_name:
            parts.append(f"  node: {self.node_name}")
        if self.module_path:
            parts.append(f"  module: {self.module_path}")
        if self.source:
            parts.append(f"  source: {self.source}")
        if self.hint:
            parts.append(f"  fix: {self.hint}")
        return "\n".join(parts)


class PassFailed(FxQuantError):
    """A pass raised. Names the pass, the passes that ran before it and the node it was on."""

    def __init__(self, pass_name: str, before: Sequence[str], cause: BaseException,
                 node: Optional[fx.Node] = None) -> None:
        if node is None and isinstance(cause, FxQuantError):
            self.module_path, self.source = cause.module_path, cause.source
        hint = cause.hint if isinstance(cause, FxQuantError) else ""
        detail = cause.raw_message if isinstance(cause, FxQuantError) else f"{type(cause).__name__}: {cause}"
        self.before = tuple(before)
        self.cause = cause
        msg = (f"fxquant pass '{pass_name}' failed (after: {', '.join(before) or 'nothing'}): {detail}")
        super().__init__(msg, node, hint=hint, pass_name=pass_name)
        if node is None and isinstance(cause, FxQuantError):
            self.node_name = cause.node_name
            self.module_path, self.source = cause.module_path, cause.source
            self.args = (self._format(),)


class VerifyError(FxQuantError):
    """The graph broke an invariant between passes (fx lint, meta schema, dtype consistency)."""


# ----------------------------------------------------------------------------------------
# Bad input: what the user passed is wrong (the model, its data, the options), not fxquant.
# Each is raised at the earliest point that can name it; all are FxQuantError, so existing
# ``except FxQuantError`` keeps working. Where a builtin type was raised before (ValueError,
# TypeError), the subclass is that type too.
# ----------------------------------------------------------------------------------------


class InputError(FxQuantError):
    """Base of the bad-input errors: fix the argument named in the message."""


class ModelModeError(InputError):
    """The model (or a submodule) is in the wrong train/eval mode for the API called."""


class UnsupportedDtypeError(InputError, TypeError):
    """A parameter, buffer or example input has a floating dtype fxquant cannot quantize
    from (float16, bfloat16, float64, complex): only float32 models are supported."""


class NonFiniteParameterError(InputError, ValueError):
    """A parameter of the model holds NaN or infinity."""


class ExampleInputsError(InputError, TypeError):
    """``example_inputs`` has the wrong type or arity, or the model rejects them."""


class CalibrationDataError(InputError, ValueError):
    """Calibration (or QAT training) data an observer cannot use: NaN, infinities where the
    observer has no way to ignore them, a changing channel count, or no data at all."""


class ConfigError(InputError, ValueError):
    """A QConfigMapping / qconfig_dict / option is malformed."""


class ConfigTypeError(ConfigError, TypeError):
    """An option has the wrong type (a str where a QConfigMapping is expected, ...)."""


class UnknownNameError(ConfigError):
    """A name in the options (module_name, leaf_names, ...) matches nothing in the model."""


class FxQuantWarning(UserWarning):
    """Base of fxquant's warnings."""


class CalibrationWarning(FxQuantWarning):
    """Calibration data that works but is suspicious (e.g. infinities a histogram ignores)."""


class ConfigWarning(FxQuantWarning):
    """An option that is legal but probably not what was meant (a regex matching nothing)."""


class ModelModeWarning(FxQuantWarning):
    """A submodule's train/eval flag that the prepared model will not keep."""


class RangeWarning(FxQuantWarning):
    """An observed range that would ruin the quantized tensor (overflowing scale, a -1e4 /
    -inf mask taking the range, a range wider than the op's input): convert's range check
    (:mod:`fxquant.range_check`) names the node, module path and source line, and the fix it
    applied (or that ``range_check="warn"`` left undone)."""


class SaturationWarning(FxQuantWarning):
    """Activations whose range the backend's int8 kernels cannot add up exactly on this CPU
    (full 8-bit input to fbgemm / x86 / onednn without VNNI): the message names the nodes and
    what convert will do about it."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'a', 'b'?)`` for the closest candidates, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"


class OnnxExportError(FxQuantError):
    """A node of the converted graph has no ONNX form in fxquant's exporter
    (:func:`fxquant.export_onnx`; also importable from ``fxquant.backends.onnx``)."""
