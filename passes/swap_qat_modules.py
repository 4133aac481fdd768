"""swap_qat_modules: for quantization-aware training, replace every weighted module that
``annotate`` decided to quantize (its record has a ``weight_spec``) by its QAT module
(:mod:`fxquant.nn.qat`), whose forward fake-quantizes the weight with ``qconfig.weight()``.
Conv-bn(-relu) / linear-bn containers become modules that simulate the folded BatchNorm.

It runs after ``insert_observers`` (which, in QAT, inserted fake-quant modules on the
activations), so the backend rules in ``annotate`` still saw the float and fused float module
types they are written for (each backend's table lists the training-mode fused modules,
ConvBn* / ConvBnReLU* / LinearBn1d, beside the float ones). The QAT modules share the float
modules' parameters.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from fxquant.meta import qinfo, record
from fxquant.nn.qat import QAT_MODULE_MAPPINGS, is_qat_module
from fxquant.pipeline import PassContext, PassResult
from fxquant.records import Action, QKind

_WEIGHTS_ONLY_KINDS = (QKind.DYNAMIC, QKind.WEIGHT_ONLY)


@dataclass(frozen=True)
class SwapQATModules:
    name: ClassVar[str] = "swap_qat_modules"
    requires: ClassVar[frozenset[str]] = frozenset({"observed"})
    provides: ClassVar[frozenset[str]] = frozenset({"qat_swapped"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        swapped: dict[str, str] = {}  # target -> QAT class name, for modules called twice
        for node in gm.graph.nodes:
            if node.op == "call_module" and qinfo(node).weight_spec is not None:
                stats[_swap(gm, node, swapped)] += 1
        return PassResult(gm, bool(stats.get("swapped")), dict(stats))


def _swap(gm: fx.GraphModule, node: fx.Node, swapped: dict[str, str]) -> str:
    from fxquant.graph_edit import set_submodule

    info = qinfo(node)
    target = str(node.target)
    if target in swapped:
        record(node, SwapQATModules.name, Action.SWAP_QAT, f"{target} is already {swapped[target]} "
               f"(module called more than once)")
        return "already_swapped"
    if getattr(info, "qkind", None) in _WEIGHTS_ONLY_KINDS:
        record(node, SwapQATModules.name, Action.KEEP_MODULE, f"{info.qkind} quantization: the "
               f"weight is quantized at convert, there is no QAT module for it")
        return "not_swapped"
    module = gm.get_submodule(target)
    if is_qat_module(module):
        swapped[target] = type(module).__name__
        record(node, SwapQATModules.name, Action.SWAP_QAT,
               f"already a QAT module ({type(module).__name__})")
        return "already_swapped"
    qat_cls = QAT_MODULE_MAPPINGS.get(type(module))
    if qat_cls is None:
        record(node, SwapQATModules.name, Action.KEEP_MODULE,
               f"no QAT module for {type(module).__name__}: training does not see its weight "
               f"quantization; the weight is quantized at convert as in PTQ")
        return "not_swapped"
    qat = qat_cls.from_float(module, info.qconfig)  # type: ignore[attr-defined]
    set_submodule(gm, target, qat)
    swapped[target] = qat_cls.__name__
    fq = qat.weight_fake_quant
    folded = " with simulated BatchNorm folding" if hasattr(qat, "bn") else ""
    record(node, SwapQATModules.name, Action.SWAP_QAT,
           f"{type(module).__name__} → qat.{qat_cls.__name__}{folded}; weight fake quant "
           f"{type(fq).__name__}({str(fq.dtype).replace('torch.', '')} "
           f"{str(getattr(fq, 'qscheme', '')).replace('torch.', '')})",
           qat_module=qat_cls.__name__)
    return "swapped"
