"""Range sanity after calibration: every activation observer's range is checked before
convert turns it into quantize / dequantize, so that a range which would silently ruin the
quantized model is fixed or reported, naming the node, its module path and source line.

========================  ================================================  =======================
finding (``kind``)        what it means                                     fix (``range_check="fix"``)
========================  ================================================  =======================
``overflow``              scale or range not finite, or a scale so large    keep the tensor float
                          that a product of two scales (the kernels'
                          requantization multipliers) overflows float32
                          (>= sqrt(float32 max) ~ 1.8e19): e.g. ``x * 1e38``
``infinite``              the observer dropped +-inf values (a ``-inf``     keep the tensor float
                          ``masked_fill``): quantizing clamps them to the
                          range's bound and the mask is lost
``far_values``            a few values far from the bulk take most of the   keep the tensor float
                          range (a ``-1e4`` additive attention mask): the
                          bulk gets fewer than ``min_bulk_levels`` levels
``wider_than_input``      an op that cannot widen its input's range (relu,  clip the output range to
                          pooling, clamp, ...) has a quantization range      the input's
                          ``wider_factor`` times its input's
``no_data``               the observer saw no data (a branch never run)     none: convert raises
                                                                            CalibrationDataError
========================  ================================================  =======================

``range_check="warn"`` reports the same findings (a :class:`~fxquant.errors.RangeWarning` each)
without changing anything; ``"off"`` skips the check. With ``"fix"`` a fix is applied and a
RangeWarning says so. Each finding is also recorded as a ``range_finding`` decision on the
observed node, which :mod:`fxquant.report` lists under "Range findings".

"Keep the tensor float" swaps the observer for a float placeholder: convert then leaves that
tensor unquantized, and the ops reading it run in float (lowering finds no quantize/dequantize
around them), each with its recorded reason.

The far-values test needs more than min and max: the min/max and histogram observers (and
the percentile / MSE / entropy ones) keep a small sorted sample of the values they saw
(``range_sample``, 4096 values, not in the state_dict; a loaded observer falls back to its
histogram). The bulk is the cluster nearest to 0 once the sorted values are split at their
widest gap. A two-valued tensor (a 0 / -1e4 mask itself, a 0 / 1 tensor) is quantized exactly
and is no finding.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.errors import RangeWarning
from fxquant.graph_edit import set_submodule
from fxquant.meta import qinfo, qinfo_or_none, record
from fxquant.records import Action, Role

__all__ = ["RANGE_CHECK_MODES", "RangeFinding", "RangeLimits", "check_ranges", "findings_of",
           "observer_range"]

RANGE_CHECK_MODES = ("fix", "warn", "off")
ACTION = Action.RANGE_FINDING
"""The decision action of a finding (on the observed node)."""

_SCALE_LIMIT = math.sqrt(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class RangeLimits:
    """The thresholds of the checks. ``min_bulk_levels``: fewer quantization levels than this
    across the bulk (the values near 0) is a far-values finding; ``wider_factor``: an output
    range this many times its input's is a wider-than-input finding; ``min_values`` /
    ``far_spreads``: a far-values finding needs that many observed values and values that
    many bulk widths away (a -1e4 mask is thousands; a Gaussian's tail of 8 samples is not).
    """

    min_bulk_levels: float = 16.0
    wider_factor: float = 1.5
    min_values: int = 64  # fewer observed values: no far-values finding
    far_spreads: float = 4.0  # far values lie this many bulk widths beyond the bulk


@dataclass(frozen=True)
class RangeFinding:
    """One finding about one observer: what, where and what was done."""

    kind: str  # overflow | infinite | far_values | wider_than_input | no_data
    observer: str  # the observer's attribute path
    node: str  # the observed node
    module_path: str
    source: str
    message: str
    fix: str  # what was done: "kept float", "clipped to [a, b]", "none (warn)"

    def describe(self) -> str:
        where = f"node '{self.node}'"
        if self.module_path:
            where += f" (module {self.module_path!r})"
        if self.source:
            where += f" at {self.source}"
        return f"{self.kind}: {where}: {self.message}; {self.fix}"


# ------------------------------------------------------------------------------- statistics
def _base(obs: nn.Module) -> nn.Module:
    """The statistics-holding observer: a fake-quant module's inner observer, or ``obs``."""
    inner = getattr(obs, "activation_post_process", None)
    return inner if isinstance(inner, nn.Module) and inner is not obs else obs


def observer_range(obs: nn.Module) -> Optional[tuple[float, float]]:
    """The float range [lo, hi] the observer's qparams cover (None without per-tensor qparams)."""
    try:
        scale, zp = obs.calculate_qparams()
    except (RuntimeError, ValueError):
        return None
    if scale.numel() != 1:
        return None
    s, z = float(scale.reshape(-1)[0]), float(zp.reshape(-1)[0])
    return (obs.quant_min - z) * s, (obs.quant_max - z) * s


def value_sketch(obs: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(sorted values, weights) of what the observer saw: its sample (``range_sample``, with
    its exact min and max added), or else its histogram's non-empty bin centers weighted by
    their counts (coarser: a cluster inside one bin looks constant). None without either."""
    lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
    if not isinstance(lo, torch.Tensor) or lo.numel() != 1 or not bool(torch.isfinite(lo)):
        return None
    ends = torch.tensor([float(lo), float(hi)], dtype=torch.float64)
    sample = getattr(obs, "range_sample", None)
    if isinstance(sample, torch.Tensor) and sample.numel():
        values = torch.cat([sample.double().cpu(), ends]).sort().values
        return values, torch.ones_like(values)
    hist = getattr(obs, "histogram", None)
    if not isinstance(hist, torch.Tensor) or hist.numel() < 2 or float(hi) <= float(lo):
        return None
    hist = hist.detach().double().cpu()
    edges = torch.linspace(float(lo), float(hi), hist.numel() + 1, dtype=torch.float64)
    keep = hist > 0
    return ((edges[:-1] + edges[1:])[keep] / 2), hist[keep]


def bulk_and_far(values: torch.Tensor, weights: torch.Tensor
                 ) -> Optional[tuple[float, float, float]]:
    """(bulk_lo, bulk_hi, far_share): the sorted ``values`` split at their widest gap into
    two clusters; the bulk is the one nearer to 0 (the heavier one at equal distance);
    far_share the other's share of the weight. None for fewer than two distinct values."""
    if values.numel() < 2:
        return None
    g = int(torch.argmax(values[1:] - values[:-1]))
    if float(values[g + 1] - values[g]) <= 0:
        return None
    a, b = (float(values[0]), float(values[g])), (float(values[g + 1]), float(values[-1]))
    mass_a, mass_b = float(weights[: g + 1].sum()), float(weights[g + 1:].sum())

    def dist(c: tuple[float, float]) -> float:
        return 0.0 if c[0] <= 0.0 <= c[1] else min(abs(c[0]), abs(c[1]))

    a_is_bulk = (dist(a), -mass_a) <= (dist(b), -mass_b)
    bulk, far_mass = (a, mass_b) if a_is_bulk else (b, mass_a)
    return bulk[0], bulk[1], far_mass / max(mass_a + mass_b, 1e-300)


# ---------------------------------------------------------------------------------- checks
def _overflow(obs: nn.Module) -> Optional[str]:
    try:
        scale, _ = obs.calculate_qparams()
    except (RuntimeError, ValueError):
        return None
    bad = scale[~torch.isfinite(scale) | (scale >= _SCALE_LIMIT)]
    if bad.numel():
        return (f"scale {float(bad.reshape(-1)[0]):.3g} overflows: int8 kernels multiply scales "
                f"(requantization) and any scale >= {_SCALE_LIMIT:.2g} overflows float32 there")
    return None


def _infinite(obs: nn.Module) -> Optional[str]:
    n = int(getattr(_base(obs), "ignored_infinities", 0) or 0)
    if n:
        return (f"{n} infinite values (a -inf mask?) were ignored by the observer; quantized, "
                "they would become the range's bound and the mask would be lost")
    return None


def _far_values(obs: nn.Module, limits: RangeLimits) -> Optional[str]:
    sketch = value_sketch(_base(obs))
    qrange = observer_range(obs)
    if sketch is None or qrange is None:
        return None
    if float(sketch[1].sum()) < limits.min_values:
        return None  # a handful of values: no telling an outlier from the distribution
    split = bulk_and_far(*sketch)
    if split is None:
        return None
    bulk_lo, bulk_hi, far = split
    step = (qrange[1] - qrange[0]) / max(obs.quant_max - obs.quant_min, 1)
    spread = bulk_hi - bulk_lo
    if spread <= 0 or step <= 0 or spread / step >= limits.min_bulk_levels:
        return None
    reach = limits.far_spreads * spread
    if not (qrange[0] < bulk_lo - reach or qrange[1] > bulk_hi + reach):
        return None  # the far values are clipped already, or not far: a long tail
    return (f"{100 * far:.3g}% of the values lie far from the bulk [{bulk_lo:.4g}, {bulk_hi:.4g}] "
            f"(a -1e4 additive mask?) and stretch the range to [{qrange[0]:.4g}, {qrange[1]:.4g}]"
            f": the bulk gets {spread / step:.1f} of {obs.quant_max - obs.quant_min + 1} levels")


# A node whose output range lies inside its (first) input's: its own observer should not be
# wider than the input's. The prepared graph went through normalize: canonical spellings only
# (fxquant.ops; x.relu() / nn.ReLU / nn.ReLU6 / nn.Hardtanh / x.clamp() / x.reshape() ... are
# F.relu / F.relu6 / F.hardtanh / torch.clamp / torch.reshape there, in place ones on a tensor
# with views too, as F.relu(..., inplace=True) ...). Dropout stays in training mode (QAT),
# nn.Identity too; pooling modules are F.max_pool2d / F.adaptive_avg_pool2d ... there.
_NON_WIDENING_MODULES = (nn.Dropout, nn.Identity)
_NON_WIDENING_FUNCTIONS = (F.relu, F.relu6, F.hardtanh, torch.clamp,
                           F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                           F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                           F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                           F.adaptive_max_pool3d, F.dropout, torch.flatten, torch.mean,
                           torch.reshape, torch.permute, torch.transpose)
_NON_WIDENING_METHODS = ("view", "contiguous")


def _non_widening(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        try:
            return isinstance(gm.get_submodule(str(node.target)), _NON_WIDENING_MODULES)
        except AttributeError:
            return False
    if node.op == "call_function":
        return node.target in _NON_WIDENING_FUNCTIONS
    return node.op == "call_method" and node.target in _NON_WIDENING_METHODS


def _is_observer_node(node: Any) -> bool:
    info = qinfo_or_none(node) if isinstance(node, fx.Node) else None
    return info is not None and node.op == "call_module" and info.role == Role.OBSERVER


def _observed(node: fx.Node) -> fx.Node:
    while _is_observer_node(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _input_observer(gm: fx.GraphModule, value: fx.Node) -> Optional[nn.Module]:
    """The observer module of ``value``'s first input (an observer node feeding it)."""
    if not value.args or not isinstance(value.args[0], fx.Node):
        return None
    src = value.args[0]
    if _is_observer_node(src):
        return gm.get_submodule(str(src.target))
    for user in src.users:
        if _is_observer_node(user):
            return gm.get_submodule(str(user.target))
    return None


def _wider(gm: fx.GraphModule, value: fx.Node, obs: nn.Module, limits: RangeLimits
           ) -> Optional[tuple[str, tuple[float, float]]]:
    if not _non_widening(gm, value):
        return None
    in_obs = _input_observer(gm, value)
    if in_obs is None or in_obs is obs:
        return None
    out_r, in_r = observer_range(obs), observer_range(in_obs)
    if out_r is None or in_r is None:
        return None
    if out_r[1] - out_r[0] <= limits.wider_factor * (in_r[1] - in_r[0]):
        return None
    clipped = (max(out_r[0], in_r[0]), min(out_r[1], in_r[1]))
    return (f"its range [{out_r[0]:.4g}, {out_r[1]:.4g}] is more than {limits.wider_factor}x its "
            f"input's [{in_r[0]:.4g}, {in_r[1]:.4g}], which this op cannot widen (values outside "
            f"the input's range were saturated by the input's quantization)", clipped)


# ----------------------------------------------------------------------------------- driver
def _is_checked(obs: nn.Module) -> bool:
    from fxquant.backends.reference_ops import INTEGER_DTYPES
    from fxquant.observers import FixedQParamsObserver

    return (getattr(obs, "dtype", None) in INTEGER_DTYPES and not getattr(obs, "is_dynamic", False)
            and not isinstance(_base(obs), FixedQParamsObserver)
            and hasattr(obs, "calculate_qparams"))


def _saw_no_data(obs: nn.Module) -> bool:
    min_val = getattr(_base(obs), "min_val", None)
    return isinstance(min_val, torch.Tensor) and (min_val.numel() == 0
                                                  or bool(torch.isinf(min_val).all()))


def _float_placeholder() -> nn.Module:
    from fxquant.observers import PlaceholderObserver

    return PlaceholderObserver(dtype=torch.float32)


def _clipped_observer(obs: nn.Module, lo: float, hi: float) -> nn.Module:
    """A fixed-qparams observer with the qparams of ``obs`` for the range [lo, hi]."""
    from fxquant.observers import FixedQParamsObserver

    base = _base(obs)
    scale, zp = base._calculate_qparams(torch.tensor(lo), torch.tensor(hi))
    return FixedQParamsObserver(float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]),
                                dtype=base.dtype, qscheme=base.qscheme,
                                quant_min=base.quant_min, quant_max=base.quant_max)


def _find(gm: fx.GraphModule, nodes: list[fx.Node], obs: nn.Module, limits: RangeLimits
          ) -> Optional[tuple[str, str, Optional[tuple[float, float]]]]:
    """(kind, message, clip range or None for keep-float) of the first finding, or None."""
    if _saw_no_data(obs):
        return None  # validate_calibrated / convert raise CalibrationDataError
    for kind, message in (("overflow", _overflow(obs)), ("infinite", _infinite(obs)),
                          ("far_values", _far_values(obs, limits))):
        if message:
            return kind, message, None
    for node in nodes:
        wider = _wider(gm, _observed(node), obs, limits)
        if wider is not None:
            return "wider_than_input", wider[0], wider[1]
    return None


def check_mode(mode: str) -> None:
    """ConfigError unless ``mode`` is one of RANGE_CHECK_MODES."""
    if mode not in RANGE_CHECK_MODES:
        from fxquant.errors import ConfigError

        raise ConfigError(f"range_check must be one of {RANGE_CHECK_MODES}, got {mode!r}",
                          hint="range_check='fix' (default), 'warn' or 'off'")


def check_ranges(gm: fx.GraphModule, mode: str = "fix", limits: RangeLimits = RangeLimits(),
                 pass_name: str = "convert") -> list[RangeFinding]:
    """Check every integer activation observer of the prepared ``gm``; with ``mode="fix"``
    apply each finding's fix (swap the observer module), with ``"warn"`` only report. Each
    finding is recorded on the observed node(s) and warned as a RangeWarning. Returns them."""
    check_mode(mode)
    if mode == "off":
        return []
    by_target: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if _is_observer_node(node):
            by_target.setdefault(str(node.target), []).append(node)
    findings = []
    for target, nodes in by_target.items():
        obs = gm.get_submodule(target)
        if not _is_checked(obs):
            continue
        found = _find(gm, nodes, obs, limits)
        if found is not None:
            findings.append(_report(gm, target, nodes, found, mode, pass_name))
    return findings


def _report(gm: fx.GraphModule, target: str, nodes: list[fx.Node],
            found: tuple[str, str, Optional[tuple[float, float]]], mode: str, pass_name: str
            ) -> RangeFinding:
    kind, message, clip = found
    obs = gm.get_submodule(target)
    if mode != "fix":
        fix = "not fixed (range_check='warn')"
    elif clip is None:
        fix = "kept float (the tensor is not quantized; the ops reading it run in float)"
        set_submodule(gm, target, _float_placeholder())
    else:
        fix = f"range clipped to the input's [{clip[0]:.4g}, {clip[1]:.4g}]"
        set_submodule(gm, target, _clipped_observer(obs, *clip))
    value = _observed(nodes[0])
    info = qinfo(value)
    others = [_observed(n).name for n in nodes[1:]]
    if others:
        message += f" (one observer shared with {', '.join(repr(n) for n in others)})"
    finding = RangeFinding(kind, target, value.name, info.module_path, info.source or "",
                           message, fix)
    for node in nodes:
        record(_observed(node), pass_name, ACTION, f"{kind}: {message}; {fix}",
               fixed=mode == "fix", **_fields(finding))
        if mode == "fix" and clip is None:
            record(_observed(node), pass_name, Action.KEEP_FLOAT,
                   f"range check ({kind}): output kept float, see the range findings")
    warnings.warn(f"fxquant range check: {finding.describe()}. "
                  + ("" if mode == "fix" else "convert_fx(..., range_check='fix') applies the fix; ")
                  + "see docs/calibration.md", RangeWarning, stacklevel=2)
    return finding


def findings_of(gm: fx.GraphModule) -> list[RangeFinding]:
    """Every range finding recorded on ``gm``'s nodes (graph order, one per observer)."""
    out: dict[str, RangeFinding] = {}
    for node in gm.graph.nodes:
        info = qinfo_or_none(node)
        for d in info.decisions if info is not None else ():
            if d.action == ACTION and all(f"range_{k}" in d.detail for k in _FIELDS):
                finding = RangeFinding(**{k: str(d.detail[f"range_{k}"]) for k in _FIELDS})
                out.setdefault(finding.observer, finding)
    return list(out.values())


_FIELDS = ("kind", "observer", "node", "module_path", "source", "message", "fix")


def _fields(finding: RangeFinding) -> dict[str, str]:
    """The finding as plain strings (decision details stay plain data: they are saved)."""
    return {f"range_{k}": getattr(finding, k) for k in _FIELDS}
