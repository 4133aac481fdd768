"""The fusion table: which chains of ops become one module (or one kernel group), and how.

Each :class:`ModuleFusion` maps a chain of module calls (ReLU already normalized to ``F.relu``)
to a builder of the fused float module: in eval mode BatchNorm is folded into the conv/linear
weights; in training mode (QAT) the BatchNorm stays inside ``ConvBn*`` so that it keeps
learning. :class:`GroupFusion` marks a chain of functional ops that a backend runs as one
kernel (``add`` + ``relu`` → ``quantized::add_relu``); no module is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant.patterns import Chain, Op

Builder = Callable[[Sequence[nn.Module], bool], Optional[nn.Module]]


@dataclass(frozen=True)
class ModuleFusion:
    pattern: Chain
    build: Builder  # (matched modules, training) -> fused module, or None to decline
    description: str


@dataclass(frozen=True)
class GroupFusion:
    pattern: Chain
    kernel: str
    description: str


RELU = Op(F.relu, name="relu")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _fused():
    from fxquant.nn import fused

    return fused


def _fold():
    from fxquant.nn import fold

    return fold


def _conv_bn(d: int) -> Builder:
    def build(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
        conv, bn = mods[0], mods[1]
        if training:
            return getattr(_fused(), f"ConvBn{d}d")(conv, bn)
        return _fold().fold_conv_bn_eval(conv, bn)
    return build


def _conv_bn_relu(d: int) -> Builder:
    def build(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
        conv, bn = mods[0], mods[1]
        if training:
            return getattr(_fused(), f"ConvBnReLU{d}d")(conv, bn, nn.ReLU())
        return getattr(_fused(), f"ConvReLU{d}d")(_fold().fold_conv_bn_eval(conv, bn), nn.ReLU())
    return build


def _conv_relu(d: int) -> Builder:
    def build(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
        return getattr(_fused(), f"ConvReLU{d}d")(mods[0], nn.ReLU())
    return build


def _linear_relu(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
    return _fused().LinearReLU(mods[0], nn.ReLU())


def _linear_bn(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
    if training:
        return _fused().LinearBn1d(mods[0], mods[1])
    return _fold().fold_linear_bn_eval(mods[0], mods[1])


def _linear_bn_relu(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
    if training:
        return None  # no QAT LinearBnReLU module: linear-bn fuses, the ReLU stays apart
    return _fused().LinearReLU(_fold().fold_linear_bn_eval(mods[0], mods[1]), nn.ReLU())


def _bn_relu(d: int) -> Builder:
    def build(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
        return getattr(_fused(), f"BNReLU{d}d")(mods[0], nn.ReLU())
    return build


def _convt_bn(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
    if training:
        return None  # no QAT module folds BatchNorm into a transposed conv: left unfused
    return _fold().fold_conv_bn_eval(mods[0], mods[1])


def default_module_fusions() -> tuple[ModuleFusion, ...]:
    table: list[ModuleFusion] = []
    for d in (1, 2, 3):
        conv, bn = Op(_CONV[d], name="conv"), Op(_BN[d], name="bn")
        table += [
            ModuleFusion(Chain(conv, bn, RELU, name=f"conv{d}d_bn_relu"), _conv_bn_relu(d),
                         f"Conv{d}d + BatchNorm{d}d + ReLU"),
            ModuleFusion(Chain(conv, bn, name=f"conv{d}d_bn"), _conv_bn(d), f"Conv{d}d + BatchNorm{d}d"),
            ModuleFusion(Chain(conv, RELU, name=f"conv{d}d_relu"), _conv_relu(d), f"Conv{d}d + ReLU"),
            ModuleFusion(Chain(Op(_CONVT[d], name="convt"), Op(_BN[d], name="bn"),
                               name=f"convtranspose{d}d_bn"), _convt_bn,
                         f"ConvTranspose{d}d + BatchNorm{d}d"),
        ]
    for d in (2, 3):
        table.append(ModuleFusion(Chain(Op(_BN[d], name="bn"), RELU, name=f"bn{d}d_relu"),
                                  _bn_relu(d), f"BatchNorm{d}d + ReLU"))
    table += [
        ModuleFusion(Chain(Op(nn.Linear, name="linear"), Op(nn.BatchNorm1d, name="bn"), RELU,
                           name="linear_bn_relu"), _linear_bn_relu,
                     "Linear + BatchNorm1d + ReLU"),
        ModuleFusion(Chain(Op(nn.Linear, name="linear"), Op(nn.BatchNorm1d, name="bn"),
                           name="linear_bn"), _linear_bn, "Linear + BatchNorm1d"),
        ModuleFusion(Chain(Op(nn.Linear, name="linear"), RELU, name="linear_relu"), _linear_relu,
                     "Linear + ReLU"),
    ]
    return tuple(table)


def default_group_fusions() -> tuple[GroupFusion, ...]:
    return (
        GroupFusion(Chain(Op(torch.add, name="add"), RELU, name="add_relu"), "add_relu",
                    "add + ReLU"),
        GroupFusion(Chain(Op(torch.mul, name="mul"), RELU, name="mul_relu"), "mul_relu",
                    "mul + ReLU"),
    )
