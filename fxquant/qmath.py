"""The quantization math of fxquant: integer ranges, scale / zero-point, histogram search.

This is the one module that owns quantization arithmetic; observers, fake-quant, the
passes and the backends call it instead of re-deriving formulas. Every function here
reproduces PyTorch's reference numerics *bit for bit*: the same tensor operations in the
same order and dtypes, because a 1-ulp difference in a scale changes quantized outputs.

Public functions
    quant_range(dtype, quant_min, quant_max, reduce_range)   integer range of a qdtype
    calculate_qparams(min_val, max_val, *, dtype, qscheme, ...)  scale / zero_point
    has_observed(min_val, max_val)                          were any statistics recorded?
    histogram_quantization_error(...)                       L2 error of a candidate range
    histogram_search_range(...)                             the non-linear min/max search
    combine_histograms(...)                                 fold an old histogram into a wider range
    dst_nbins(dtype)                                         number of quantization bins of a dtype

float16 (and other floating dtypes) have no qparams: observers for them pass data through.
"""

from __future__ import annotations

import bisect
import math
import struct
import warnings
from typing import Final

import torch

__all__ = [
    "PER_CHANNEL_QSCHEMES",
    "PER_TENSOR_QSCHEMES",
    "SUPPORTED_QSCHEMES",
    "SYMMETRIC_QSCHEMES",
    "calculate_qparams",
    "combine_histograms",
    "default_qparams",
    "dst_nbins",
    "has_observed",
    "histogram_quantization_error",
    "histogram_search_range",
    "is_float_dtype",
    "is_per_channel",
    "is_per_tensor",
    "is_symmetric",
    "quant_range",
    "upscale_histogram",
]

PER_TENSOR_QSCHEMES: Final = (torch.per_tensor_affine, torch.per_tensor_symmetric)
PER_CHANNEL_QSCHEMES: Final = (
    torch.per_channel_affine,
    torch.per_channel_symmetric,
    torch.per_channel_affine_float_qparams,
)
SUPPORTED_QSCHEMES: Final = PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES
SYMMETRIC_QSCHEMES: Final = (torch.per_tensor_symmetric, torch.per_channel_symmetric)

# Full integer range of each quantized dtype (and its plain-integer twin, as torch allows).
_FULL_RANGE: Final[dict[torch.dtype, tuple[int, int]]] = {
    torch.quint8: (0, 255),
    torch.uint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.int8: (-128, 127),
    torch.qint32: (-(2**31), 2**31 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
    torch.quint4x2: (0, 15),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.uint16: (0, 2**16 - 1),
}
# reduce_range drops one bit, but only for the 8-bit dtypes (as in torch).
_REDUCED_RANGE: Final[dict[torch.dtype, tuple[int, int]]] = {
    torch.quint8: (0, 127),
    torch.uint8: (0, 127),
    torch.qint8: (-64, 63),
    torch.int8: (-64, 63),
}
_UNSIGNED_8BIT: Final = (torch.quint8, torch.uint8)


def is_per_tensor(qscheme: torch.qscheme) -> bool:
    return qscheme in PER_TENSOR_QSCHEMES


def is_per_channel(qscheme: torch.qscheme) -> bool:
    return qscheme in PER_CHANNEL_QSCHEMES


def is_symmetric(qscheme: torch.qscheme) -> bool:
    return qscheme in SYMMETRIC_QSCHEMES


def is_float_dtype(dtype: torch.dtype) -> bool:
    """True for float16/bfloat16/float32/...: such "quantization" needs no qparams."""
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _supported_dtypes_text() -> str:
    return ", ".join(str(d) for d in _FULL_RANGE)


def _check_int_dtype(dtype: torch.dtype) -> None:
    if dtype in _FULL_RANGE:
        return
    if is_float_dtype(dtype):
        raise ValueError(
            f"dtype {dtype} has no integer quantization range: floating dtypes carry no "
            "qparams; use PlaceholderObserver(dtype=...) for them"
        )
    raise ValueError(f"unsupported quantized dtype {dtype!r}; use one of: {_supported_dtypes_text()}")


def _check_custom_range(dtype: torch.dtype, quant_min: int, quant_max: int) -> None:
    if not quant_min <= 0 <= quant_max:
        raise ValueError(
            f"custom quantization range [{quant_min}, {quant_max}] must include 0; "
            "choose quant_min <= 0 <= quant_max"
        )
    if quant_min >= quant_max:
        raise ValueError(
            f"custom quantization range needs quant_min < quant_max, got [{quant_min}, {quant_max}]"
        )
    lo, hi = _FULL_RANGE[dtype]
    if quant_min < lo or quant_max > hi:
        raise ValueError(
            f"custom quantization range [{quant_min}, {quant_max}] does not fit {dtype}, "
            f"whose range is [{lo}, {hi}]"
        )


def quant_range(
    dtype: torch.dtype,
    quant_min: int | None = None,
    quant_max: int | None = None,
    reduce_range: bool = False,
) -> tuple[int, int]:
    """The integer range [quant_min, quant_max] an observer of `dtype` quantizes to.

    Without a custom range: the dtype's full range, or one bit less for 8-bit dtypes with
    ``reduce_range`` (quint8 0..127, qint8 -64..63). With a custom range (both bounds given)
    it must include 0, be non-empty and fit the dtype; ``reduce_range`` then halves both
    bounds with floor division, exactly as torch does.
    """
    _check_int_dtype(dtype)
    if (quant_min is None) != (quant_max is None):
        raise ValueError(
            f"give both quant_min and quant_max or neither (got quant_min={quant_min}, "
            f"quant_max={quant_max})"
        )
    if quant_min is None or quant_max is None:
        if reduce_range and dtype in _REDUCED_RANGE:
            return _REDUCED_RANGE[dtype]
        return _FULL_RANGE[dtype]
    quant_min, quant_max = int(quant_min), int(quant_max)
    _check_custom_range(dtype, quant_min, quant_max)
    if not reduce_range:
        return quant_min, quant_max
    if quant_min // 2 >= quant_max // 2:
        raise ValueError(
            f"reduce_range=True halves the custom range [{quant_min}, {quant_max}] to nothing "
            f"([{quant_min // 2}, {quant_max // 2}]); widen the range or drop reduce_range"
        )
    return quant_min // 2, quant_max // 2


def dst_nbins(dtype: torch.dtype) -> int:
    """Number of quantization bins the histogram search targets: 2 ** bits of the dtype's storage."""
    _check_int_dtype(dtype)
    return 2 ** torch.iinfo(dtype).bits


def default_qparams(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """What an observer that saw no data reports: scale 1.0, zero_point 0 (float32, int64)."""
    device_type = torch.device(device).type
    return torch.tensor([1.0], device=device_type), torch.tensor([0], device=device_type)


def has_observed(min_val: torch.Tensor, max_val: torch.Tensor) -> bool:
    """Whether (min_val, max_val) hold recorded statistics.

    False, with a warning, for empty per-channel buffers and for the (inf, -inf) start value
    of per-tensor ones. Raises when a minimum exceeds its maximum (corrupt statistics).
    """
    if min_val.numel() == 0 or max_val.numel() == 0:
        _warn_unobserved()
        return False
    if min_val.dim() == 0 or max_val.dim() == 0:
        if min_val == float("inf") and max_val == float("-inf"):
            _warn_unobserved()
            return False
    if torch.any(min_val > max_val):
        raise ValueError(
            f"observer statistics are corrupt: min_val {min_val} exceeds max_val {max_val}; "
            "reset the observer (reset_min_max_vals) and calibrate again"
        )
    return True


def _warn_unobserved() -> None:
    warnings.warn(
        "observer has seen no data; returning scale=1.0, zero_point=0. Run calibration "
        "inputs through the prepared model before calculate_qparams/convert",
        UserWarning,
        stacklevel=3,
    )


def _eps_tensor(eps: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(eps, torch.Tensor):
        return eps.to(device)
    return torch.tensor([eps], dtype=torch.float32, device=device)


def _symmetric_zero_point(
    zero_point: torch.Tensor, dtype: torch.dtype, quant_min: int, quant_max: int, custom_range: bool
) -> torch.Tensor:
    if dtype in _UNSIGNED_8BIT:
        mid = (quant_min + quant_max) // 2 if custom_range else 128
        return zero_point.new_full(zero_point.size(), mid)
    if dtype == torch.uint16:
        return zero_point.new_full(zero_point.size(), 2**15)
    return zero_point


def _as_1d(
    scale: torch.Tensor, zero_point: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Scalars become shape-[1] tensors, matching the shape fake-quant modules default to.
    if scale.dim() == 0:
        scale = torch.tensor([float(scale)], dtype=scale.dtype, device=device)
    if zero_point.dim() == 0:
        zero_point = torch.tensor([zero_point.item()], dtype=zero_point.dtype, device=device)
    return scale, zero_point


def calculate_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    *,
    dtype: torch.dtype,
    qscheme: torch.qscheme,
    quant_min: int,
    quant_max: int,
    eps: float | torch.Tensor = torch.finfo(torch.float32).eps,
    custom_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the observed range [min_val, max_val] (0-dim or per channel).

    Bit-identical to torch's ``UniformQuantizationObserverBase._calculate_qparams``:
      * affine: the range is widened to include 0, scale = range / (qmax - qmin) floored at
        eps, zero_point = qmin - round(min / scale) clamped into range (int32 tensor);
      * symmetric: scale = max(|min|, |max|) / ((qmax - qmin) / 2) floored at eps;
        zero_point 0 (int64), or the range midpoint for unsigned 8-bit dtypes (128, or
        (qmin + qmax) // 2 when ``custom_range`` is set);
      * per_channel_affine_float_qparams (embeddings): scale = (max - min) / (qmax - qmin),
        1.0 where not above eps, and a float zero_point = -min / scale.
    Unobserved statistics give scale [1.0], zero_point [0] with a warning.
    `quant_min`/`quant_max` are the effective range (see :func:`quant_range`).
    """
    if qscheme not in SUPPORTED_QSCHEMES:
        raise ValueError(f"unsupported qscheme {qscheme}; use one of {SUPPORTED_QSCHEMES}")
    if not has_observed(min_val, max_val):
        return default_qparams(min_val.device)
    device = min_val.device
    eps_t = _eps_tensor(eps, device)
    min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
    zero_point = torch.zeros(min_val_neg.size(), dtype=torch.int64, device=device)
    if is_symmetric(qscheme):
        max_val_pos = torch.max(-min_val_neg, max_val_pos)
        scale = torch.max(max_val_pos / (float(quant_max - quant_min) / 2), eps_t)
        zero_point = _symmetric_zero_point(zero_point, dtype, quant_min, quant_max, custom_range)
    elif qscheme == torch.per_channel_affine_float_qparams:
        scale = (max_val - min_val) / float(quant_max - quant_min)
        scale = torch.where(scale > eps_t, scale, torch.ones_like(scale))
        zero_point = -1 * min_val / scale
    else:
        scale = torch.max((max_val_pos - min_val_neg) / float(quant_max - quant_min), eps_t)
        zero_point = quant_min - torch.round(min_val_neg / scale).to(torch.int)
        zero_point = torch.clamp(zero_point, quant_min, quant_max)
    return _as_1d(scale, zero_point, device)


# ----------------------------------------------------------------------------------------
# Histogram math (HistogramObserver). A histogram of `bins` equal bins spans [min, max].
# ----------------------------------------------------------------------------------------


def _l2_norm(delta_begin: torch.Tensor, delta_end: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """density * integral of x^2 over [delta_begin, delta_end]."""
    norm = (delta_end * delta_end * delta_end - delta_begin * delta_begin * delta_begin) / 3
    return density * norm


def histogram_quantization_error(
    histogram: torch.Tensor,
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    start_bin: int,
    end_bin: int,
    n_dst_bins: int,
) -> float:
    """L2 quantization error of clipping the histogram to bins [start_bin, end_bin] and
    quantizing that span uniformly into `n_dst_bins` levels (values assumed uniform per bin)."""
    bins = histogram.numel()
    device = histogram.device
    bin_width = (max_val.item() - min_val.item()) / bins
    dst_width = bin_width * (end_bin - start_bin + 1) / n_dst_bins
    if dst_width == 0.0:
        return 0.0
    src_begin = (torch.arange(bins, device=device) - start_bin) * bin_width
    src_end = src_begin + bin_width
    dst_of_begin = torch.clamp(torch.div(src_begin, dst_width, rounding_mode="floor"), 0, n_dst_bins - 1)
    dst_of_end = torch.clamp(torch.div(src_end, dst_width, rounding_mode="floor"), 0, n_dst_bins - 1)
    density = histogram / bin_width
    half = dst_width / 2
    norm = torch.zeros(bins, device=device)
    # partial first destination bin, whole destination bins in between, partial last one
    norm += _l2_norm(src_begin - (dst_of_begin + 0.5) * dst_width, torch.ones(bins, device=device) * half, density)
    norm += (dst_of_end - dst_of_begin - 1) * _l2_norm(torch.tensor(-half), torch.tensor(half), density)
    norm += _l2_norm(torch.tensor(-half), src_end - (dst_of_end * dst_width + half), density)
    return norm.sum().item()


class _CumSum:
    """Quantile lookups on the histogram's cumulative sum, as torch's search loop does them.

    torch compares ``cSum[i] < python_float``; the float is first cast to cSum's dtype, which
    we reproduce. The cumulative sum of non-negative counts is monotone, so the linear scans
    become bisections (with a linear fallback should rounding ever break monotonicity).
    """

    def __init__(self, histogram: torch.Tensor) -> None:
        csum = torch.cumsum(histogram, dim=0)
        self.values: list[float] = csum.tolist()
        self.is_f32 = csum.dtype == torch.float32
        self.monotone = bool((csum[1:] >= csum[:-1]).all()) if csum.numel() > 1 else True

    def _cast(self, x: float) -> float:
        if not self.is_f32:
            return x
        try:
            return struct.unpack("f", struct.pack("f", x))[0]
        except OverflowError:
            return float("inf") if x > 0 else float("-inf")

    def first_at_least(self, threshold: float, lo: int, hi: int) -> int:
        """First i in [lo, hi) with cs[i] >= threshold, else hi."""
        t = self._cast(threshold)
        if self.monotone:
            return bisect.bisect_left(self.values, t, lo, hi)
        i = lo
        while i < hi and self.values[i] < t:
            i += 1
        return i

    def last_at_most(self, threshold: float, lo: int, hi: int) -> int:
        """Last i in (lo, hi] with cs[i] <= threshold, else lo."""
        t = self._cast(threshold)
        if self.monotone:
            return bisect.bisect_right(self.values, t, lo + 1, hi + 1) - 1
        i = hi
        while i > lo and self.values[i] > t:
            i -= 1
        return i


def histogram_search_range(
    histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor, n_dst_bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-linear search for the clipping range [new_min, new_max] minimizing L2 error.

    The caffe2 NormMinimization search torch uses: alternately move the lower or upper
    quantile bound inwards in steps of 1e-5 of the total mass, evaluate the quantization
    error of the trimmed bin span, stop as soon as the error grows.
    """
    bins = histogram.numel()
    bin_width = (max_val - min_val) / bins
    total = torch.sum(histogram).item()
    csum = _CumSum(histogram)
    stepsize = 1e-5
    alpha, beta = 0.0, 1.0
    start_bin, end_bin = 0, bins - 1
    norm_min = float("inf")
    while alpha < beta:
        next_alpha, next_beta = alpha + stepsize, beta - stepsize
        left = csum.first_at_least(next_alpha * total, start_bin, end_bin)
        right = csum.last_at_most(next_beta * total, start_bin, end_bin)
        next_start, next_end = start_bin, end_bin
        if (left - start_bin) > (end_bin - right):
            next_start, alpha = left, next_alpha
        else:
            next_end, beta = right, next_beta
        if next_start == start_bin and next_end == end_bin:
            continue
        norm = histogram_quantization_error(histogram, min_val, max_val, next_start, next_end, n_dst_bins)
        if norm > norm_min:
            break
        norm_min, start_bin, end_bin = norm, next_start, next_end
    return min_val + bin_width * start_bin, min_val + bin_width * (end_bin + 1)


def upscale_histogram(
    histogram: torch.Tensor,
    orig_min: torch.Tensor,
    orig_max: torch.Tensor,
    new_min: torch.Tensor,
    new_max: torch.Tensor,
    upsample_rate: int = 16,
) -> torch.Tensor:
    """Re-bin a histogram over [orig_min, orig_max] into the same number of bins over the
    wider [new_min, new_max]: each bin is split into `upsample_rate` pieces whose mid-points
    are assigned to the new bins."""
    bins = histogram.numel()
    fine = histogram.repeat_interleave(upsample_rate) / upsample_rate
    fine_width = (orig_max - orig_min) / (bins * upsample_rate)
    edges = torch.linspace(orig_min, orig_max, bins * upsample_rate + 1, device=orig_min.device)
    mid_points = edges[:-1].to(histogram.device) + 0.5 * fine_width
    new_edges = torch.linspace(new_min, new_max, bins + 1, device=new_min.device).to(histogram.device)
    assignment = torch.bucketize(mid_points, new_edges, right=True) - 1
    assignment[assignment >= bins] = bins - 1  # numerical spill-over at either end
    assignment[assignment < 0] = 0
    return torch.bincount(assignment, weights=fine, minlength=bins)


def combine_histograms(
    orig_hist: torch.Tensor,
    orig_min: torch.Tensor,
    orig_max: torch.Tensor,
    update_hist: torch.Tensor,
    new_min: torch.Tensor,
    new_max: torch.Tensor,
    upsample_rate: int = 16,
) -> torch.Tensor:
    """Sum of `update_hist` (already over [new_min, new_max]) and `orig_hist` re-binned there."""
    if new_min == orig_min and new_max == orig_max:
        return orig_hist + update_hist
    bins = orig_hist.numel()
    if orig_min == orig_max:  # all old mass sits at one value
        mass = torch.sum(orig_hist)
        return torch.histc(orig_min, bins=bins, min=new_min, max=new_max) * mass + update_hist
    if new_min > orig_min or new_max < orig_max:
        raise ValueError(
            f"combine_histograms: new range [{new_min}, {new_max}] must contain the old range "
            f"[{orig_min}, {orig_max}]"
        )
    return update_hist + upscale_histogram(orig_hist, orig_min, orig_max, new_min, new_max, upsample_rate)


# ----------------------------------------------------------------------------------------
# Clipping-range searches of the calibration observers (PercentileObserver, MSEObserver,
# EntropyObserver). Each takes a histogram of `bins` equal bins over [min_val, max_val] and
# returns the clipping range (new_min, new_max) as 0-dim tensors; calculate_qparams turns
# the range into (scale, zero_point) as for every other observer.
# ----------------------------------------------------------------------------------------


def _bin_edges(histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """The bins + 1 edges of a histogram over [min_val, max_val] (float64, for the search)."""
    return torch.linspace(float(min_val), float(max_val), histogram.numel() + 1, dtype=torch.float64)


def histogram_quantile(histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor,
                       q: float) -> float:
    """The value below which a fraction ``q`` of the histogram's mass lies (linear inside a
    bin: values are taken as uniform within each bin)."""
    hist = histogram.detach().to(torch.float64).cpu()
    edges = _bin_edges(hist, min_val, max_val)
    total = float(hist.sum())
    if total <= 0:
        return float(min_val)
    csum = torch.cumsum(hist, 0)
    target = min(max(q, 0.0), 1.0) * total
    i = min(int(torch.searchsorted(csum, torch.tensor([target], dtype=torch.float64))[0]), hist.numel() - 1)
    before = float(csum[i - 1]) if i > 0 else 0.0
    inside = float(hist[i])
    frac = (target - before) / inside if inside > 0 else 0.0
    return float(edges[i] + min(max(frac, 0.0), 1.0) * (edges[i + 1] - edges[i]))


def histogram_percentile_range(histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor,
                               percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[q_lo, q_hi]: the (100 - percentile)% and percentile% quantiles of the histogram; the
    tails beyond them (outliers) are clipped. A tail of exactly one side (ReLU outputs) is
    left at its observed bound (its quantile is the bound)."""
    lo = histogram_quantile(histogram, min_val, max_val, 1.0 - percentile / 100.0)
    hi = histogram_quantile(histogram, min_val, max_val, percentile / 100.0)
    return (torch.tensor(max(lo, float(min_val)), dtype=min_val.dtype),
            torch.tensor(min(hi, float(max_val)), dtype=max_val.dtype))


def _prefix_moments(histogram: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[3, bins + 1]: prefix sums of n, n * c and n * c**2 (n: counts, c: bin centers)."""
    moments = torch.stack([histogram, histogram * centers, histogram * centers * centers])
    return torch.nn.functional.pad(torch.cumsum(moments, dim=1), (1, 0))


def clipping_mse(histogram: torch.Tensor, centers: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 levels: int) -> torch.Tensor:
    """Expected squared quantization error of the histogram's values (at their bin centers,
    ascending) for clipping ranges [lo, hi] (broadcast against each other) on a uniform grid
    of ``levels`` values: a value inside the range costs the rounding noise step**2 / 12, a
    value outside it its squared distance to the nearer bound (it saturates). Prefix sums of
    the moments make each candidate O(log bins)."""
    m = _prefix_moments(histogram, centers)
    lo, hi = torch.broadcast_tensors(lo, hi)
    i_lo = torch.searchsorted(centers, lo.contiguous(), right=False)  # centers below lo: [0, i_lo)
    i_hi = torch.searchsorted(centers, hi.contiguous(), right=True)  # centers above hi: [i_hi, bins)
    n, s1, s2 = m[0], m[1], m[2]
    below = lo * lo * n[i_lo] - 2 * lo * s1[i_lo] + s2[i_lo]
    above = (s2[-1] - s2[i_hi]) - 2 * hi * (s1[-1] - s1[i_hi]) + hi * hi * (n[-1] - n[i_hi])
    step = (hi - lo) / max(levels - 1, 1)
    inside = (n[i_hi] - n[i_lo]).clamp_min(0) * step * step / 12
    return below.clamp_min(0) + above.clamp_min(0) + inside


def histogram_mse_range(histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor,
                        levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range minimizing :func:`clipping_mse` on a grid of ``levels`` values.

    The affine grid always holds 0, so the lower bound is searched among the bin edges at or
    below 0 (or min_val) and the upper one among those at or above 0 (or max_val), by
    coordinate descent (:func:`_mse_search`)."""
    hist = histogram.detach().to(torch.float64).cpu()
    edges = _bin_edges(hist, min_val, max_val)
    centers = (edges[:-1] + edges[1:]) / 2
    lows = edges[edges <= max(0.0, float(min_val))]
    highs = edges[edges >= min(0.0, float(max_val))]
    lows = lows if lows.numel() else edges[:1]
    highs = highs if highs.numel() else edges[-1:]
    lo, hi = _mse_search(hist, centers, lows, highs, levels)
    return (torch.tensor(max(lo, float(min_val)), dtype=min_val.dtype),
            torch.tensor(min(hi, float(max_val)), dtype=max_val.dtype))


def _mse_search(hist: torch.Tensor, centers: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor,
                levels: int, rounds: int = 4) -> tuple[float, float]:
    """Coordinate descent: the best upper bound for the current lower one over every
    candidate, then the best lower bound for it, ``rounds`` times (each an exhaustive
    vectorized 1-D search; the bounds interact only through the step, so this settles fast)."""
    lo, hi = lows[:1], highs[-1:]
    for _ in range(rounds):
        hi = highs[int(torch.argmin(clipping_mse(hist, centers, lo, highs, levels)))].reshape(1)
        lo = lows[int(torch.argmin(clipping_mse(hist, centers, lows, hi, levels)))].reshape(1)
    return float(lo), float(hi)


def abs_histogram(histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor
                  ) -> tuple[torch.Tensor, float]:
    """The histogram of |x| over [0, max(|min_val|, |max_val|)] with as many bins, built from
    the bin centers of the signed one; and that upper bound."""
    hist = histogram.detach().to(torch.float64).cpu()
    edges = _bin_edges(hist, min_val, max_val)
    centers = ((edges[:-1] + edges[1:]) / 2).abs()
    amax = max(abs(float(min_val)), abs(float(max_val)))
    bins = hist.numel()
    if amax == 0.0:
        return hist, amax
    index = (centers / amax * bins).floor().long().clamp(0, bins - 1)
    return torch.bincount(index, weights=hist, minlength=bins), amax


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * x.clamp_min(1e-300).log(), torch.zeros_like(x))


def kl_divergences_of_thresholds(hist: torch.Tensor, thresholds: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) for each TensorRT threshold bin i in ``thresholds`` (each >= ``levels``):
    P is hist[:i] with the clipped tail's mass added to its last bin; Q is hist[:i] merged
    into ``levels`` bins (source bin j into floor(j * levels / i)) and spread back evenly over
    the non-empty source bins of each. Where P has mass and Q none (the tail's bin, empty in
    the histogram) Q is taken as 1e-12: a large, finite penalty. Computed from prefix sums,
    O(levels) per threshold."""
    h = hist.to(torch.float64)
    pad = torch.nn.functional.pad
    c, nz, hl = (pad(torch.cumsum(v, 0), (1, 0)) for v in (h, (h > 0).to(h.dtype), _xlogx(h)))
    total = c[-1]
    i = thresholds.to(torch.long)[:, None]
    d = torch.arange(levels + 1)[None, :]
    edges = torch.div(d * i + levels - 1, levels, rounding_mode="floor")  # chunk starts, then i
    mass, cnt = c[edges[:, 1:]] - c[edges[:, :-1]], nz[edges[:, 1:]] - nz[edges[:, :-1]]
    q = mass / cnt.clamp_min(1)  # per source bin of each chunk
    qt = c[i[:, 0]]
    log_q = torch.where(cnt > 0, (q / qt[:, None]).clamp_min(1e-300).log(), torch.zeros_like(q))
    last = h[i[:, 0] - 1]
    p_last = last + (total - qt)
    log_q_last = torch.where(last > 0, log_q[:, -1], torch.full_like(last, math.log(1e-12)))
    body = (hl[i[:, 0] - 1] - c[i[:, 0] - 1] * total.log()) / total  # sum over j < i - 1 of p log p
    body = body - ((mass * log_q).sum(dim=1) - last * log_q[:, -1]) / total
    tail = torch.where(p_last > 0, p_last / total * ((p_last / total).clamp_min(1e-300).log() - log_q_last),
                       torch.zeros_like(p_last))
    return body + tail


ENTROPY_MIN_VALUES_PER_LEVEL: Final = 16
"""Below this many observed values per quantization level the KL divergence of a sparse
histogram is noise (it picks arbitrary small thresholds): the entropy search then keeps the
observed range."""


def histogram_entropy_range(histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor,
                            levels: int, max_candidates: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT's entropy calibration: the threshold t on |x| minimizing the KL divergence
    between the distribution of |x| clipped at t and its quantization into ``levels`` bins;
    the range is [-t, t] cut to the observed [min_val, max_val] (so [0, t] after a ReLU).
    Thresholds are tried at every bin from ``levels`` on (at most ``max_candidates`` of them,
    evenly spaced). With fewer than ENTROPY_MIN_VALUES_PER_LEVEL * levels values the
    observed range is kept."""
    hist, amax = abs_histogram(histogram, min_val, max_val)
    bins = hist.numel()
    if amax == 0.0 or bins <= levels or float(hist.sum()) < ENTROPY_MIN_VALUES_PER_LEVEL * levels:
        return min_val, max_val
    # the spike of exact zeros after a ReLU would make the search clip hard (1.9 sigma of a
    # half-normal instead of 3.8): its bin gets its neighbour's count, as NVIDIA's
    # pytorch-quantization does before the same search
    hist[0] = hist[1]
    stride = max(1, -(-(bins - levels) // max_candidates))
    candidates = list(range(levels, bins + 1, stride))
    if candidates[-1] != bins:
        candidates.append(bins)
    divergences = kl_divergences_of_thresholds(hist, torch.tensor(candidates), levels)
    best = candidates[int(torch.argmin(divergences))]
    t = amax * best / bins
    return (torch.tensor(max(-t, float(min_val)), dtype=min_val.dtype),
            torch.tensor(min(t, float(max_val)), dtype=max_val.dtype))


def add_scalar_qparams(scale: float, zero_point: int, qmin: int, qmax: int, c: float
                       ) -> tuple[float, int]:
    """Output qparams of ``quantized::add_scalar`` (torch's rule): ``x + c`` keeps the scale
    and moves the zero point by ``c`` in steps (the integers are unchanged); when the moved
    zero point leaves [qmin, qmax] the zero point pins to that end and the scale widens so
    the shifted range fits. ``c`` in steps rounds half away from zero (``std::round``)."""
    steps = math.floor(abs(c / scale) + 0.5) * (1 if c >= 0 else -1)
    moved = zero_point - steps
    if moved < qmin:
        return (qmax - moved) / (qmax - qmin) * scale, qmin
    if moved > qmax:
        return (moved - qmin) / (qmax - qmin) * scale, qmax
    return scale, int(moved)


def mul_scalar_qparams(scale: float, zero_point: int, qmin: int, qmax: int, c: float
                       ) -> tuple[float, int]:
    """Output qparams of ``quantized::mul_scalar`` (torch's rule): the scale times ``|c|``;
    a negative ``c`` mirrors the zero point; ``c == 0`` gives scale 1, zero point 0."""
    if c == 0:
        return 1.0, 0
    if c > 0:
        return c * scale, zero_point
    return abs(c) * scale, qmax - (zero_point - qmin)
