"""convert: observers become quantize → dequantize with the measured qparams, and weighted
modules become reference modules whose weights are quantized with the qconfig's weight
observer. The result is the *reference* quantized graph: q/dq around float ops, numerically
what the backend kernels compute.

Every quantization parameter the converted model runs with is in its ``state_dict``: a quantize
node reads its scale / zero point from buffers (a ``QParams`` submodule per quantize, get_attr
nodes), and the scalar qparams a ``quantized::`` kernel call takes as constants (add, mul, ...:
lowered later) are written to / read from the ``state_dict`` by hooks this pass installs, so a
state_dict loaded into a differently calibrated model gives the saved model's outputs. The
prepared model's state (weights and observer statistics) stays in ``gm.meta`` for
:func:`fxquant.save`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.fx as fx

from fxquant.backends.reference_ops import (activation_qparams, has_reference, insert_dequantize,
                                            insert_quantize_buffered, is_dequantize,
                                            is_quantize, kernel_qparam_slots,
                                            quantize_qparams,
                                            scalar_op_qparams, to_reference)
from fxquant.errors import FxQuantError
from fxquant.meta import QNodeInfo, inherit, qinfo, record
from fxquant.pipeline import PassContext, PassResult
from fxquant.records import Action, QKind, Role

from fxquant.backends.reference_ops import INTEGER_DTYPES as _INT_DTYPES


@dataclass(frozen=True)
class Convert:
    name: ClassVar[str] = "convert"
    requires: ClassVar[frozenset[str]] = frozenset({"observed"})
    provides: ClassVar[frozenset[str]] = frozenset({"reference"})
    # "fix" | "warn" | "off": the range check before quantizing (fxquant.range_check); None:
    # the ``range_check`` option of convert_fx, else "fix"
    range_check: Optional[str] = None

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from fxquant.range_check import check_ranges
        from fxquant.pickling import remember_prepared

        remember_prepared(gm)
        install_kernel_qparams_hooks(gm)
        stats: Counter[str] = Counter()
        stats["modules_unshared"] = _unshare_weighted_modules(gm)
        if not stats["modules_unshared"]:
            del stats["modules_unshared"]
        findings = check_ranges(gm, self.range_check or ctx.options.range_check, pass_name=self.name)
        stats.update({"range_findings": len(findings)} if findings else {})
        for node in list(gm.graph.nodes):
            info = qinfo(node)
            if info.role == Role.OBSERVER:
                stats[_convert_observer(gm, node)] += 1
            elif info.qkind in (QKind.DYNAMIC, QKind.WEIGHT_ONLY):
                record(node, self.name, Action.DEFER, "weights are quantized when lowered "
                       "(convert_fx); the reference graph keeps this op float")
                stats["deferred"] += 1
            elif info.weight_spec is not None and node.op == "call_module":
                stats[_convert_weighted(gm, node, ctx.options.bias)] += 1
        gm.delete_all_unused_submodules()
        gm.recompile()
        if ctx.options.fuse_sums:
            from fxquant.passes.fuse_sums import fuse_sums

            stats["sums_fused"] = fuse_sums(gm, ctx.options.backend.sum_fusion)
        if ctx.options.fuse_activations:
            from fxquant.passes.fuse_activations import fuse_activations

            stats["activations_fused"] = fuse_activations(gm, ctx.options.backend.sum_fusion)
        return PassResult(gm, bool(stats), dict(stats))


def _unshare_weighted_modules(gm: fx.GraphModule) -> int:
    """A weighted module called from several places gets one copy per call: each call has
    its own output qparams, which a quantized module holds."""
    import copy as _copy

    seen: set[str] = set()
    copies = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or qinfo(node).weight_spec is None:
            continue
        target = str(node.target)
        if target not in seen:
            seen.add(target)
            continue
        name, i = f"{target.replace('.', '_')}_call", 1
        while hasattr(gm, f"{name}{i}"):
            i += 1
        gm.add_submodule(f"{name}{i}", _copy.deepcopy(gm.get_submodule(target)))
        node.target = f"{name}{i}"
        record(node, Convert.name, Action.UNSHARE, f"module '{target}' is called more than once: "
               f"this call gets its own copy '{name}{i}' (its own output qparams)")
        copies += 1
    return copies


def _convert_observer(gm: fx.GraphModule, node: fx.Node) -> str:
    obs = gm.get_submodule(str(node.target))
    x = node.args[0]
    if getattr(obs, "dtype", None) not in _INT_DTYPES or getattr(obs, "is_dynamic", False):
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        return "observers_removed"
    _check_calibrated(obs, node)
    scale, zp, dtype = activation_qparams(obs)
    scale, zp = _kernel_derived_qparams(node, scale, zp, dtype)
    with gm.graph.inserting_before(node):
        q, s, z = insert_quantize_buffered(gm, x, scale, zp, dtype,
                                           f"{x.name}_qparams")
        dq = insert_dequantize(gm.graph, q)
    qparams = {"scale": scale, "zero_point": zp, "dtype": dtype}
    for new, role in ((s, Role.QUANTIZE), (z, Role.QUANTIZE), (q, Role.QUANTIZE),
                      (dq, Role.DEQUANTIZE)):
        info = inherit(new, node)
        info.role, info.qparams = role, qparams
        info.decisions = []
    record(q, Convert.name, Action.QUANTIZE, f"{node.target}: scale={scale:.6g} zero_point={zp} "
                                               f"{str(dtype).replace('torch.', '')}", **qparams)
    record(dq, Convert.name, Action.DEQUANTIZE, "back to float for the reference op after it")
    if isinstance(x, fx.Node) and qinfo(x).role == Role.OP:
        qinfo(x).qparams = qparams
    node.replace_all_uses_with(dq)
    gm.graph.erase_node(node)
    return "quantize_dequantize"


def _kernel_derived_qparams(node: fx.Node, scale: float, zp: int, dtype: torch.dtype
                            ) -> tuple[float, int]:
    """The qparams of a value at or downstream of ``x + c`` / ``x * c`` (through ops that keep
    their input's qparams): what ``quantized::add_scalar`` / ``mul_scalar`` derive from their
    input's qparams, not the shared observer's (which are the input's: ``sigmoid(x) + 2``
    would clip at 1). Upstream observers are converted first, so an op's input is a
    dequantize that already carries the right (possibly derived) qparams."""
    from fxquant.meta import SharedSpec
    from fxquant.passes.insert_observers import DERIVED_QPARAMS_RULES, observed_value
    from fxquant.slots import get_input

    value = observed_value(node)
    info = qinfo(value)
    if info.rule in DERIVED_QPARAMS_RULES:
        if len(value.args) < 2 or not isinstance(value.args[1], (int, float)) \
                or not isinstance(value.args[0], fx.Node):
            return scale, zp
        src = qinfo(value.args[0]).qparams or {}
        derived = scalar_op_qparams(str(info.rule), src.get("scale", scale),
                                    src.get("zero_point", zp), dtype, float(value.args[1]))
        return derived if derived is not None else (scale, zp)
    spec = info.output_spec
    if isinstance(spec, SharedSpec) and not spec.all_inputs \
            and _downstream_of_derived(value):
        src = get_input(value, spec.input_index)
        qparams = qinfo(src).qparams if isinstance(src, fx.Node) else None
        if qparams and qparams.get("dtype") == dtype:
            return qparams["scale"], qparams["zero_point"]
    return scale, zp


def _downstream_of_derived(value: fx.Node) -> bool:
    """Is ``value`` reached from an add_scalar / mul_scalar through ops sharing qparams?"""
    from fxquant.passes.insert_observers import kernel_derived

    def through(node: fx.Node) -> Any:
        while isinstance(node, fx.Node) and qinfo(node).role in (Role.DEQUANTIZE, Role.QUANTIZE,
                                                                 Role.OBSERVER):
            node = node.args[0] if node.args else None
        return node

    return kernel_derived(value, through) is not None


def _check_calibrated(obs: torch.nn.Module, node: fx.Node) -> None:
    min_val = getattr(obs, "min_val", None)
    if isinstance(min_val, torch.Tensor) and min_val.numel() and torch.isinf(min_val).all():
        raise FxQuantError(
            f"observer {node.target} saw no data: the prepared model was not calibrated "
            f"(or this branch never ran)", node,
            hint="run the prepared model on representative inputs before convert_fx")


def _convert_weighted(gm: fx.GraphModule, node: fx.Node, bias_mode: str = "float") -> str:
    from fxquant.graph_edit import set_submodule

    info = qinfo(node)
    module = gm.get_submodule(str(node.target))
    if not has_reference(module):
        return "weight_not_quantized"
    ref, wq = to_reference(module, info.weight_spec.observer)
    bias_note = _round_bias(ref, node, wq.scale) if bias_mode == "int32" else ""
    set_submodule(gm, str(node.target), ref)
    scheme = str(wq.qscheme).replace("torch.", "")
    record(node, Convert.name, Action.QUANTIZE_WEIGHT,
           f"weight {str(wq.dtype).replace('torch.', '')} {scheme} "
           f"({wq.scale.numel()} scale{'s' if wq.scale.numel() > 1 else ''}); reference module "
           f"{type(ref).__name__}{bias_note}")
    return "weights_quantized"


def _round_bias(ref: torch.nn.Module, node: fx.Node, weight_scale: torch.Tensor) -> str:
    """``convert_fx(..., bias="int32")``: the reference module's bias rounded to its op's
    int32 accumulator units, input scale x weight scale per output channel (the float32
    product, as an ONNX bias ``DequantizeLinear`` holds it), so that the native kernel, the
    reference graph and the engines add the same bias. Returns the note for the record."""
    from fxquant.nn.bias import quantized_core, set_bias

    core = quantized_core(ref)  # the conv / linear itself, inside a fused container too
    bias = getattr(core, "bias", None)
    src = node.args[0] if node.args else None
    if bias is None:
        return "" if core is not None else "; bias kept float (not a conv / linear core)"
    if not (is_dequantize(src) and is_quantize(src.args[0])):
        return "; bias kept float (the input is not a statically quantized tensor)"
    in_scale = float(quantize_qparams(src.args[0])[0])
    unit = (in_scale * weight_scale.detach().double().reshape(-1)).float().double()
    unit = torch.where(unit > 0, unit, torch.ones_like(unit))
    if unit.numel() not in (1, bias.numel()):
        return "; bias kept float (the weight scales are not per output channel)"
    ints = torch.round(bias.detach().double() / unit).clamp(-(2 ** 31), 2 ** 31 - 1)
    rounded = (ints * unit).to(bias.dtype)
    change = float(((rounded.double() - bias.detach().double()).abs() / unit).max())
    set_bias(core, rounded)
    return f"; bias rounded to int32 accumulator units (input scale x weight scale; at most " \
           f"{change:.2f} unit moved)"


# ------------------------------------------------------------------ kernel qparams in state_dict
KERNEL_QPARAMS = "fxquant_kernel_qparams"


def install_kernel_qparams_hooks(gm: fx.GraphModule) -> None:
    """``state_dict`` gets ``fxquant_kernel_qparams.<i>.scale`` / ``.zero_point`` for the i-th
    kernel call (graph order) that takes its output qparams as constants; ``load_state_dict``
    writes them back into the calls and recompiles. Installed once per model."""
    if _save_kernel_qparams in getattr(gm, "_state_dict_hooks", {}).values():
        return
    gm.register_state_dict_post_hook(_save_kernel_qparams)
    gm.register_load_state_dict_pre_hook(_load_kernel_qparams)


def _kernel_slots(gm: fx.GraphModule) -> dict[str, tuple[fx.Node, object, str]]:
    out: dict[str, tuple[fx.Node, object, str]] = {}
    i = 0
    for node in gm.graph.nodes:
        slots = kernel_qparam_slots(node)
        for key, kind in slots:
            out[f"{KERNEL_QPARAMS}.{i}.{kind}"] = (node, key, kind)
        i += bool(slots)
    return out


def _slot_value(node: fx.Node, key: object) -> object:
    return node.args[key] if isinstance(key, int) else node.kwargs[key]


def _save_kernel_qparams(module: fx.GraphModule, state_dict: dict, prefix: str,
                         local_metadata: dict) -> None:
    for name, (node, key, kind) in _kernel_slots(module).items():
        dtype = torch.float64 if kind == "scale" else torch.int64
        state_dict[prefix + name] = torch.tensor(_slot_value(node, key), dtype=dtype)


def _load_kernel_qparams(module: fx.GraphModule, state_dict: dict, prefix: str,
                         local_metadata: dict, strict: bool, missing_keys: list,
                         unexpected_keys: list, error_msgs: list) -> None:
    slots = _kernel_slots(module)
    changed = False
    for name in [k for k in state_dict if k.startswith(f"{prefix}{KERNEL_QPARAMS}.")]:
        value = state_dict.pop(name)
        if name[len(prefix):] not in slots:
            unexpected_keys.append(name)
            continue
        node, key, kind = slots.pop(name[len(prefix):])
        new = float(value) if kind == "scale" else int(value)
        if new != _slot_value(node, key):
            _set_slot(node, key, new)
            changed = True
    missing_keys.extend(prefix + k for k in slots)
    if changed:
        module.recompile()


def _set_slot(node: fx.Node, key: object, value: object) -> None:
    if isinstance(key, int):
        args = list(node.args)
        args[key] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, key: value}
