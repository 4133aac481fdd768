"""Backend tables: which ops a backend quantizes, how their qparams are chosen, and how the
reference (q/dq + float op) pattern of each is lowered to the backend's kernel.

A backend is data: a name, the torch engine that runs it, and an ordered tuple of
:class:`Rule`. A new backend, or a new fused kernel, is a table entry plus a lowering
function; the passes never change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.patterns import NoMatch, Op

# qparams policies
WEIGHTED = "weighted"  # activation input + quantized weight + own output qparams
OWN = "own"  # quantized inputs, own output qparams (add, cat with different inputs, ...)
SHARED = "shared"  # output shares the input's qparams (pooling, reshape, relu ...)
SHARED_ALL = "shared_all"  # every tensor input and the output share one observer (cat)
FIXED = "fixed"  # output qparams fixed by the op's range (sigmoid, tanh, softmax)
DYNAMIC = "dynamic"  # weights quantized ahead of time, activations at run time
WEIGHT_ONLY = "weight_only"  # embeddings: weights quantized, activations are indices


@dataclass
class LowerCtx:
    """What a lowering function gets: the graph, the node (reference op or group root), the
    quantized tensors that feed its dequantized inputs, and its output qparams."""

    gm: fx.GraphModule
    node: fx.Node
    modules: Mapping[str, nn.Module]
    qinputs: dict[int, fx.Node]  # arg index -> node producing the quantized tensor
    out_scale: float = 1.0
    out_zero_point: int = 0
    out_dtype: torch.dtype = torch.quint8
    group: tuple[fx.Node, ...] = ()  # the nodes of a fused functional group, root last
    kernel: Optional[str] = None  # set by a lowering that picks a kernel other than the rule's
    derived_qparams: bool = False  # the kernel chooses its own output qparams (add_scalar)
    derived: Optional[tuple[float, int]] = None  # ... and these are they, when known statically
    pack_engine: Optional[str] = None  # pack weights with this engine (a Rule.alt_engines try)
    # the backend being lowered to: lowering functions ask it for its policy (engine_candidates)
    backend: Optional["Backend"] = None

    @property
    def module(self) -> nn.Module:
        return self.modules[self.node.target]

    def probe(self, fn: Callable[..., Any], keys: tuple[Any, ...] = (0,),
              extra: tuple[Any, ...] = ()) -> Optional[str]:
        """Run ``fn`` on quantized zeros shaped like the real inputs (under the current engine).
        Returns None when the kernel ran, else the first line of its error: the engine has no
        kernel for this case, and the op must stay float rather than fail at run time."""
        nested: list[fx.Node] = []
        fx.node.map_arg(extra, nested.append)
        if nested:  # (also inside a list: torch.reshape(x, (x.size(0), -1)))
            return None  # arguments only known at run time
        args = []
        for key in keys:
            sample = _sample_quantized(self.qinputs[key])
            if sample is None:
                return None  # no example shape recorded: nothing to probe with
            args.append(sample)
        for layout in _layouts(args):
            try:
                with torch.no_grad():
                    fn(*layout, *extra)
            except Exception as e:  # noqa: BLE001 - any failure means "no kernel here"
                return str(e).strip().splitlines()[0][:200]
        return None

    def note(self, node: fx.Node, reason: str) -> fx.Node:
        """Give a node that a lowering adds beside the kernel (contiguous, clamp, ...) the
        record of the op it serves, and a decision saying why it is there."""
        from fxquant.meta import inherit, record
        from fxquant.records import Action

        inherit(node, self.node)
        record(node, "lower_to_backend", Action.LOWER, reason)
        return node

    def set_module(self, new: nn.Module) -> None:
        from fxquant.graph_edit import set_submodule

        set_submodule(self.gm, self.node.target, new)


def static_qparams(node: fx.Node) -> Optional[tuple[tuple[int, ...], float, int, torch.dtype]]:
    """(recorded shape, scale, zero point, dtype) of a quantized tensor node: a quantize node's
    arguments or the qparams recorded on an op; None without a recorded shape or with qparams
    that a kernel chooses at run time."""
    from fxquant.backends.reference_ops import is_quantize, quantize_qparams
    from fxquant.meta import qinfo

    info = qinfo(node)
    if info.value is None or info.value.shape is None:
        return None
    if is_quantize(node):
        scale, zp, dtype = quantize_qparams(node)
    elif info.qparams:
        scale, zp, dtype = info.qparams["scale"], info.qparams["zero_point"], info.qparams["dtype"]
    else:
        return None
    return tuple(info.value.shape), scale, zp, dtype


def _sample_quantized(node: fx.Node) -> Optional[torch.Tensor]:
    found = static_qparams(node)
    if found is None:
        return None
    shape, scale, zp, dtype = found
    return torch.quantize_per_tensor(torch.zeros(shape), scale, zp, dtype)


def _layouts(args: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The samples as given (contiguous) and, for 4-d/5-d tensors, channels-last: the layout
    every quantized conv returns, which some kernels (mean over 1x1, clamp) mishandle."""
    out = [args]
    if args and all(a.dim() in (4, 5) for a in args):
        out.append([a.contiguous(memory_format=torch.channels_last if a.dim() == 4
                                 else torch.channels_last_3d) for a in args])
    return out


Lowered = Union[fx.Node, NoMatch]
LowerFn = Callable[[LowerCtx], Lowered]
CheckFn = Callable[[fx.Node, Mapping[str, nn.Module], Any], Union[bool, NoMatch]]


@dataclass(frozen=True)
class Rule:
    """How one op is quantized on a backend.

    ``op``: which nodes (after fusion) the rule is for. ``qparams``: the policy above.
    ``inputs``: which arguments are quantized activations: "first" (arg 0) or "tensors"
    (every float-tensor argument, including those inside a list, as for cat).
    ``check``: backend constraints on the node/qconfig (returns NoMatch(reason) to decline).
    ``lower``: rewrites the reference pattern into the kernel call. ``kernel``: its name.
    ``alt_engines``: engines to pack with when the backend's kernel fails the numeric check.
    """

    name: str
    op: Op
    qparams: str
    kernel: str
    lower: Optional[LowerFn] = None
    inputs: str = "first"
    fixed: Optional[tuple[float, int]] = None
    check: Optional[CheckFn] = None
    notes: str = ""
    multi_output: bool = False  # returns a tuple of tensors (chunk, split): items share qparams
    # engines whose kernel may run the op when the backend's own fails the numeric check
    # (lower_to_backend tries them in order; the lowering reads LowerCtx.pack_engine)
    alt_engines: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """Which family of qconfigs the rule serves: "static", "dynamic" or "weight_only"."""
        return self.qparams if self.qparams in (DYNAMIC, WEIGHT_ONLY) else "static"

    def accepts(self, node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
                ) -> Union[bool, NoMatch]:
        ok = self.op.matches(node, modules)
        if not ok:
            return ok
        if self.check is not None:
            return self.check(node, modules, qconfig)
        return True


@dataclass(frozen=True)
class Backend:
    """A backend: its name, the torch engine that runs it, its rule table, and the policy the
    default qconfigs follow on it. The library asks these fields and never compares backend
    names (a backend composed from another keeps its policy).

    ``per_channel_weights``: default weights are per-channel (False: per-tensor, for kernels
    without per-channel weights). ``per_tensor_conv_transpose``: the default mappings give
    transposed convs per-tensor weights (as torch.ao does where the engine's transposed conv
    has no per-channel form). ``engine_candidates``: the engines a conv's weights may be packed
    for instead of ``engine`` where that is measured faster (the per-layer engine choice,
    fxquant.backends.engine_choice), in order; empty: convs are not timed (kernels without
    such slow cases). ``sum_fusion``: its CPUs run oneDNN's fused int8 convs (a sum or an
    eltwise post-op, fxquant.nn.conv_add), so ``convert_fx(..., fuse_sums=True)`` may fuse
    conv + residual add and ``fuse_activations=True`` conv + SiLU / hardswish (x86 CPUs).
    """

    name: str
    engine: str
    rules: tuple[Rule, ...]
    description: str = ""
    per_channel_weights: bool = True
    per_tensor_conv_transpose: bool = False
    engine_candidates: tuple[str, ...] = ()
    sum_fusion: bool = False

    def rule_for(self, node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any,
                 kind: str = "static") -> tuple[Optional[Rule], Optional[str]]:
        """The first rule of ``kind`` that accepts the node, or (None, reason why none did)."""
        declined: Optional[str] = None
        for rule in self.rules:
            if rule.kind != kind or not rule.op.matches(node, modules):
                continue
            ok = rule.accepts(node, modules, qconfig)
            if ok:
                return rule, None
            declined = declined or (ok.reason if isinstance(ok, NoMatch) else None)
        return None, declined

    def rule_named(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def extended(self, *rules: Rule, name: Optional[str] = None) -> "Backend":
        """A copy with extra rules tried first (how users add patterns and kernels)."""
        return replace(self, rules=tuple(rules) + self.rules, name=name or self.name)
