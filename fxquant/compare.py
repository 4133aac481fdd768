"""Numeric debugging: where does a quantized model lose accuracy?

:func:`compare` runs the float model and the quantized (or prepared: it is converted first)
model side by side on the same inputs and matches their nodes by debug handle (the tracer gives
every op of the float model one; fused and lowered nodes carry the handle of the node whose
output they produce). Each matched op gets its SQNR and max abs error against float, and the
SQNR of the noise it *adds* to what it was given (``local_sqnr_db``): a layer with bad qparams
has a low local SQNR, the layers after it, which only pass its error on, do not. Weights of
quantized modules are compared with the float weights they came from (BatchNorm folded).

    result = fxquant.compare(model, quantized, batches)
    print(result.to_text())
    mapping = fxquant.skip_layers(mapping, result.worst_layers(2))   # leave those float
    prepared = fxquant.prepare_fx(model, mapping, example) ...        # and run again

The module is callable: ``fxquant.compare(...)`` is :func:`compare`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.meta import qinfo_or_none
from fxquant.options import options_of
from fxquant.records import Role, Status
from fxquant.status import graph_stage, info_of, op_label, status_of

Key = tuple[str, int]


@dataclass
class LayerComparison:
    """One op of the quantized model against the float op with the same debug handle."""

    name: str  # module path (what skip_layers takes); the node name for top-level functions
    node: str
    op: str
    status: str
    debug_handle: int
    module_path: str
    shape: Optional[tuple[int, ...]]
    sqnr_db: float  # end to end: this output vs the float model's
    max_abs_err: float
    input_sqnr_db: float  # of the worst input it read (inf: exact inputs)
    local_sqnr_db: float  # SQNR of the noise this op adds to its inputs' noise

    def __str__(self) -> str:
        return (f"{self.name} ({self.op}, {self.status}): SQNR {self.sqnr_db:.1f} dB, "
                f"local {self.local_sqnr_db:.1f} dB, max abs err {self.max_abs_err:.3g}")


@dataclass
class WeightComparison:
    name: str  # module path
    op: str
    sqnr_db: float
    max_abs_err: float
    shape: tuple[int, ...]


@dataclass
class Comparison:
    layers: list[LayerComparison]
    weights: list[WeightComparison]
    output_sqnr_db: float
    output_max_abs_err: float
    unmatched: list[str] = field(default_factory=list)  # ops without a float counterpart

    def by_handle(self) -> dict[int, LayerComparison]:
        return {lc.debug_handle: lc for lc in self.layers}

    def layer(self, name: str) -> LayerComparison:
        for lc in self.layers:
            if name in (lc.name, lc.node):
                return lc
        raise KeyError(f"no compared layer named {name!r}; have {[lc.name for lc in self.layers]}")

    def worst(self, n: Optional[int] = 5) -> list[LayerComparison]:
        """The quantized ops that add the most noise (lowest local SQNR; end-to-end SQNR breaks
        ties). Float ops are left out: they add no quantization noise of their own (what
        their local SQNR shows is noise they received, amplified) and are float already."""
        ranked = sorted(self.layers, key=lambda lc: (lc.local_sqnr_db, lc.sqnr_db))
        ranked = [lc for lc in ranked
                  if not math.isinf(lc.local_sqnr_db) and lc.status != Status.FLOAT]
        return ranked if n is None else ranked[:n]

    def worst_layers(self, n: Optional[int] = 5) -> list[str]:
        """Names of the worst layers, worst first, each once: pass them to skip_layers."""
        out: list[str] = []
        for lc in self.worst(None):
            if lc.name not in out:
                out.append(lc.name)
        return out if n is None else out[:n]

    def worst_weights(self, n: Optional[int] = 5) -> list[WeightComparison]:
        ranked = sorted(self.weights, key=lambda w: w.sqnr_db)
        return ranked if n is None else ranked[:n]

    def to_text(self, n: Optional[int] = None) -> str:
        lines = [f"output SQNR {_db(self.output_sqnr_db)} dB, max abs error "
                 f"{self.output_max_abs_err:.3g}", "",
                 f"{'layer':<28} {'op':<22} {'status':<11} {'SQNR dB':>8} {'local dB':>8} "
                 f"{'max err':>9}"]
        for lc in (self.layers if n is None else self.worst(n)):
            lines.append(f"{lc.name[:28]:<28} {lc.op[:22]:<22} {lc.status:<11} "
                         f"{_db(lc.sqnr_db):>8} {_db(lc.local_sqnr_db):>8} {lc.max_abs_err:>9.3g}")
        if self.weights:
            lines += ["", f"{'weight':<28} {'op':<22} {'SQNR dB':>8} {'max err':>9}"]
            for w in self.weights:
                lines.append(f"{w.name[:28]:<28} {w.op[:22]:<22} {_db(w.sqnr_db):>8} "
                             f"{w.max_abs_err:>9.3g}")
        return "\n".join(lines)


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


class _Stat:
    """Running signal / noise energy and max abs error of test against reference."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        ref, test = ref.detach().double(), test.detach().double()
        diff = ref - test
        self.signal += float((ref * ref).sum())
        self.noise += float((diff * diff).sum())
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)


def _local_sqnr(sqnr: float, input_sqnr: float) -> float:
    """SQNR of the noise added between the inputs and the output (noise-to-signal ratios
    subtract; a non-positive difference means the op added none)."""
    if math.isinf(sqnr) and sqnr > 0:
        return math.inf
    nsr_in = 0.0 if math.isinf(input_sqnr) and input_sqnr > 0 else 10 ** (-input_sqnr / 10)
    added = 10 ** (-sqnr / 10) - nsr_in
    return math.inf if added <= 0 else -10 * math.log10(added)


# ------------------------------------------------------------------------------- running
def batches_of(inputs: Any) -> list[tuple[Any, ...]]:
    """A tensor or a tuple of forward's arguments is one batch; a list holds several."""
    if isinstance(inputs, list):
        return [b if isinstance(b, tuple) else (b,) for b in inputs]
    return [inputs if isinstance(inputs, tuple) else (inputs,)]


def _as_float(value: Any) -> Optional[torch.Tensor]:
    if not isinstance(value, torch.Tensor):
        return None
    if value.is_quantized:
        return value.dequantize()
    return value if value.is_floating_point() else None


def value_keys(gm: fx.GraphModule) -> dict[fx.Node, Key]:
    """The key under which each node's output is compared: its debug handle, or for the
    graph's inputs (and the quantize / observer right after one) the input's position."""
    keys: dict[fx.Node, Key] = {}
    inputs = 0
    for node in gm.graph.nodes:
        info = qinfo_or_none(node)
        if node.op == "placeholder":
            keys[node] = ("input", inputs)
            inputs += 1
        elif info is not None and info.debug_handle is not None and node.op.startswith("call_"):
            keys[node] = ("handle", info.debug_handle)
        elif info is not None and info.role in (Role.QUANTIZE, Role.DEQUANTIZE, Role.OBSERVER):
            src = node.args[0] if node.args else None
            if isinstance(src, fx.Node) and keys.get(src, ("",))[0] == "input":
                keys[node] = keys[src]
    return keys


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps, per key, a copy of the float value of the last node that has
    it, taken when the node ran."""

    def __init__(self, gm: fx.GraphModule, keys: dict[fx.Node, Key]) -> None:
        super().__init__(gm)
        self.keys = keys
        self.values: dict[Key, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        key = self.keys.get(n)
        if key is not None:
            value = _as_float(out)
            if value is None:
                self.values.pop(key, None)
            elif value is out:  # the graph's own tensor: a later in-place op may write it
                self.values[key] = value.detach().clone()
            else:  # dequantized: a copy already
                self.values[key] = value.detach()
        return out


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        t = _as_float(out)
        return [t] if t is not None else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_tensors(o)]
    return []


def run_and_record(gm: fx.GraphModule, args: tuple[Any, ...]
                  ) -> tuple[dict[Key, torch.Tensor], Any]:
    """Run ``gm`` on ``args``; return the float value of each key (see :func:`value_keys`) as
    it was when produced (a copy: an in-place op later in the graph does not change it), and
    the graph's output."""
    rec = _Recorder(gm, value_keys(gm))
    with torch.no_grad():
        out = rec.run(*args)
    return rec.values, out


def _engine_of(gm: fx.GraphModule) -> Any:
    options = options_of(gm)
    if options is None or not options.backend_name:
        return contextlib.nullcontext()
    from fxquant.backends.engine import engine

    return engine(options.backend.engine)


def quantized_of(model: fx.GraphModule) -> fx.GraphModule:
    """A prepared model is converted (calibrate it first); other graphs are used as they are."""
    if graph_stage(model) == "prepared":
        from fxquant.api import convert_fx

        return convert_fx(model)
    return model


def _float_graph(float_model: nn.Module, trace_config: Any) -> fx.GraphModule:
    from fxquant.trace import trace

    gm = trace(float_model, trace_config)
    return gm.eval()


# ------------------------------------------------------------------------------- layers
def _input_keys(node: fx.Node, keys: dict[fx.Node, Key]) -> set[Key]:
    """Keys of the nearest compared values that ``node`` reads."""
    own = keys.get(node)
    found: set[Key] = set()
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        a = stack.pop()
        if a in seen:
            continue
        seen.add(a)
        k = keys.get(a)
        if k is not None and k != own:
            found.add(k)
        else:
            stack.extend(a.all_input_nodes)
    return found


def _layers(gm: fx.GraphModule, stats: dict[Key, _Stat],
            shapes: dict[Key, tuple[int, ...]]) -> tuple[list[LayerComparison], list[str]]:
    keys = value_keys(gm)
    stage = graph_stage(gm)
    layers, unmatched, done = [], [], set()
    for node in gm.graph.nodes:
        info = info_of(node)
        key = keys.get(node)
        if key is None or key[0] != "handle" or info.role != Role.OP or key in done:
            continue
        done.add(key)
        if key not in stats:
            unmatched.append(node.name)
            continue
        st = stats[key]
        ins = [stats[k].sqnr_db for k in _input_keys(node, keys) if k in stats]
        input_sqnr = min(ins) if ins else math.inf
        layers.append(LayerComparison(
            name=info.module_path or node.name, node=node.name, op=op_label(gm, node),
            status=status_of(info, stage), debug_handle=key[1], module_path=info.module_path,
            shape=shapes.get(key), sqnr_db=st.sqnr_db, max_abs_err=st.max_abs,
            input_sqnr_db=input_sqnr, local_sqnr_db=_local_sqnr(st.sqnr_db, input_sqnr)))
    return layers, unmatched


# ------------------------------------------------------------------------------- weights
def quantized_weight(module: nn.Module) -> Optional[torch.Tensor]:
    """The weight a quantized / reference module computes with, as float (None: no
    quantized weight)."""
    if hasattr(module, "fake_quantized_weight"):
        return module.fake_quantized_weight().detach()
    w = getattr(module, "weight", None)
    if callable(w) and not isinstance(w, torch.Tensor):
        try:
            w = w()
        except Exception:  # noqa: BLE001 - a module without an unpackable weight
            return None
        return w.dequantize() if isinstance(w, torch.Tensor) and w.is_quantized else None
    if isinstance(module, nn.Sequential) and len(module):
        return quantized_weight(module[0])
    return None


def _float_weight(module: nn.Module) -> Optional[torch.Tensor]:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.detach()
    if isinstance(module, nn.Sequential) and len(module):
        return _float_weight(module[0])
    return None


def _weights(float_model: nn.Module, gm: fx.GraphModule) -> list[WeightComparison]:
    from fxquant.api import fuse_fx

    fused = fuse_fx(copy.deepcopy(float_model).eval(), verify=False)
    out, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen or info_of(node).role != Role.OP:
            continue
        seen.add(node.target)
        qw = quantized_weight(gm.get_submodule(str(node.target)))
        try:
            fw = _float_weight(fused.get_submodule(str(node.target)))
        except AttributeError:
            fw = None
        if qw is None or fw is None or qw.shape != fw.shape:
            continue
        st = _Stat()
        st.add(fw, qw)
        out.append(WeightComparison(str(node.target), op_label(gm, node), st.sqnr_db,
                                    st.max_abs, tuple(qw.shape)))
    return out


# ------------------------------------------------------------------------------- compare
def compare(float_model: nn.Module, model: fx.GraphModule, inputs: Any, *,
            trace_config: Any = None, weights: bool = True) -> Comparison:
    """Per-layer comparison of ``model`` (converted, reference, or prepared and calibrated)
    against ``float_model`` on ``inputs`` (a tensor, a tuple of forward's arguments, or a list
    of such batches; statistics accumulate over the batches).

    ``trace_config``: the :class:`fxquant.trace.TraceConfig` the model was prepared with
    when it used leaf modules (the float model must be traced the same way for the debug
    handles to match)."""
    if trace_config is None:  # the leaf-module rules the model was prepared with
        trace_config = getattr(options_of(model), "trace_config", None)
    gm = quantized_of(model)
    fgm = _float_graph(float_model, trace_config)
    stats: dict[Key, _Stat] = {}
    shapes: dict[Key, tuple[int, ...]] = {}
    out_stat = _Stat()
    for args in batches_of(inputs):
        fvals, fout = run_and_record(fgm, args)
        with _engine_of(gm):
            qvals, qout = run_and_record(gm.eval(), args)
        for key, q in qvals.items():
            f = fvals.get(key)
            if f is not None and f.shape == q.shape:
                stats.setdefault(key, _Stat()).add(f, q)
                shapes[key] = tuple(q.shape)
        for f, q in zip(_flat_tensors(fout), _flat_tensors(qout)):
            if f.shape == q.shape:
                out_stat.add(f, q)
    layers, unmatched = _layers(gm, stats, shapes)
    return Comparison(layers, _weights(float_model, gm) if weights else [],
                      out_stat.sqnr_db, out_stat.max_abs, unmatched)


def skip_layers(mapping: Any, names: Iterable[Union[str, LayerComparison]]) -> Any:
    """A copy of ``mapping`` that leaves the named modules float (``set_module_name(name,
    None)``; a module's name covers the ops inside it). Prepare and calibrate again with it."""
    new = copy.deepcopy(mapping)
    for name in names:
        path = name.name if isinstance(name, LayerComparison) else str(name)
        new.set_module_name(path, None)
    return new


def skip_worst(mapping: Any, comparison: Comparison, n: int = 1) -> Any:
    """``skip_layers(mapping, comparison.worst_layers(n))``."""
    return skip_layers(mapping, comparison.worst_layers(n))


class _CallableModule(types.ModuleType):
    """``fxquant.compare(float_model, model, inputs)`` is :func:`compare`."""

    def __call__(self, float_model: nn.Module, model: fx.GraphModule, inputs: Any,
                 **kwargs: Any) -> Comparison:
        return compare(float_model, model, inputs, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
