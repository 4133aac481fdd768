"""Float fused modules produced by the fuse pass.

Each is an ``nn.Sequential`` of the float modules it replaces, so it computes exactly what the
unfused ops computed, keeps their parameters under ``0.``/``1.``/``2.`` in the state dict, and
marks the span that later lowers to one fused kernel. Constructors check the member types and
say which module was wrong. The BN-carrying kinds also offer ``fold_eval()``, which folds the
BatchNorm away (see fxquant.nn.fold) for eval-mode conversion.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fxquant.nn.fold import fold_conv_bn_eval, fold_linear_bn_eval

__all__ = [
    "BNReLU2d", "BNReLU3d",
    "ConvBn1d", "ConvBn2d", "ConvBn3d",
    "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d",
    "ConvReLU1d", "ConvReLU2d", "ConvReLU3d",
    "FusedModule", "LinearBn1d", "LinearReLU", "ConvClamp1d", "ConvClamp2d", "ConvClamp3d",
    "LinearClamp",
]


class FusedModule(nn.Sequential):
    """Base of all fused float modules; ``_MEMBERS`` lists the expected type of each slot,
    given in the class line: ``class ConvReLU2d(FusedModule, members=(nn.Conv2d, nn.ReLU))``."""

    _MEMBERS: tuple[type[nn.Module], ...] = ()

    def __init_subclass__(cls, members: tuple[type[nn.Module], ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if members:
            cls._MEMBERS = members

    def __init__(self, *mods: nn.Module) -> None:
        self._check_members(mods)
        super().__init__(*mods)

    @classmethod
    def _check_members(cls, mods: tuple[nn.Module, ...]) -> None:
        expected = ", ".join(t.__name__ for t in cls._MEMBERS)
        if len(mods) != len(cls._MEMBERS):
            raise TypeError(f"{cls.__name__} takes ({expected}), got {len(mods)} modules")
        for i, (mod, kind) in enumerate(zip(mods, cls._MEMBERS)):
            if not isinstance(mod, kind):
                raise TypeError(
                    f"{cls.__name__}({expected}): argument {i} must be {kind.__name__}, "
                    f"got {type(mod).__name__}"
                )


class ConvReLU1d(FusedModule, members=(nn.Conv1d, nn.ReLU)):
    """conv1d -> relu."""


class ConvReLU2d(FusedModule, members=(nn.Conv2d, nn.ReLU)):
    """conv2d -> relu."""


class ConvReLU3d(FusedModule, members=(nn.Conv3d, nn.ReLU)):
    """conv3d -> relu."""


class LinearReLU(FusedModule, members=(nn.Linear, nn.ReLU)):
    """linear -> relu."""


class ConvClamp1d(FusedModule, members=(nn.Conv1d, nn.Hardtanh)):
    """Conv followed by ReLU6 / Hardtanh(a, b) / clamp(a, b) with a <= 0 <= b: the quantized
    conv's output saturates at its observed range, which the clamp keeps inside [a, b]."""


class ConvClamp2d(FusedModule, members=(nn.Conv2d, nn.Hardtanh)):
    __doc__ = ConvClamp1d.__doc__


class ConvClamp3d(FusedModule, members=(nn.Conv3d, nn.Hardtanh)):
    __doc__ = ConvClamp1d.__doc__


class LinearClamp(FusedModule, members=(nn.Linear, nn.Hardtanh)):
    __doc__ = ConvClamp1d.__doc__


class BNReLU2d(FusedModule, members=(nn.BatchNorm2d, nn.ReLU)):
    """batch_norm2d -> relu."""


class BNReLU3d(FusedModule, members=(nn.BatchNorm3d, nn.ReLU)):
    """batch_norm3d -> relu."""


class _ConvBnBase(FusedModule):
    """conv -> bn [-> relu]; ``fold_eval()`` returns the conv (or ConvReLU) with BN folded."""

    _FOLDED_RELU: type[FusedModule] | None = None

    def fold_eval(self) -> nn.Module:
        conv = fold_conv_bn_eval(self[0], self[1])
        if self._FOLDED_RELU is None:
            return conv
        return self._FOLDED_RELU(conv, self[2])


class ConvBn1d(_ConvBnBase, members=(nn.Conv1d, nn.BatchNorm1d)):
    """conv1d -> bn."""


class ConvBn2d(_ConvBnBase, members=(nn.Conv2d, nn.BatchNorm2d)):
    """conv2d -> bn."""


class ConvBn3d(_ConvBnBase, members=(nn.Conv3d, nn.BatchNorm3d)):
    """conv3d -> bn."""


class ConvBnReLU1d(_ConvBnBase, members=(nn.Conv1d, nn.BatchNorm1d, nn.ReLU)):
    """conv1d -> bn -> relu."""

    _FOLDED_RELU = ConvReLU1d


class ConvBnReLU2d(_ConvBnBase, members=(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)):
    """conv2d -> bn -> relu."""

    _FOLDED_RELU = ConvReLU2d


class ConvBnReLU3d(_ConvBnBase, members=(nn.Conv3d, nn.BatchNorm3d, nn.ReLU)):
    """conv3d -> bn -> relu."""

    _FOLDED_RELU = ConvReLU3d


class LinearBn1d(FusedModule, members=(nn.Linear, nn.BatchNorm1d)):
    """linear -> BatchNorm1d; ``fold_eval()`` returns the linear with BN folded."""

    def fold_eval(self) -> nn.Linear:
        return fold_linear_bn_eval(self[0], self[1])
