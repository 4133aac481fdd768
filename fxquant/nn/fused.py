"""Float fused modules produced by the fuse pass.

Each is an ``nn.Sequential`` of the float modules it replaces, so it computes exactly what the
unfused ops computed, keeps their parameters under ``0.``/``1.``/``2.`` in the state dict, and
marks the span that later lowers to one fused kernel. Constructors check the member types and
say which module was wrong. The BN-carrying kinds also offer ``fold_eval()``, which folds the
BatchNorm away (see fxquant.nn.fold) for eval-mode conversion.
"""

from __future__ import annotations

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
    """Base of all fused float modules; ``_MEMBERS`` lists the expected type of each slot."""

    _MEMBERS: tuple[type[nn.Module], ...] = ()

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


class ConvReLU1d(FusedModule):
    _MEMBERS = (nn.Conv1d, nn.ReLU)


class ConvReLU2d(FusedModule):
    _MEMBERS = (nn.Conv2d, nn.ReLU)


class ConvReLU3d(FusedModule):
    _MEMBERS = (nn.Conv3d, nn.ReLU)


class LinearReLU(FusedModule):
    _MEMBERS = (nn.Linear, nn.ReLU)


class ConvClamp1d(FusedModule):
    """Conv followed by ReLU6 / Hardtanh(a, b) / clamp(a, b) with a <= 0 <= b: the quantized
    conv's output saturates at its observed range, which the clamp keeps inside [a, b]."""

    _MEMBERS = (nn.Conv1d, nn.Hardtanh)


class ConvClamp2d(FusedModule):
    __doc__ = ConvClamp1d.__doc__
    _MEMBERS = (nn.Conv2d, nn.Hardtanh)


class ConvClamp3d(FusedModule):
    __doc__ = ConvClamp1d.__doc__
    _MEMBERS = (nn.Conv3d, nn.Hardtanh)


class LinearClamp(FusedModule):
    __doc__ = ConvClamp1d.__doc__
    _MEMBERS = (nn.Linear, nn.Hardtanh)


class BNReLU2d(FusedModule):
    _MEMBERS = (nn.BatchNorm2d, nn.ReLU)


class BNReLU3d(FusedModule):
    _MEMBERS = (nn.BatchNorm3d, nn.ReLU)


class _ConvBnBase(FusedModule):
    """conv -> bn [-> relu]; ``fold_eval()`` returns the conv (or ConvReLU) with BN folded."""

    _FOLDED_RELU: type[FusedModule] | None = None

    def fold_eval(self) -> nn.Module:
        conv = fold_conv_bn_eval(self[0], self[1])
        if self._FOLDED_RELU is None:
            return conv
        return self._FOLDED_RELU(conv, self[2])


class ConvBn1d(_ConvBnBase):
    _MEMBERS = (nn.Conv1d, nn.BatchNorm1d)


class ConvBn2d(_ConvBnBase):
    _MEMBERS = (nn.Conv2d, nn.BatchNorm2d)


class ConvBn3d(_ConvBnBase):
    _MEMBERS = (nn.Conv3d, nn.BatchNorm3d)


class ConvBnReLU1d(_ConvBnBase):
    _MEMBERS = (nn.Conv1d, nn.BatchNorm1d, nn.ReLU)
    _FOLDED_RELU = ConvReLU1d


class ConvBnReLU2d(_ConvBnBase):
    _MEMBERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)
    _FOLDED_RELU = ConvReLU2d


class ConvBnReLU3d(_ConvBnBase):
    _MEMBERS = (nn.Conv3d, nn.BatchNorm3d, nn.ReLU)
    _FOLDED_RELU = ConvReLU3d


class LinearBn1d(FusedModule):
    """linear -> BatchNorm1d; ``fold_eval()`` returns the linear with BN folded."""

    _MEMBERS = (nn.Linear, nn.BatchNorm1d)

    def fold_eval(self) -> nn.Linear:
        return fold_linear_bn_eval(self[0], self[1])
