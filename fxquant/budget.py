"""Accuracy-driven fallback: quantize everything except the fewest layers a metric needs float.

Most of a model's accuracy loss usually comes from a few layers (a layer fed by outliers, a
depthwise conv with a wide per-tensor weight range, a projection after an additive mask).
:func:`quantize_with_budget` finds them the way a person would with :func:`fxquant.compare`,
but with the user's own metric as the judge:

1. quantize with the user's mapping, evaluate; stop if the drop from float is within budget;
2. rank the quantized layers by the noise each one *adds* (``compare``'s local SQNR, measured
   on the calibration data), leave the worst one float, re-quantize, re-evaluate, re-rank;
   repeat until the budget is met (greedy, worst first);
3. try giving back each layer left float except the last (in the order they were taken): a
   layer whose removal from the float set still meets the budget is quantized again, so the
   set returned is minimal for this greedy order.

Every try is a :class:`BudgetStep` passed to ``progress`` as it finishes; the result carries
a :class:`BudgetReport` in ``meta["fxquant_budget"]`` and a ``keep_float`` decision from
``quantize_with_budget`` on each node left float, naming the metric it cost.

    quantized, report = fxquant.quantize_with_budget(
        model, fxquant.get_default_qconfig_mapping("x86"), example_inputs, calib_batches,
        eval_fn=lambda m: top1(m, val), max_drop=0.01, progress=print)
    print(report.to_text())
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.compare import batches_of, compare, skip_layers
from fxquant.errors import FxQuantError
from fxquant.meta import qinfo_or_none, record
from fxquant.records import Action, Role

REPORT_KEY = "fxquant_budget"
PASS_NAME = "quantize_with_budget"


@dataclass
class BudgetStep:
    """One quantize-and-evaluate try."""

    index: int
    float_layers: tuple[str, ...]  # layers left float in this try
    metric: float
    drop: float  # float metric - this metric
    within_budget: bool
    note: str = ""  # what changed: "all quantized", "+ layer (local SQNR ..)", "- layer"

    def __str__(self) -> str:
        mark = "ok" if self.within_budget else "over budget"
        return (f"try {self.index}: {len(self.float_layers)} float layer(s), metric "
                f"{self.metric:.4f} (drop {self.drop:+.4f}, {mark}) {self.note}")


@dataclass
class BudgetReport:
    float_metric: float
    max_drop: float
    steps: list[BudgetStep] = field(default_factory=list)
    float_layers: tuple[str, ...] = ()
    met: bool = False

    @property
    def metric(self) -> float:
        return self._chosen().metric

    def _chosen(self) -> BudgetStep:
        for s in reversed(self.steps):
            if s.float_layers == self.float_layers:
                return s
        return self.steps[-1]

    def to_text(self) -> str:
        head = (f"float metric {self.float_metric:.4f}, budget {self.max_drop:g}: "
                + ("met" if self.met else "NOT met") + f" with {len(self.float_layers)} float "
                f"layer(s) {list(self.float_layers)}")
        return "\n".join([head] + [str(s) for s in self.steps])


@dataclass
class _Job:
    """What every try needs: the model, how to prepare / calibrate / score it."""

    model: nn.Module
    mapping: Any
    example_inputs: Any
    batches: list[tuple[Any, ...]]
    eval_fn: Callable[[nn.Module], float]
    prepare_kwargs: dict[str, Any]
    correct_bias: bool

    def quantize(self, float_layers: tuple[str, ...]) -> nn.Module:
        from fxquant.api import convert_fx, prepare_fx
        from fxquant.bias_correction import bias_correction

        mapping = skip_layers(self.mapping, float_layers)
        prepared = prepare_fx(self.model, mapping, self.example_inputs, **self.prepare_kwargs)
        with torch.no_grad():
            for args in self.batches:
                prepared(*args)
        if self.correct_bias:
            return bias_correction(prepared, self.batches)
        return convert_fx(prepared)


def quantize_with_budget(model: nn.Module, qconfig_mapping: Any, example_inputs: Any,
                         calib_data: Any, eval_fn: Callable[[nn.Module], float],
                         max_drop: float, *, backend: str = "auto",
                         max_float_layers: Optional[int] = None, correct_bias: bool = False,
                         progress: Optional[Callable[[BudgetStep], None]] = None,
                         **prepare_kwargs: Any) -> tuple[nn.Module, BudgetReport]:
    """Quantize ``model`` leaving float the fewest layers (greedy, most sensitive first) for
    which ``eval_fn(float model) - eval_fn(quantized) <= max_drop`` (see the module docstring).

    ``eval_fn``: the user's metric, higher is better (top-1 on a validation set, agreement
    with the float model, minus a loss ...). ``calib_data``: a tensor, a tuple of forward's
    arguments, or a list of such batches; it calibrates every try and ranks the layers.
    ``max_float_layers``: give up after this many (default: every quantized layer).
    ``correct_bias``: apply :func:`fxquant.bias_correction` to every try. Other keyword
    arguments go to :func:`fxquant.prepare_fx`. Returns (the quantized model, the report);
    when the budget cannot be met, the best try is returned and ``report.met`` is False."""
    if not max_drop >= 0:
        raise FxQuantError(f"quantize_with_budget: max_drop must be >= 0, got {max_drop}")
    batches = batches_of(calib_data)
    job = _Job(model.eval(), qconfig_mapping, example_inputs, batches, eval_fn,
               {"backend": backend, **prepare_kwargs}, correct_bias)
    with torch.no_grad():
        float_metric = float(eval_fn(model))
    report = BudgetReport(float_metric, max_drop)
    tries: dict[tuple[str, ...], nn.Module] = {}

    def attempt(float_layers: tuple[str, ...], note: str) -> BudgetStep:
        q = job.quantize(float_layers)
        with torch.no_grad():
            metric = float(eval_fn(q))
        step = BudgetStep(len(report.steps), float_layers, metric, float_metric - metric,
                          float_metric - metric <= max_drop, note)
        report.steps.append(step)
        tries[float_layers] = q
        if progress is not None:
            progress(step)
        return step

    chosen = _greedy(job, attempt, tries, max_float_layers)
    if chosen is not None:
        chosen = _minimize(chosen, attempt)
        report.met = True
    else:  # the best try, fewest float layers on ties
        best = max(report.steps, key=lambda s: (s.metric, -len(s.float_layers)))
        chosen = best.float_layers
    report.float_layers = chosen
    result = tries[chosen]
    _record(result, report)
    return result, report


def _greedy(job: _Job, attempt: Callable[[tuple[str, ...], str], BudgetStep],
            tries: dict[tuple[str, ...], nn.Module], max_float: Optional[int]
            ) -> Optional[tuple[str, ...]]:
    """Leave float the worst layer until the budget is met; the float set, or None."""
    float_layers: tuple[str, ...] = ()
    step = attempt(float_layers, "all quantized")
    tried: set[str] = set()
    while not step.within_budget:
        if max_float is not None and len(float_layers) >= max_float:
            return None
        ranked = compare(job.model, tries[float_layers], job.batches, weights=False).worst(None)
        nxt = next((lc for lc in ranked if lc.name not in tried), None)
        if nxt is None:  # nothing quantized left that a mapping can name
            return None
        tried.add(nxt.name)
        float_layers = float_layers + (nxt.name,)
        step = attempt(float_layers, f"+ {nxt.name} (local SQNR {nxt.local_sqnr_db:.1f} dB)")
    return float_layers


def _minimize(float_layers: tuple[str, ...],
              attempt: Callable[[tuple[str, ...], str], BudgetStep]) -> tuple[str, ...]:
    """Quantize again each layer (but the last taken) whose return keeps the budget."""
    for name in float_layers[:-1]:
        fewer = tuple(n for n in float_layers if n != name)
        if attempt(fewer, f"- {name} (quantized again)").within_budget:
            float_layers = fewer
    return float_layers


def _record(model: nn.Module, report: BudgetReport) -> None:
    """The report in ``meta`` and a keep_float decision on every node of a float layer."""
    if not isinstance(model, fx.GraphModule):
        return
    model.meta[REPORT_KEY] = report
    cost = {}
    for s in report.steps:  # what quantizing each chosen layer cost when it was taken
        if s.note.startswith("+ "):
            cost.setdefault(s.note[2:].split(" ")[0], s)
    for node in model.graph.nodes:
        info = qinfo_or_none(node)
        if info is None or info.role != Role.OP or not node.op.startswith("call_"):
            continue
        name = next((n for n in report.float_layers
                     if n in (info.module_path, node.name, str(node.target))
                     or (info.module_path or "").startswith(n + ".")), None)
        if name is None:
            continue
        prev = report.steps[cost[name].index - 1] if name in cost else None
        lost = f"; with it quantized the metric dropped {prev.drop:.4f}" if prev else ""
        record(node, PASS_NAME, Action.KEEP_FLOAT,
               f"left float to meet the accuracy budget (max drop {report.max_drop:g}){lost}",
               layer=name)
