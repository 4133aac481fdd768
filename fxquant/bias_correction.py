"""Bias correction: remove the mean output shift that quantization adds to each conv / linear.

Rounding weights (and, upstream, activations) to int8 does not only add noise: it shifts the
*mean* of each output channel, and layers downstream (BatchNorm folded in, ReLU6 clipping,
softmax) turn a mean shift into wrong answers far more than they do zero-mean noise. Empirical
bias correction (Nagel et al., "Data-Free Quantization", 2019, sec. 4.2; NNCF and OpenVINO do
the same) measures, on the calibration data the user already has, the per-channel mean of

    (W_q x_q + b) - (W x + b)        pre-activation, quantized model minus float model

for each weighted layer and subtracts it from the layer's bias (a bias is created where the
layer had none). Layers are corrected in graph order and each one is measured with every layer
before it already corrected (``sequential=True``, one pass over the data per layer), so a
correction also absorbs the shift its inputs still carry. ``sequential=False`` takes one pass
and removes only the shift each layer's own weight rounding adds, ``(W_q - W) x_q``: measuring
the total shift of every layer in the same pass would correct an upstream shift twice.

    prepared = fxquant.prepare_fx(model, mapping, example_inputs)
    for x in calib: prepared(x)
    quantized = fxquant.bias_correction(prepared, calib)            # converts, then corrects
    # or, on a model already converted (native or reference graph):
    quantized = fxquant.bias_correction(fxquant.convert_fx(prepared), calib, reference=prepared)

The float side is the prepared model itself (its ops are float, BatchNorm is folded in, the
observers only watch: it runs on a copy, so its statistics are untouched) or the float model
(traced and fused here so that module paths match). Pre-activations are computed from each
layer's input as ``conv(x, W, b)`` with the weight the kernel uses (dequantized), so a fused
ReLU / ReLU6 does not hide the shift.

What each layer got is in ``result.meta["fxquant_bias_correction"]`` (a
:class:`BiasCorrectionReport`) and in a ``bias_correction`` decision on its node. The corrected
bias is an ordinary bias: ``state_dict`` / ``load_state_dict`` carry it. ``fxquant.save``
files re-convert from the prepared state on load and therefore do not carry it (save the
``state_dict`` and load it into the converted model).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.compare import _engine_of, batches_of
from fxquant.errors import FxQuantError
from fxquant.meta import record
from fxquant.records import Action, Stage
from fxquant.options import options_of
from fxquant.nn.bias import float_core, pre_activation, quantized_core, set_bias, weight_and_bias
from fxquant.status import graph_stage

REPORT_KEY = "fxquant_bias_correction"
PASS_NAME = "bias_correction"


@dataclass
class LayerCorrection:
    """The per-channel shift removed from one layer's bias."""

    name: str  # module path
    channels: int
    mean_abs_shift: float  # mean over channels of |shift|
    max_abs_shift: float
    shift_to_std: float  # mean |shift| / the float pre-activation's std: how much it mattered


@dataclass
class BiasCorrectionReport:
    layers: list[LayerCorrection] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module path -> why not corrected

    def to_text(self) -> str:
        lines = [f"{'layer':<32} {'ch':>4} {'mean |shift|':>13} {'max |shift|':>12} "
                 f"{'shift/std':>9}"]
        for lc in self.layers:
            lines.append(f"{lc.name[:32]:<32} {lc.channels:>4} {lc.mean_abs_shift:>13.4g} "
                         f"{lc.max_abs_shift:>12.4g} {lc.shift_to_std:>9.3f}")
        lines += [f"skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class _Layer:
    node: fx.Node
    path: str
    qcore: nn.Module  # in the quantized model
    fcore: nn.Module  # in the float reference (its geometry also computes the quantized side)


class _ChannelMean:
    """Running per-channel sum / sum of squares of pre-activations (channel: dim 1 of a conv
    output, the last dim of a linear one)."""

    def __init__(self) -> None:
        self.sum: Optional[torch.Tensor] = None
        self.sq: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, y: torch.Tensor, linear: bool) -> None:
        y = y.detach().double()
        y = y.reshape(-1, y.shape[-1]) if linear else y.transpose(0, 1).reshape(y.shape[1], -1).T
        s, q = y.sum(0), (y * y).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        self.count += y.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def std(self) -> torch.Tensor:
        return (self.sq / self.count - self.mean() ** 2).clamp_min(0).sqrt()


def bias_correction(model: nn.Module, calib_data: Any, reference: Optional[nn.Module] = None, *,
                    sequential: bool = True,
                    progress: Optional[Callable[[LayerCorrection], None]] = None) -> fx.GraphModule:
    """A bias-corrected copy of a quantized model (see the module docstring).

    ``model``: a calibrated prepared model (it is converted with :func:`fxquant.convert_fx`
    and is also the float reference), or a converted / reference GraphModule, which needs
    ``reference``: the prepared model it was converted from, or the float model.
    ``calib_data``: a tensor, a tuple of forward's arguments, or a list of such batches (the
    data the model was calibrated with is the natural choice).
    ``sequential``: measure each layer after correcting those before it (one pass over the
    data per layer), which also removes the shift its input carries; False corrects, in one
    pass, only the shift each layer's own weight rounding adds to the input it gets.
    ``progress``: called with each layer's :class:`LayerCorrection` as it is done."""
    quantized, ref = _models(model, reference)
    batches = batches_of(calib_data)
    if not batches:
        raise FxQuantError("bias_correction: calib_data holds no batch",
                           hint="pass the calibration batches the model was calibrated with")
    report = BiasCorrectionReport()
    layers = _layers(quantized, ref, report)
    float_stats = _float_stats(ref, layers, batches)
    with _engine_of(quantized):
        pending = list(layers)
        while pending:
            todo = pending[:1] if sequential else pending
            q_stats = _quantized_stats(quantized, todo, batches, local=not sequential)
            for layer in todo:
                lc = _correct(layer, q_stats[layer.path], float_stats[layer.path], sequential)
                report.layers.append(lc)
                if progress is not None:
                    progress(lc)
            pending = pending[len(todo):]
    quantized.meta[REPORT_KEY] = report
    return quantized


def _models(model: nn.Module, reference: Optional[nn.Module]) -> tuple[fx.GraphModule, nn.Module]:
    """(a converted copy to correct, the float reference run on a copy)."""
    from fxquant.api import convert_fx, fuse_fx

    if not isinstance(model, fx.GraphModule):
        raise FxQuantError(f"bias_correction needs a GraphModule, got {type(model).__name__}",
                           hint="a model prepared piece by piece (fallback) is not supported; "
                                "correct each prepared piece")
    stage = graph_stage(model)
    if stage == "prepared":
        if getattr(options_of(model), "is_qat", False):
            raise FxQuantError("bias_correction: a QAT model has no float reference to "
                               "measure against", hint="QAT learns its own biases")
        reference = reference if reference is not None else model
        model = convert_fx(model)
    elif reference is None:
        raise FxQuantError(f"bias_correction: a {stage} model needs reference=",
                           hint="pass the prepared model it was converted from, or the float "
                                "model (or pass the calibrated prepared model itself)")
    else:
        model = copy.deepcopy(model)
    if isinstance(reference, fx.GraphModule) and graph_stage(reference) == Stage.PREPARED:
        ref = copy.deepcopy(reference)
    else:
        trace_config = getattr(options_of(model), "trace_config", None)
        kw = {}
        if trace_config is not None:
            kw = {"leaf_modules": trace_config.leaf_classes, "leaf_names": trace_config.leaf_names}
        ref = fuse_fx(copy.deepcopy(reference).eval(), verify=False, **kw)
    return model, ref.eval()


def _layers(quantized: fx.GraphModule, ref: nn.Module, report: BiasCorrectionReport
            ) -> list[_Layer]:
    layers, seen = [], set()
    for node in quantized.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        path = str(node.target)
        qcore = quantized_core(quantized.get_submodule(path))
        if qcore is None:
            continue
        try:
            fcore = float_core(ref.get_submodule(path))
        except AttributeError:
            fcore = None
        if fcore is None:
            report.skipped[path] = "no float conv/linear at this path in the reference"
            continue
        if len(_ins_of(quantized, node)) != 1:
            report.skipped[path] = "called more than once in the graph"
            continue
        layers.append(_Layer(node, path, qcore, fcore))
    return layers


def _ins_of(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]


def _run_hooked(model: nn.Module, hooks: dict[str, Callable[[torch.Tensor], None]],
                batches: list[tuple[Any, ...]]) -> None:
    """Run ``model`` on every batch, calling ``hooks[path](input)`` with each module's input."""
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda _m, args, fn=fn: fn(args[0])) for p, fn in hooks.items()]
    try:
        with torch.no_grad():
            for args in batches:
                model(*args)
    finally:
        for h in handles:
            h.remove()


def _float_stats(ref: nn.Module, layers: list[_Layer], batches: list[tuple[Any, ...]]
                 ) -> dict[str, _ChannelMean]:
    stats = {layer.path: _ChannelMean() for layer in layers}
    hooks = {}
    for layer in layers:
        path, core, st = layer.path, layer.fcore, stats[layer.path]
        w, b = weight_and_bias(core)
        linear = isinstance(core, nn.Linear)
        hooks[path] = (lambda x, core=core, w=w, b=b, st=st, linear=linear:
                       st.add(pre_activation(core, x, w, b), linear))
    _run_hooked(ref, hooks, batches)
    return stats


def _quantized_stats(quantized: fx.GraphModule, layers: list[_Layer],
                     batches: list[tuple[Any, ...]], local: bool) -> dict[str, _ChannelMean]:
    """Per-channel means of each layer's pre-activation in the quantized model; ``local``: of
    the difference the layer's own weight rounding makes on the input it gets (quantized
    weight minus float weight, same input), which needs no float run and does not count the
    shift of the layers before it again."""
    stats = {layer.path: _ChannelMean() for layer in layers}
    hooks = {}
    for layer in layers:
        w, b = weight_and_bias(layer.qcore)
        wf = weight_and_bias(layer.fcore)[0] if local else None
        linear = isinstance(layer.fcore, nn.Linear)

        def hook(x: torch.Tensor, g: nn.Module = layer.fcore, w: torch.Tensor = w,
                 b: Optional[torch.Tensor] = b, wf: Optional[torch.Tensor] = wf,
                 st: _ChannelMean = stats[layer.path], linear: bool = linear) -> None:
            y = pre_activation(g, x, w, b)
            if wf is not None:
                y = y - pre_activation(g, x, wf, b)
            st.add(y, linear)

        hooks[layer.path] = hook
    _run_hooked(quantized, hooks, batches)
    return stats


def _correct(layer: _Layer, q: _ChannelMean, f: _ChannelMean, sequential: bool
             ) -> LayerCorrection:
    shift = (q.mean() - f.mean() if sequential else q.mean()).float()
    _, bias = weight_and_bias(layer.qcore)
    base = torch.zeros_like(shift) if bias is None else bias.float()
    set_bias(layer.qcore, base - shift)
    std = float(f.std().mean())
    lc = LayerCorrection(layer.path, int(shift.numel()), float(shift.abs().mean()),
                         float(shift.abs().max()),
                         float(shift.abs().mean()) / std if std > 0 else math.inf)
    record(layer.node, PASS_NAME, Action.CORRECT_BIAS,
           f"subtracted the per-channel mean output shift (quantized - float) measured on "
           f"{q.count} calibration values per channel",
           mean_abs_shift=lc.mean_abs_shift, max_abs_shift=lc.max_abs_shift)
    return lc


def correction_report(model: nn.Module) -> Optional[BiasCorrectionReport]:
    """The report :func:`bias_correction` left on ``model`` (None: not corrected)."""
    return getattr(model, "meta", {}).get(REPORT_KEY)
