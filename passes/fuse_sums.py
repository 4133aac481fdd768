"""fuse_sums (``convert_fx(..., fuse_sums=True)``): a conv whose output only feeds a residual add
(and maybe the ReLU after it) is computed with the add, rounded once.

In the reference graph convert builds, ``conv -> quantize -> dequantize -> add(·, other)
[-> relu] -> quantize`` loses the quantize / dequantize pair between the conv and the add, and
the three nodes become one group whose root carries the add's (or ReLU's) output qparams:
``quantize(relu(conv(x) + other))``. The native model runs it as oneDNN's conv with a sum
post-op (:class:`fxquant.nn.conv_add.ConvAdd2d`), the integer representation as the same float
expression, and ONNX engines see ``Conv -> Add [-> Relu] -> QuantizeLinear``, which OpenVINO's
CPU plugin runs as one int8 conv with a sum post-op (what OpenVINO + NNCF models do). One
rounding fewer than torch.ao's two kernels (conv, then add): a different, slightly more
accurate model, so it is an option, off by default (the default stays bit-exact with torch.ao).

Only where the backend says its kernels can (``Backend.sum_fusion``: x86, fbgemm, onednn), for
``Conv2d`` (or a QAT ``ConvBn2d``, folded at convert: its training rounded the conv's output,
the fused model does not) with zeros padding and quint8 activations; every fused or skipped candidate is
recorded on the node.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxquant.backends.reference_ops import is_dequantize, is_quantize, quantize_qparams
from fxquant.graph_edit import drop_dead_get_attrs
from fxquant.meta import qinfo, record
from fxquant.records import Action, QKind

PASS = "fuse_sums"
RULE = "conv2d_add"  # the rule (fxquant.backends.native) the group's root is lowered by
_ADDS = (torch.add,)
# a plain conv, or a QAT ConvBn2d (its BatchNorm folded into the reference conv at convert)
_CONVS = ("conv2d", "conv2d_bn")
_RELUS = (F.relu,)  # normalize writes every ReLU spelling as F.relu


def fuse_sums(gm: fx.GraphModule, sum_fusion: bool) -> int:
    """Rewrite every fusable conv -> add [-> relu] of the reference graph ``gm``; returns how
    many. ``sum_fusion``: the backend's kernels can (else each candidate records why not)."""
    fused = 0
    modules = dict(gm.named_modules())
    for conv in list(gm.graph.nodes):
        if conv.graph is None or conv.op != "call_module" or qinfo(conv).rule not in _CONVS:
            continue
        found = _candidate(conv)
        if found is None:
            continue
        q, dq, add, relu, other = found
        root = relu if relu is not None else add
        why_not = _why_not(conv, dq, root, other, modules, sum_fusion)
        if why_not:
            record(conv, PASS, Action.NOT_FUSED, f"not fused with {add.name}: {why_not}",
                   pattern="conv2d_add")
            continue
        add.args = (conv, other)  # conv first: the chain the group lowering walks
        add.kwargs = {}
        group_fused(gm, (q, dq), [n for n in (conv, add, relu) if n is not None], RULE)
        members = " + ".join(x for x in ("Conv2d", "add", "ReLU" if relu else "") if x)
        record(conv, PASS, Action.FUSE, f"{members}: the conv's output goes into the add "
               f"unrounded (one rounding, at {root.name}'s output)", pattern="conv2d_add")
        record(root, PASS, Action.FUSE, f"{members} run as one kernel (conv with a sum "
               f"post-op), rounded once", pattern="conv2d_add", conv=conv.name)
        fused += 1
    if fused:
        tidy(gm)
    return fused


def requantized_reader(conv: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(quantize, dequantize, the node reading it) when ``conv``'s only use is one quantize ->
    dequantize pair that one node reads: the rounding a fusion removes."""
    users = list(conv.users)
    if len(users) != 1 or not is_quantize(users[0]):
        return None
    q = users[0]
    dqs = list(q.users)
    if len(dqs) != 1 or not is_dequantize(dqs[0]) or len(dqs[0].users) != 1:
        return None
    return q, dqs[0], next(iter(dqs[0].users))


def group_fused(gm: fx.GraphModule, pair: tuple[fx.Node, fx.Node], members: list[fx.Node],
                rule: str) -> None:
    """Erase the quantize / dequantize ``pair`` the fusion bypassed (where nothing else reads
    it) and make ``members`` (the conv first, the root last) one group lowered by ``rule``."""
    from fxquant.passes.fuse import _group_ids

    for n in reversed(pair):
        if not n.users:
            gm.graph.erase_node(n)
    gid = next(_group_ids)
    for n in members:
        qinfo(n).group, qinfo(n).group_root = gid, n is members[-1]
    qinfo(members[-1]).rule = rule


def tidy(gm: fx.GraphModule) -> None:
    """After fusions: drop the qparams attributes and submodules nothing reads, recompile."""
    drop_dead_get_attrs(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _candidate(conv: fx.Node) -> Optional[tuple]:
    """(quantize, dequantize, add, relu or None, the add's other operand) when the conv's only
    use is a two-tensor add through one quantize / dequantize pair."""
    found = requantized_reader(conv)
    if found is None:
        return None
    q, dq, add = found
    if add.op != "call_function" or add.target not in _ADDS or len(add.args) != 2 \
            or add.kwargs or qinfo(add).rule != "add":
        return None
    a, b = add.args
    other = b if a is dq else a
    if other is dq or not is_dequantize(other):
        return None
    relu = None
    if qinfo(add).group is not None:
        if qinfo(add).group_root or len(add.users) != 1:
            return None
        relu = next(iter(add.users))
        if relu.op != "call_function" or relu.target not in _RELUS \
                or qinfo(relu).group != qinfo(add).group:
            return None
    return q, dq, add, relu, other


def _why_not(conv: fx.Node, dq: fx.Node, root: fx.Node, other: fx.Node, modules: dict,
             sum_fusion: bool) -> str:
    if not sum_fusion:
        return "the backend has no conv-with-sum kernel (Backend.sum_fusion)"
    users = list(root.users)
    if len(users) != 1 or not is_quantize(users[0]):
        return "the sum's output is not quantized"
    shapes = [_shape(conv), _shape(other.args[0])]
    if None in shapes or shapes[0] != shapes[1] or len(shapes[0]) != 4:
        return f"the add's operands are not both 4-d of one shape ({shapes[0]} + {shapes[1]}: " \
               f"a broadcasting add stays a separate kernel)"
    return conv_why_not(conv, root, modules, [users[0], dq.args[0], other.args[0]])


def conv_why_not(conv: fx.Node, root: fx.Node, modules: dict, tensors: list) -> str:
    """Why the oneDNN fused conv kernels (fxquant.nn.conv_add) cannot run ``conv`` fused up to
    ``root`` ("" when they can): zeros padding, static quantization, a dequantized input and
    quint8 activations (``tensors``: the other quantize nodes the kernel reads or writes)."""
    mod = modules.get(str(conv.target))
    if getattr(mod, "padding_mode", "zeros") != "zeros" or isinstance(getattr(mod, "padding", 0),
                                                                        str):
        return "padding other than explicit zeros"
    if qinfo(conv).qkind not in (None, QKind.STATIC) or qinfo(root).qkind not in (None,
                                                                                 QKind.STATIC):
        return "not a static quantized op"
    src = conv.args[0] if conv.args else None
    if not (isinstance(src, fx.Node) and is_dequantize(src)):
        return "the conv's input is not a dequantized tensor"
    from fxquant.nn.conv_add import ACTIVATION_DTYPES

    for t in [*tensors, src.args[0]]:
        if is_quantize(t) and quantize_qparams(t)[2] not in ACTIVATION_DTYPES:
            return f"a tensor is not {' / '.join(map(str, ACTIVATION_DTYPES))} (the fused " \
                   f"kernel's activations)"
    return ""


def _shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    value = qinfo(node).value
    return tuple(value.shape) if value is not None and value.shape is not None else None
