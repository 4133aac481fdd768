"""The decision record that every pass writes on the nodes, and its typed accessors.

One key, ``node.meta[META_KEY]``, holds a :class:`QNodeInfo`. Passes write it only through
:func:`record` and the small setters here; the visualizer and the report only read it. The
words a record uses (:class:`~fxquant.records.Action`, ``Role``, ``QKind``) and
:class:`~fxquant.records.Decision` live in :mod:`fxquant.records`; Decision is re-exported here.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx

from fxquant.records import Action, Decision, QKind, Role

__all__ = ["META_KEY", "Decision", "QSpec", "SharedSpec", "OutputSpec", "ValueInfo", "QNodeInfo",
           "qinfo", "qinfo_or_none", "record", "inherit", "source_line", "module_path_of"]

META_KEY = "fxquant"


@dataclass(frozen=True)
class QSpec:
    """How one tensor (an activation edge or a weight) is to be quantized.

    ``observer`` is the factory (``Observer.with_args(...)``) that measures it; ``dtype`` and
    ``qscheme`` are copied from an instance of it so that policy can reason without one.
    """

    dtype: torch.dtype
    observer: Optional[Callable[[], torch.nn.Module]] = None
    qscheme: Optional[torch.qscheme] = None
    is_dynamic: bool = False
    fixed: Optional[tuple[float, int]] = None  # (scale, zero_point) for fixed-qparams ops

    @property
    def is_quantized(self) -> bool:
        return self.dtype in (torch.quint8, torch.qint8, torch.qint32, torch.quint4x2)


@dataclass(frozen=True)
class SharedSpec:
    """The output shares the quantization parameters of input ``input_index`` (a slot key:
    ``i`` or ``(i, j)``). ``all_inputs``: every quantized input shares them too (cat)."""

    input_index: Any = 0
    all_inputs: bool = False


OutputSpec = Union[QSpec, SharedSpec, None]


@dataclass(frozen=True)
class ValueInfo:
    """What a node produced when the model ran on the example inputs."""

    kind: str  # "tensor", "tensors" (tuple/list of tensors), "other"
    dtype: Optional[torch.dtype] = None
    shape: Optional[tuple[int, ...]] = None
    python_type: str = ""
    items: Optional[tuple[tuple[int, ...], ...]] = None  # shapes of a tuple's tensors

    @property
    def is_float_tensor(self) -> bool:
        return self.kind == "tensor" and self.dtype in (torch.float32, torch.float64,
                                                        torch.float16, torch.bfloat16)


@dataclass
class QNodeInfo:
    """Everything fxquant knows and decided about one node."""

    module_path: str = ""
    role: Role = Role.OP
    original: Any = None  # the op as the user wrote it: a module class, function or method name
    source: Optional[str] = None  # "model.py:42 in forward: x = self.conv(x)"
    debug_handle: Optional[int] = None
    value: Optional["ValueInfo"] = None  # what the node produced on the example inputs
    fused_from: tuple[str, ...] = ()  # module paths / op names merged into this node by fuse
    group: Optional[int] = None  # id of a functional pattern group (add-relu, ...)
    group_root: bool = True  # False: interior node of a group, no output observation
    qconfig: Any = None
    qconfig_reason: Optional[str] = None
    has_qconfig: bool = False  # propagate_qconfig ran on this node
    input_specs: dict[int, QSpec] = field(default_factory=dict)
    weight_spec: Optional[QSpec] = None
    output_spec: OutputSpec = None
    rule: Optional[str] = None  # name of the backend rule that will lower this node
    qkind: Optional[QKind] = None  # how it is quantized
    qparams: Optional[dict[str, Any]] = None  # filled by convert: scale, zero_point, dtype
    kernel: Optional[str] = None  # filled by lower_to_backend: the kernel that runs it
    decisions: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        # records read back from a file (or built by hand) hold the words as plain text
        self.role = Role.coerce(self.role)
        self.qkind = QKind.coerce(self.qkind)

    def last(self, action: Optional[Union[Action, str]] = None) -> Optional[Decision]:
        for d in reversed(self.decisions):
            if action is None or d.action == action:
                return d
        return None

    def copy(self) -> "QNodeInfo":
        new = copy.copy(self)
        new.decisions = list(self.decisions)
        new.input_specs = dict(self.input_specs)
        return new


def qinfo_or_none(node: fx.Node) -> Optional[QNodeInfo]:
    info = node.meta.get(META_KEY)
    return info if isinstance(info, QNodeInfo) else None


def qinfo(node: fx.Node) -> QNodeInfo:
    """The node's record, created empty when absent."""
    info = node.meta.get(META_KEY)
    if not isinstance(info, QNodeInfo):
        info = QNodeInfo()
        node.meta[META_KEY] = info
    return info


def record(node: fx.Node, pass_name: str, action: Union[Action, str], reason: str,
           **detail: Any) -> Decision:
    """Append a decision to the node's record and return it."""
    d = Decision(pass_name, action, reason, dict(detail))
    qinfo(node).decisions.append(d)
    return d


def inherit(new: fx.Node, old: fx.Node, pass_name: str = "", action: Union[Action, str] = "",
            reason: str = "") -> QNodeInfo:
    """Give ``new`` a copy of ``old``'s record (module path, source, decisions ...)."""
    info = qinfo(old).copy()
    new.meta[META_KEY] = info
    for key in ("nn_module_stack", "stack_trace"):
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    if action:
        record(new, pass_name, action, reason)
    return info


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s+(.*)')
_SKIP = ("/torch/", "/fxquant/", "/passes/", "<frozen", "/site-packages/")


def source_line(node: fx.Node) -> Optional[str]:
    """The innermost frame of the user's code in the node's stack trace, as file:line in fn: code."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = _FRAME.findall(trace)
    user = [f for f in frames if not any(s in f[0].replace("\\", "/") for s in _SKIP)]
    if not user:
        return None
    fname, line, fn, code = user[-1]
    return f"{fname.rsplit('/', 1)[-1]}:{line} in {fn}: {code.strip()}"


def module_path_of(node: fx.Node) -> str:
    """Dotted path of the module whose forward produced ``node`` ("" for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return str(last[0]) if isinstance(last, tuple) else str(last)
    return ""
