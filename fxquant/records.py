"""The shared vocabulary of the decision records: what a pass decided (:class:`Action`), what a
node is (:class:`Role`), how it is quantized (:class:`QKind`), what it ended up as
(:class:`Status`), how far a graph has gone (:class:`Stage`), why a pattern did not match
(:class:`MatchFailure`) and which qconfig rule chose a qconfig (:class:`QConfigRule`), plus the
:class:`Decision` record itself.

Every word is a ``str``-valued enum member: it compares equal to its text, prints as its text
and is written to JSON as its text, so records saved before these enums existed load unchanged
and user code that compares with strings keeps working. Code decides on the members, never on
the wording of a reason. This module imports nothing from fxquant: every layer may use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional, TypeVar, Union

_W = TypeVar("_W", bound="Word")


class Word(str, Enum):
    """A str-valued enum member that prints, formats and serializes as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def coerce(cls: type[_W], text: Any) -> Union[_W, Any]:
        """The member whose value is ``text``; anything else unchanged (a user pass's own
        word, None)."""
        if isinstance(text, cls) or not isinstance(text, str):
            return text
        try:
            return cls(text)
        except ValueError:
            return text


class Action(Word):
    """What a pass decided about a node (``Decision.action``)."""

    # trace / fallback
    LEAF = "leaf"
    QUANTIZE_CHILDREN = "quantize_children"
    # normalize
    NORMALIZE = "normalize"
    KEEP_FUNCTIONAL = "keep_functional"
    KEEP_INPLACE = "keep_inplace"
    REMOVE_IDENTITY = "remove_identity"
    # fuse
    FUSE = "fuse"
    NOT_FUSED = "not_fused"
    # propagate_qconfig
    ASSIGN_QCONFIG = "assign_qconfig"
    ATTENTION_EXPLICIT = "attention_explicit"
    # swap_qat_modules
    SWAP_QAT = "swap_qat"
    KEEP_MODULE = "keep_module"
    # annotate
    QUANTIZE = "quantize"
    QUANTIZE_INPUTS = "quantize_inputs"
    SHARE_QPARAMS = "share_qparams"
    FIXED_QPARAMS = "fixed_qparams"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight_only"
    KEEP_FLOAT = "keep_float"
    SATURATION_RISK = "saturation_risk"
    # insert_observers
    OBSERVE = "observe"
    SHARE_OBSERVER = "share_observer"
    # convert
    DEQUANTIZE = "dequantize"
    QUANTIZE_WEIGHT = "quantize_weight"
    DEFER = "defer"
    UNSHARE = "unshare"
    RANGE_FINDING = "range_finding"
    CORRECT_BIAS = "correct_bias"
    # lower_to_backend / cleanup
    LOWER = "lower"
    KEEP_REFERENCE = "keep_reference"
    ENGINE_CHOICE = "engine_choice"
    CONTIGUOUS = "contiguous"


class Role(Word):
    """What a node is in the quantized graph (``QNodeInfo.role``)."""

    OP = "op"
    INPUT = "input"
    OUTPUT = "output"
    OBSERVER = "observer"
    QUANTIZE = "quantize"
    DEQUANTIZE = "dequantize"
    ATTR = "attr"


class QKind(Word):
    """How an op is quantized (``QNodeInfo.qkind``)."""

    STATIC = "static"  # int8 activations observed ahead of time
    DYNAMIC = "dynamic"  # weights ahead of time, activations quantized at run time
    WEIGHT_ONLY = "weight_only"  # quantized weights, float activations (embeddings)


class Status(Word):
    """What a node ended up as, for the report and the visualizer."""

    INT8 = "int8"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight_only"
    PLANNED = "to_quantize"  # prepared model: annotated for quantization, not converted yet
    REFERENCE = "reference"
    FLOAT = "float"
    OBSERVER = "observer"
    QUANTIZE = "quantize"
    DEQUANTIZE = "dequantize"


STATUSES: tuple[Status, ...] = tuple(Status)
STATUS_COLORS: dict[Status, str] = {
    Status.INT8: "#57bb8a", Status.DYNAMIC: "#6fa8dc", Status.WEIGHT_ONLY: "#b4a7d6",
    Status.PLANNED: "#b6d7a8", Status.REFERENCE: "#a2c4c9", Status.FLOAT: "#f6b26b",
    Status.OBSERVER: "#cccccc", Status.QUANTIZE: "#ffe599", Status.DEQUANTIZE: "#fff2cc",
}
STATUS_DESCRIPTIONS: dict[Status, str] = {
    Status.INT8: "int8 kernel", Status.DYNAMIC: "dynamic int8 (activations quantized at run time)",
    Status.WEIGHT_ONLY: "weight-only quantized", Status.PLANNED: "to be quantized (prepared)",
    Status.REFERENCE: "reference op (float between dequantize/quantize)",
    Status.FLOAT: "kept float", Status.OBSERVER: "observer / fake-quant",
    Status.QUANTIZE: "quantize", Status.DEQUANTIZE: "dequantize",
}


class Stage(Word):
    """How far a graph has gone through the pipeline."""

    FLOAT = "float"  # traced / fused, nothing to quantize
    PREPARED = "prepared"  # observers, or annotations only
    REFERENCE = "reference"  # q/dq around float ops
    CONVERTED = "converted"  # backend kernels


class MatchFailure(Word):
    """Why a pattern or rule did not match a node (``NoMatch.kind``)."""

    NOT_A_NODE = "not_a_node"  # the chain's input is a constant, not a node
    NOT_THIS_OP = "not_this_op"  # the node calls another op
    CHECK_FAILED = "check_failed"  # the op matches, its ``check`` refused it
    MULTIPLE_USERS = "multiple_users"  # an interior node of a chain has other users
    NO_RULE = "no_rule"  # no rule of a backend is for the node
    DECLINED = "declined"  # a rule's check or lowering declined (the reason says why)


class QConfigRule(Word):
    """Which kind of QConfigMapping rule chose a node's qconfig (lowest priority first)."""

    GLOBAL = "global"
    OBJECT_TYPE = "object_type"
    MODULE_NAME_REGEX = "module_name_regex"
    MODULE_NAME = "module_name"
    ORDER = "module_name_object_type_order"


class RuleReason(str):
    """The text of the qconfig rule that chose a qconfig ("object_type nn.Linear"), which also
    knows the :class:`QConfigRule` kind: code asks ``reason.rule``, never the wording. Equal to
    its text; read back from a file it is the plain text."""

    rule: QConfigRule

    def __new__(cls, text: str, rule: QConfigRule) -> "RuleReason":
        self = super().__new__(cls, text)
        self.rule = QConfigRule(rule)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (RuleReason, (str(self), self.rule))


def rule_of(reason: Any) -> Optional[QConfigRule]:
    """The kind of qconfig rule behind a reason (None: not from a QConfigMapping rule)."""
    return getattr(reason, "rule", None) if isinstance(reason, RuleReason) else None


# The rule annotate gives an item of a quantized tuple: it runs on the tuple op's quantized
# output as is (no backend rule of its own).
TUPLE_ITEM_RULE = "tuple_item"


@dataclass(frozen=True)
class Decision:
    """One thing a pass decided about a node, and why. ``action`` is an :class:`Action`; a
    user pass may record a word of its own, kept as it is."""

    pass_name: str
    action: Union[Action, str]
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action.coerce(self.action))

    def __str__(self) -> str:
        return f"[{self.pass_name}] {self.action}: {self.reason}"
