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
    # for chains ending in a clamp: build takes the clamp's (min, max) as a third argument
    clamp_root: bool = False


@dataclass(frozen=True)
class GroupFusion:
    pattern: Chain
    kernel: str
    description: str


RELU = Op(F.relu, name="relu")


def clamp_bounds(node, modules) -> Optional[tuple[float, float]]:
    """(min, max) of a ReLU6 / Hardtanh / clamp node, when both are constants."""
    import torch.fx as fx

    if node.op == "call_module":
        m = modules[node.target]
        return (float(m.min_val), float(m.max_val)) if isinstance(m, nn.Hardtanh) else None
    if node.target in (F.relu6,):
        return (0.0, 6.0)
    args = list(node.args[1:]) + [None, None]
    if node.target in (F.hardtanh, F.hardtanh_):
        lo = node.kwargs.get("min_val", args[0] if args[0] is not None else -1.0)
        hi = node.kwargs.get("max_val", args[1] if args[1] is not None else 1.0)
    else:  # torch.clamp (and the in-place clamp_ / clip_ kept as written)
        lo = node.kwargs.get("min", args[0])
        hi = node.kwargs.get("max", args[1])
    if any(isinstance(v, fx.Node) or v is None for v in (lo, hi)):
        return None
    return float(lo), float(hi)


def _clamp_fusable(node, modules) -> bool:
    bounds = clamp_bounds(node, modules)
    return bounds is not None and bounds[0] <= 0.0 <= bounds[1]


# canonical spellings (normalize rewrites torch.clip / x.clamp() / x.clip() to torch.clamp),
# in-place ones too: x.clamp_(0, 6) / torch.clamp_ / clip_ (which normalize keeps as written,
# see fxquant.ops), F.hardtanh_ and F.relu6 / F.hardtanh(inplace=True) (nn.ReLU6 / nn.Hardtanh
# are rewritten into them, kept in place when their tensor has views): a chain's interior node
# has one user, so nothing else reads what they overwrite
CLAMP = Op(F.relu6, F.hardtanh, F.hardtanh_, torch.clamp, torch.clamp_,
           torch.clip_, "clamp_", "clip_", name="clamp", check=_clamp_fusable)
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


def _with_relu(kind: str) -> Builder:
    """conv / linear / BatchNorm + ReLU as the fused ``kind`` (ConvReLU2d, LinearReLU, ...)."""
    def build(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
        return getattr(_fused(), kind)(mods[0], nn.ReLU())
    return build


def _linear_bn(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
    if training:
        return _fused().LinearBn1d(mods[0], mods[1])
    return _fold().fold_linear_bn_eval(mods[0], mods[1])


def _linear_bn_relu(mods: Sequence[nn.Module], training: bool) -> Optional[nn.Module]:
    if training:
        return None  # no QAT LinearBnReLU module: linear-bn fuses, the ReLU stays apart
    return _fused().LinearReLU(_fold().fold_linear_bn_eval(mods[0], mods[1]), nn.ReLU())


def _with_clamp(kind: str, fold: Optional[str] = None
                ) -> Callable[[Sequence[nn.Module], bool, tuple[float, float]], Optional[nn.Module]]:
    """conv/linear [+ BatchNorm, folded by ``fold`` (MobileNetV2's block)] + ReLU6/Hardtanh/clamp
    as the fused ``kind``: the clamp is kept in the fused module so that its output is observed
    after the clamp. In training (QAT) it declines: no QAT module takes the clamp, which stays
    apart (and conv + bn fuse without it)."""
    def build(mods: Sequence[nn.Module], training: bool, bounds: tuple[float, float]
              ) -> Optional[nn.Module]:
        if training:
            return None
        core = mods[0] if fold is None else getattr(_fold(), fold)(mods[0], mods[1])
        clamp = nn.ReLU6() if bounds == (0.0, 6.0) else nn.Hardtanh(*bounds)
        return getattr(_fused(), kind)(core, clamp)
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
            ModuleFusion(Chain(conv, RELU, name=f"conv{d}d_relu"), _with_relu(f"ConvReLU{d}d"),
                         f"Conv{d}d + ReLU"),
            ModuleFusion(Chain(Op(_CONVT[d], name="convt"), Op(_BN[d], name="bn"),
                               name=f"convtranspose{d}d_bn"), _convt_bn,
                         f"ConvTranspose{d}d + BatchNorm{d}d"),
        ]
    for d in (1, 2, 3):
        table.append(ModuleFusion(Chain(Op(_CONV[d], name="conv"), Op(_BN[d], name="bn"), CLAMP,
                                        name=f"conv{d}d_bn_clamp"),
                                  _with_clamp(f"ConvClamp{d}d", "fold_conv_bn_eval"),
                                  f"Conv{d}d + BatchNorm{d}d + ReLU6/Hardtanh/clamp (BatchNorm "
                                  f"folded, bound in output qparams)", clamp_root=True))
        table.append(ModuleFusion(Chain(Op(_CONV[d], name="conv"), CLAMP, name=f"conv{d}d_clamp"),
                                  _with_clamp(f"ConvClamp{d}d"),
                                  f"Conv{d}d + ReLU6/Hardtanh/clamp (bound in output qparams)",
                                  clamp_root=True))
    table.append(ModuleFusion(Chain(Op(nn.Linear, name="linear"), CLAMP, name="linear_clamp"),
                              _with_clamp("LinearClamp"),
                              "Linear + ReLU6/Hardtanh/clamp (bound in output qparams)",
                              clamp_root=True))
    table.append(ModuleFusion(Chain(Op(nn.Linear, name="linear"), Op(nn.BatchNorm1d, name="bn"),
                                    CLAMP, name="linear_bn_clamp"),
                              _with_clamp("LinearClamp", "fold_linear_bn_eval"),
                              "Linear + BatchNorm1d + ReLU6/Hardtanh/clamp (BatchNorm folded, "
                              "bound in output qparams)", clamp_root=True))
    for d in (2, 3):
        table.append(ModuleFusion(Chain(Op(_BN[d], name="bn"), RELU, name=f"bn{d}d_relu"),
                                  _with_relu(f"BNReLU{d}d"), f"BatchNorm{d}d + ReLU"))
    table += [
        ModuleFusion(Chain(Op(nn.Linear, name="linear"), Op(nn.BatchNorm1d, name="bn"), RELU,
                           name="linear_bn_relu"), _linear_bn_relu,
                     "Linear + BatchNorm1d + ReLU"),
        ModuleFusion(Chain(Op(nn.Linear, name="linear"), Op(nn.BatchNorm1d, name="bn"),
                           name="linear_bn"), _linear_bn, "Linear + BatchNorm1d"),
        ModuleFusion(Chain(Op(nn.Linear, name="linear"), RELU, name="linear_relu"), _with_relu("LinearReLU"),
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
