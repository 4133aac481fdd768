"""Weight quantization parameters shared by the reference and the quantized modules.

``WeightQParams`` is the one value that travels from a weight observer to a reference module
and on to a packed quantized module. Weight rounding happens in one place,
``quantize_weight``, so that the reference graph and the backend kernels see the same int8
weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "PER_CHANNEL_QSCHEMES",
    "PER_TENSOR_QSCHEMES",
    "WeightQParams",
    "WeightObserverLike",
    "quantize_weight",
]

PER_TENSOR_QSCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
PER_CHANNEL_QSCHEMES = (torch.per_channel_affine, torch.per_channel_symmetric)
_WEIGHT_DTYPES = {
    torch.qint8: (-128, 127),
    torch.quint8: (0, 255),
    torch.qint32: (-(2**31), 2**31 - 1),
}


class WeightObserverLike(Protocol):
    """What ``WeightQParams.from_observer`` reads (our observers and torch.ao's both fit)."""

    dtype: torch.dtype
    qscheme: torch.qscheme

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def _int_bounds(dtype: torch.dtype) -> tuple[int, int]:
    if dtype == torch.qint8:
        return -128, 127
    if dtype == torch.quint8:
        return 0, 255
    return -2147483648, 2147483647


def _is_narrower(dtype: torch.dtype, qrange: tuple[int, int]) -> bool:
    lo, hi = _int_bounds(dtype)
    return qrange[0] > lo or qrange[1] < hi


def quantize_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: torch.dtype,
    ch_axis: int,
    qrange: tuple[int, int],
) -> torch.Tensor:
    """Quantize a float weight. ``ch_axis < 0`` means per-tensor, otherwise per-channel.

    Uses torch.quantize_per_tensor / quantize_per_channel exactly as torch's own weight
    quantization does (scale as double, zero point as int64); when ``qrange`` is narrower
    than the dtype's range the integers are then clamped to it, as torch clamps weights of
    reduced-range observers. TorchScript-compatible: reference modules call it in ``forward``.
    """
    if ch_axis < 0:
        q = torch.quantize_per_tensor(w, float(scale.item()), int(zero_point.item()), dtype)
        if _is_narrower(dtype, qrange):
            ints = q.int_repr().clamp(qrange[0], qrange[1])
            q = torch._make_per_tensor_quantized_tensor(ints, q.q_scale(), q.q_zero_point())
        return q
    q = torch.quantize_per_channel(
        w, scale.to(torch.double), zero_point.to(torch.long), ch_axis, dtype
    )
    if _is_narrower(dtype, qrange):
        ints = q.int_repr().clamp(qrange[0], qrange[1])
        q = torch._make_per_channel_quantized_tensor(
            ints, q.q_per_channel_scales(), q.q_per_channel_zero_points(), ch_axis
        )
    return q


def _as_tensor(value: Any, dtype: torch.dtype, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() != dtype.is_floating_point:
            kind = "float" if dtype.is_floating_point else "integer"
            raise TypeError(f"WeightQParams.{name} must be a {kind} tensor, got {value.dtype}")
        return value.detach().reshape(-1).to(dtype)
    return torch.tensor([value], dtype=dtype).reshape(-1)


@dataclass(frozen=True)
class WeightQParams:
    """Quantization parameters of one weight tensor.

    scale: float32 tensor, 1 element (per-tensor) or C elements (per-channel).
    zero_point: int64 tensor of the same length.
    dtype: quantized dtype (torch.qint8 for the fbgemm/qnnpack kernels).
    qscheme: per_tensor_{affine,symmetric} or per_channel_{affine,symmetric}; symmetric
        schemes quantize exactly like their affine counterparts, as torch does.
    ch_axis: the channel axis for per-channel schemes (0 for conv/linear weights, 1 for
        transposed-conv weights); ignored per-tensor.
    quant_min / quant_max: the integer range; None means the dtype's full range. Values
        outside are clamped after rounding (torch's reduced-range weight observers, e.g.
        [-127, 127], need this).

    Python scalars are accepted for scale / zero_point and normalized to 1-D tensors.
    Equality and hashing compare values.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    dtype: torch.dtype = torch.qint8
    qscheme: torch.qscheme = torch.per_tensor_affine
    ch_axis: int = 0
    quant_min: int | None = None
    quant_max: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _as_tensor(self.scale, torch.float32, "scale"))
        object.__setattr__(
            self, "zero_point", _as_tensor(self.zero_point, torch.int64, "zero_point")
        )
        self._check_scheme()
        self._check_shapes()
        lo, hi = self.qrange
        object.__setattr__(self, "quant_min", lo)
        object.__setattr__(self, "quant_max", hi)

    def _check_scheme(self) -> None:
        if self.dtype not in _WEIGHT_DTYPES:
            raise ValueError(
                f"WeightQParams.dtype must be one of {list(_WEIGHT_DTYPES)}, got {self.dtype}"
            )
        if self.qscheme not in PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES:
            raise ValueError(
                f"WeightQParams.qscheme {self.qscheme} is not supported for weights; use "
                "per_tensor_affine/symmetric or per_channel_affine/symmetric"
            )

    def _check_shapes(self) -> None:
        n, nz = self.scale.numel(), self.zero_point.numel()
        if n != nz:
            raise ValueError(f"WeightQParams: scale has {n} elements but zero_point has {nz}")
        if not self.is_per_channel and n != 1:
            raise ValueError(
                f"WeightQParams: {self.qscheme} needs a 1-element scale, got {n}; "
                "use a per_channel qscheme for one scale per channel"
            )
        if bool((self.scale <= 0).any()) or not bool(torch.isfinite(self.scale).all()):
            raise ValueError(f"WeightQParams: scale must be finite and > 0, got {self.scale}")

    @property
    def is_per_channel(self) -> bool:
        return self.qscheme in PER_CHANNEL_QSCHEMES

    @property
    def qrange(self) -> tuple[int, int]:
        """The effective (quant_min, quant_max): the observer's range within the dtype's."""
        lo, hi = _WEIGHT_DTYPES[self.dtype]
        qmin = lo if self.quant_min is None else int(self.quant_min)
        qmax = hi if self.quant_max is None else int(self.quant_max)
        if not lo <= qmin <= qmax <= hi:
            raise ValueError(
                f"WeightQParams: quant range [{qmin}, {qmax}] must lie within {self.dtype}'s "
                f"[{lo}, {hi}]"
            )
        return qmin, qmax

    @property
    def affine_qscheme(self) -> torch.qscheme:
        """The qscheme the quantized weight tensor carries (symmetric -> affine)."""
        return torch.per_channel_affine if self.is_per_channel else torch.per_tensor_affine

    @classmethod
    def from_observer(cls, obs: WeightObserverLike) -> WeightQParams:
        """Read qparams from an observer or fake-quant that has already seen the weight."""
        scale, zero_point = obs.calculate_qparams()
        qscheme = obs.qscheme
        per_channel = qscheme in PER_CHANNEL_QSCHEMES
        return cls(
            scale=scale,
            zero_point=zero_point,
            dtype=obs.dtype,
            qscheme=qscheme,
            ch_axis=int(getattr(obs, "ch_axis", 0)) if per_channel else 0,
            quant_min=_opt_int(getattr(obs, "quant_min", None)),
            quant_max=_opt_int(getattr(obs, "quant_max", None)),
        )

    def check_weight(self, w: torch.Tensor) -> None:
        """Raise a ValueError if these qparams don't fit weight ``w``'s shape."""
        if not self.is_per_channel:
            return
        if not -w.dim() <= self.ch_axis < w.dim():
            raise ValueError(f"WeightQParams.ch_axis={self.ch_axis} is out of range for a "
                             f"{w.dim()}-D weight of shape {tuple(w.shape)}")
        channels = w.shape[self.ch_axis]
        if channels != self.scale.numel():
            raise ValueError(
                f"WeightQParams has {self.scale.numel()} per-channel scales but the weight has "
                f"{channels} channels on axis {self.ch_axis} (shape {tuple(w.shape)})"
            )

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize float weight ``w`` to a quantized tensor (per-tensor or per-channel)."""
        self.check_weight(w)
        axis = self.ch_axis % w.dim() if self.is_per_channel else -1
        return quantize_weight(
            w.detach().float(), self.scale, self.zero_point, self.dtype, axis, self.qrange
        )

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Float ``w`` quantized then dequantized with these qparams."""
        return self.quantize(w).dequantize()

    def dequantized(self, w: torch.Tensor) -> torch.Tensor:
        """Alias of ``fake_quantize``."""
        return self.fake_quantize(w)

    def _key(self) -> tuple[Any, ...]:
        return (
            tuple(self.scale.tolist()), tuple(self.zero_point.tolist()), self.dtype,
            self.qscheme, self.ch_axis if self.is_per_channel else 0, self.qrange,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightQParams):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
