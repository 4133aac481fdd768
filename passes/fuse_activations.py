"""fuse_activations (``convert_fx(..., fuse_activations=True)``): a conv whose output only
feeds a SiLU or hardswish is computed with it, rounded once.

In the reference graph convert builds, ``conv -> quantize -> dequantize -> act -> quantize``
loses the quantize / dequantize pair between the conv and the activation, and the two nodes
become one group whose root (the activation) carries the activation's output qparams:
``quantize(act(conv(x)))``. The native model runs it as oneDNN's int8 conv with the activation
as an eltwise post-op (:class:`fxquant.nn.conv_add.ConvAct2d`), the integer representation as
the same float expression, and ONNX engines see ``Conv -> act -> QuantizeLinear``, which
OpenVINO's CPU plugin runs as one int8 conv (what OpenVINO + NNCF models do for EfficientNet's
conv + SiLU). Two roundings fewer than the default model for SiLU (the conv's output and the
sigmoid's fixed 1/256 grid, then quantized::mul), one for hardswish: a different model, so an
option, off by default.

Only where the backend says its kernels can (``Backend.sum_fusion``: the same oneDNN conv
kernels, x86 / fbgemm / onednn), for ``Conv2d`` (or a QAT ``ConvBn2d``) with zeros padding and
quint8 activations; every fused or skipped candidate is recorded on the node. ReLU / ReLU6 /
clamp after a conv are fused before convert already (conv2d_relu, and the clamp folded into
the output qparams).
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from fxquant.backends.reference_ops import is_quantize
from fxquant.meta import qinfo, record
from fxquant.nn.conv_add import ACTIVATION_FUNCTIONS
from fxquant.passes.fuse_sums import _CONVS, conv_why_not, group_fused, requantized_reader, tidy
from fxquant.records import Action

PASS = "fuse_activations"
RULE = "conv2d_act"  # the rule (fxquant.backends.native) the group's root is lowered by
# the activation's fxquant rule -> its function (the rules are named as ConvAct2d names them)
ACTIVATIONS = {name: function for function, name in ACTIVATION_FUNCTIONS.items()}


def fuse_activations(gm: fx.GraphModule, act_fusion: bool) -> int:
    """Rewrite every fusable conv -> SiLU / hardswish of the reference graph ``gm``; returns
    how many. ``act_fusion``: the backend's kernels can (else each candidate records why not)."""
    fused = 0
    modules = dict(gm.named_modules())
    for conv in list(gm.graph.nodes):
        if conv.graph is None or conv.op != "call_module" or qinfo(conv).rule not in _CONVS:
            continue
        found = _candidate(conv)
        if found is None:
            continue
        q, dq, act = found
        name = ACTIVATION_FUNCTIONS[act.target]
        why_not = _why_not(conv, act, modules, act_fusion)
        if why_not:
            record(conv, PASS, Action.NOT_FUSED, f"not fused with {act.name}: {why_not}",
                   pattern=RULE)
            continue
        act.args = (conv,)
        act.kwargs = {}
        group_fused(gm, (q, dq), [conv, act], RULE)
        record(conv, PASS, Action.FUSE, f"Conv2d + {name}: the conv's output goes into the "
               f"{name} unrounded (one rounding, at {act.name}'s output)", pattern=RULE)
        record(act, PASS, Action.FUSE, f"Conv2d + {name} run as one kernel (conv with a {name} "
               f"post-op), rounded once", pattern=RULE, conv=conv.name, activation=name)
        fused += 1
    if fused:
        tidy(gm)
    return fused


def _candidate(conv: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(quantize, dequantize, activation) when the conv's only use is a SiLU / hardswish
    through one quantize / dequantize pair (in place or not: the conv's output has no other
    reader)."""
    found = requantized_reader(conv)
    if found is None:
        return None
    q, dq, act = found
    function = ACTIVATIONS.get(qinfo(act).rule)
    if function is None or act.op != "call_function" or act.target is not function \
            or act.args != (dq,) or set(act.kwargs) - {"inplace"} \
            or qinfo(act).group is not None:
        return None
    return q, dq, act


def _why_not(conv: fx.Node, act: fx.Node, modules: dict, act_fusion: bool) -> str:
    if not act_fusion:
        return "the backend has no conv-with-activation kernel (Backend.sum_fusion)"
    users = list(act.users)
    if len(users) != 1 or not is_quantize(users[0]):
        return f"the {act.name}'s output is not quantized"
    return conv_why_not(conv, act, modules, [users[0]])
