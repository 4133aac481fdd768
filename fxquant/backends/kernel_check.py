"""Numeric self-check of lowered kernels: a kernel that runs but computes garbage stays float.

``lower_to_backend`` replaces a reference pattern (dequantize → float op(s) → quantize) by the
backend's kernel. Before keeping the kernel, :func:`run_check` runs both forms on the same
random quantized inputs — the recorded example shapes, the real input qparams, integers drawn
uniformly from each input's observed quantization range — and compares the kernel's output
with the reference's in integer steps of the output scale. The kernel runs on the inputs as
given (contiguous) and, for 4-d / 5-d inputs, channels-last (what quantized convs return).

What counts as correct (:func:`verdict`): at most ``STEP_TOLERANCE`` (1) step off on all but
``OUTLIER_FRACTION`` (0.1 %) of the elements, and no element off by more than
``MAX_OUTLIER_STEPS``. Why: an int8 kernel computes the exact integer sum and rounds once;
the reference rounds a float32 sum, so the two can land on either side of a rounding tie:
one step. Kernels that requantize twice (SiLU = sigmoid then mul, softmax's lookup tables)
add at most one more step on a few elements. The x86 / fbgemm default qconfigs use
``reduce_range`` (activations 0..127) precisely so that AVX2's int16 pair sums cannot
saturate; the inputs here come from the same range (or the full one, where the producer of
an input fixes its own qparams, as sigmoid does), so a correct kernel on an AVX2-only CPU
passes, a kernel that saturates on what it will be fed fails, and a kernel that is wrong (a
whole tensor scrambled, tens of steps off) fails on every CPU.

Results are cached at module level by :func:`check_key` — (backend, rule, op configuration,
input shapes, dtypes, qparams class, layouts, engine) — so repeated layers and repeated
converts in one process are checked once. The qparams *class* (dtype, quantization range,
where the zero point sits, the power of two of the output/input scale ratio) stands for the
qparams: the code path a kernel takes depends on those, not on the exact scale.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxquant.backends.base import LowerCtx, static_qparams

STEP_TOLERANCE = 1
OUTLIER_FRACTION = 1e-3
MAX_OUTLIER_STEPS = 2
SEED = 20240609

_DTYPE_RANGE = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}
_INT_DTYPE = {torch.quint8: torch.uint8, torch.qint8: torch.int8}
_SCALARS = (bool, int, float, str, torch.dtype, torch.qscheme, type(None))

_RESULTS: dict[Hashable, "CheckResult"] = {}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check. ``checked`` False: the check could not run (run-time
    arguments, no example shapes) and says why in ``note``; the kernel is then kept, as
    before this check existed (its probe on quantized zeros still ran)."""

    ok: bool
    checked: bool = True
    max_steps: int = 0
    fraction_off: float = 0.0  # elements more than STEP_TOLERANCE steps off
    layout: str = ""  # the input layout the worst error was seen on
    engine: str = ""
    note: str = ""

    def summary(self) -> str:
        if not self.checked:
            return f"not numerically checked: {self.note}"
        if self.note:
            return f"{self.note} ({self.layout} input, {self.engine})"
        return (f"max {self.max_steps} step(s) off the reference on random data, "
                f"{self.fraction_off:.1%} of elements more than {STEP_TOLERANCE} off "
                f"({self.layout} input, {self.engine})")


def clear_cache() -> None:
    """Forget every cached result and sample (benchmarks measure a cold convert with it)."""
    _RESULTS.clear()
    _INTS.clear()
    _BOUNDS.clear()


def lookup(key: Optional[Hashable]) -> Optional[CheckResult]:
    return None if key is None else _RESULTS.get(key)


def store(key: Optional[Hashable], result: CheckResult) -> None:
    if key is not None:
        _RESULTS[key] = result


# ---------------------------------------------------------------- the cache key
def check_key(ctx: LowerCtx, scope: tuple[str, ...], q_out: fx.Node,
              specs: Optional[Mapping[Any, "InputSpec"]]) -> Optional[Hashable]:
    """(scope: backend, rule, lowering, packing engine), the op's configuration, each input's
    shape / dtype / qparams class, the output's qparams class, the engine. None when an
    input has no recorded shape or static qparams (nothing to check with)."""
    from fxquant.backends.reference_ops import quantize_qparams

    if not specs:
        return None
    inputs = tuple((str(key), s.shape, s.dtype, s.qrange, _zp_class(s.zero_point, s.qrange))
                   for key, s in sorted(specs.items(), key=lambda kv: str(kv[0])))
    scale, zp, dtype = quantize_qparams(q_out)
    ratio = round(math.log2(scale / next(iter(specs.values())).scale))
    config = tuple(_node_config(n, ctx) for n in (ctx.group or (ctx.node,)))
    return (scope, config, inputs, (dtype, _zp_class(zp, _DTYPE_RANGE.get(dtype))), ratio,
            str(torch.backends.quantized.engine))


def _zp_class(zp: int, qrange: Optional[tuple[int, int]]) -> str:
    if qrange is None:
        return str(zp)
    return "low" if zp <= qrange[0] else "high" if zp >= qrange[1] else "mid"


def _node_config(node: fx.Node, ctx: LowerCtx) -> tuple:
    def arg(a: Any) -> Any:
        return "<tensor>" if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, arg)
    kwargs = fx.node.map_aggregate(dict(node.kwargs), arg)
    target = _module_config(ctx.modules[node.target]) if node.op == "call_module" \
        else str(node.target)
    return node.op, target, repr(args), repr(sorted(kwargs.items()))


def _module_config(module: nn.Module) -> tuple:
    """The module's class and its plain (hyper-parameter) attributes, children included."""
    own = tuple(sorted((k, v) for k, v in vars(module).items()
                       if not k.startswith("_") and _plain(v)))
    kids = tuple(_module_config(m) for m in module.children())
    return type(module).__qualname__, own, kids


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


# ---------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    dtype: torch.dtype
    qrange: tuple[int, int]  # the integers the input's observer quantizes to


def input_specs(ctx: LowerCtx) -> Optional[dict[Any, InputSpec]]:
    """Each quantized input's spec; None when one has no recorded shape or static qparams
    (qparams chosen by a kernel at run time)."""
    out = {}
    for key, qn in operands(ctx).items():
        found = static_qparams(qn)
        if found is None or found[3] not in _DTYPE_RANGE:
            return None
        shape, scale, zp, dtype = found
        out[key] = InputSpec(shape, float(scale), int(zp), dtype, _qrange(ctx, key, dtype))
    return out


def operands(ctx: LowerCtx) -> dict[Any, fx.Node]:
    """The quantized tensors the kernel reads: ``ctx.qinputs`` (the first op's inputs) and,
    in a fused group, the dequantized other operands of its later ops (the tensor a conv ->
    add group adds), keyed ("group", i, slot); a tensor already an input is not repeated."""
    from fxquant.backends.reference_ops import is_dequantize

    out = dict(ctx.qinputs)
    for i, node in enumerate(ctx.group[1:], 1):
        for slot, arg in enumerate(node.args[1:], 1):  # args[0] links the chain
            if is_dequantize(arg) and arg.args[0] not in out.values():
                out[("group", i, slot)] = arg.args[0]
    return out


def _qrange(ctx: LowerCtx, key: Any, dtype: torch.dtype) -> tuple[int, int]:
    """The integers the input can take: the widest of the range this op's input spec asks
    for (0..127 with reduce_range) and the range of the observer that produced the value.
    They differ where the producer fixes its own qparams: a sigmoid's output (scale 1/256)
    spans 0..255 whatever the consumer asked for, and fbgemm on an AVX2-only CPU saturates
    on exactly that range, so the check must see it."""
    from fxquant.backends.reference_ops import is_quantize
    from fxquant.meta import qinfo

    lo, hi = _DTYPE_RANGE[dtype]
    ranges = [_observer_range(getattr(qinfo(ctx.node).input_specs.get(key), "observer", None),
                              lo, hi)]
    qn = operands(ctx).get(key)
    if isinstance(qn, fx.Node):
        # a quantize node's producer is its input; a lowered kernel (sigmoid lowered
        # before this op) produced the value itself
        src = qn.args[0] if is_quantize(qn) and qn.args else qn
        if isinstance(src, fx.Node):
            ranges.append(_observer_range(_producer_observer(src), lo, hi))
    found = [r for r in ranges if r is not None]
    if not found:
        return lo, hi
    return min(r[0] for r in found), max(r[1] for r in found)


def _producer_observer(node: fx.Node) -> Any:
    """The observer factory of the op whose output ``node`` is, following ops that share
    their input's qparams (max_pool, reshape, ...) up to the one that chose them."""
    from fxquant.meta import QSpec, SharedSpec, qinfo_or_none
    from fxquant.records import Role
    from fxquant.slots import get_input

    for _ in range(32):
        info = qinfo_or_none(node)
        spec = info.output_spec if info is not None else None
        if isinstance(spec, QSpec):
            return spec.observer
        if info is not None and (info.role in (Role.QUANTIZE, Role.DEQUANTIZE)
                                 or info.rule == "tuple_family") and node.args:
            src = node.args[0]  # q / dq pairs; split / chunk / unbind move values only
        elif isinstance(spec, SharedSpec):
            src = get_input(node, spec.input_index)
        else:
            return None
        if not isinstance(src, fx.Node):
            return None
        node = src
    return None


def _observer_range(factory: Any, lo: int, hi: int) -> Optional[tuple[int, int]]:
    if factory is None:
        return None
    bounds = _factory_bounds(factory)
    if bounds is None:
        return None
    qmin, qmax = bounds
    if isinstance(qmin, int) and isinstance(qmax, int) and lo <= qmin < qmax <= hi:
        return qmin, qmax
    return lo, hi


_BOUNDS: dict[int, tuple[Any, Optional[tuple[Any, Any]]]] = {}


def _factory_bounds(factory: Any) -> Optional[tuple[Any, Any]]:
    """(quant_min, quant_max) of the observer ``factory`` builds, None when it cannot be built.
    Building an observer (a histogram's buffers) is most of what a check costs before it
    runs, and a model's inputs share a few factories: kept per factory object (the entry
    holds the factory, so its id is not reused while the entry lives)."""
    entry = _BOUNDS.get(id(factory))
    if entry is not None and entry[0] is factory:
        return entry[1]
    try:
        obs = factory()
    except Exception:  # noqa: BLE001 - an observer we cannot build: no information
        bounds = None
    else:
        bounds = (getattr(obs, "quant_min", None), getattr(obs, "quant_max", None))
    if len(_BOUNDS) >= 256:
        _BOUNDS.clear()
    _BOUNDS[id(factory)] = (factory, bounds)
    return bounds


def random_inputs(specs: Mapping[Any, InputSpec], top_heavy: bool = False
                  ) -> dict[Any, torch.Tensor]:
    """A random quantized tensor per input: the recorded shape and qparams, integers uniform
    in the input's range (seeded: the same model converts the same way every time), or with
    ``top_heavy`` the range's top (90 %) and bottom (10 %) only."""
    out = {}
    for i, (key, s) in enumerate(specs.items()):
        ints = _random_ints(i, s.shape, s.qrange, _INT_DTYPE[s.dtype], top_heavy)
        out[key] = torch._make_per_tensor_quantized_tensor(ints, s.scale, s.zero_point)  # a copy
    return out


_INTS: dict[tuple, torch.Tensor] = {}


def _random_ints(position: int, shape: tuple[int, ...], qrange: tuple[int, int],
                 dtype: torch.dtype, top_heavy: bool) -> torch.Tensor:
    """The integers of a kernel's ``position``-th input: drawn from a generator seeded by the
    position and kind alone, so they depend only on the arguments, and kept: a model's layers
    read a few shapes, and drawing them is a good part of a check's cost. Two inputs of one
    kernel differ (their positions do). Callers copy them into a quantized tensor, so a
    kernel that writes its input in place cannot change the next check's sample."""
    key = (position, tuple(shape), tuple(qrange), dtype, top_heavy)
    ints = _INTS.get(key)
    if ints is None:
        gen = torch.Generator().manual_seed(SEED + 7919 * position + int(top_heavy))
        lo, hi = qrange
        if top_heavy:
            ints = torch.where(torch.rand(shape, generator=gen) < 0.9, hi, lo).to(dtype)
        else:
            ints = torch.randint(lo, hi + 1, shape, generator=gen, dtype=dtype)
        if len(_INTS) >= 32:
            _INTS.clear()
        _INTS[key] = ints
    return ints


def _layouts(samples: Mapping[Any, torch.Tensor]) -> list[tuple[str, dict[Any, torch.Tensor]]]:
    out = [("contiguous", dict(samples))]
    if samples and all(t.dim() in (4, 5) for t in samples.values()):
        out.append(("channels-last", {
            k: t.contiguous(memory_format=torch.channels_last if t.dim() == 4
                            else torch.channels_last_3d) for k, t in samples.items()}))
    return out


# ---------------------------------------------------------------- running a piece of graph
class _Unknown(Exception):
    """A node reads a value only known at run time."""


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def evaluate(gm: fx.GraphModule, nodes: Sequence[fx.Node], env: dict[fx.Node, Any],
             modules: Optional[Mapping[str, nn.Module]] = None) -> Any:
    """Run ``nodes`` in order from the values in ``env``; ``modules`` resolves call_module
    targets (default: the graph module's current submodules). An argument computed elsewhere
    at run time (a size read off another tensor) is recomputed by :func:`_resolve`. Returns
    the last node's value."""
    for n in nodes:
        env[n] = _run(gm, n, env, modules, 0)
    return env[nodes[-1]]


def _run(gm: fx.GraphModule, n: fx.Node, env: dict[fx.Node, Any],
         modules: Optional[Mapping[str, nn.Module]], depth: int) -> Any:
    args, kwargs = fx.node.map_arg((n.args, n.kwargs),
                                   lambda a: _resolve(gm, a, env, depth + 1))
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "call_module":
        mod = modules[n.target] if modules is not None else gm.get_submodule(n.target)
        return mod(*args, **kwargs)
    if n.op == "get_attr":
        return _fetch(gm, str(n.target))
    raise _Unknown(n.name)


_MAX_DEPTH = 6


def _resolve(gm: fx.GraphModule, a: fx.Node, env: dict[fx.Node, Any], depth: int) -> Any:
    """The value of a node outside the piece being checked. Sizes and shapes are recomputed
    from stand-in tensors (zeros of the recorded example shape): the kernel and the reference
    get the same stand-ins, so the comparison stays fair."""
    from fxquant.meta import qinfo_or_none

    if a in env:
        return env[a]
    if a.op == "get_attr":
        return _fetch(gm, str(a.target))
    info = qinfo_or_none(a)
    value = info.value if info is not None else None
    if value is not None and value.kind == "tensor" and value.shape is not None \
            and value.dtype is not None and not value.dtype.is_complex \
            and value.dtype not in _DTYPE_RANGE:
        env[a] = torch.zeros(value.shape, dtype=value.dtype)
    elif a.op in ("call_function", "call_method") and depth <= _MAX_DEPTH:
        env[a] = _run(gm, a, env, None, depth)
    else:
        raise _Unknown(a.name)
    return env[a]


# ---------------------------------------------------------------- the check
@dataclass(frozen=True)
class Lowering:
    """One lowering to check: the reference nodes (first..root), the kernel's new nodes (in
    graph order, its result last) and the reference's output quantize."""

    reference: tuple[fx.Node, ...]
    kernel: tuple[fx.Node, ...]
    q_out: fx.Node


def run_check(ctx: LowerCtx, lowering: Lowering, specs: Mapping[Any, InputSpec]
              ) -> CheckResult:
    """Kernel vs reference on random inputs, in every layout; the worst layout decides."""
    with _weights_fixed(ctx, lowering.reference):
        return _run_check(ctx, lowering, specs)


def _run_check(ctx: LowerCtx, lowering: Lowering, specs: Mapping[Any, InputSpec]
               ) -> CheckResult:
    engine = engine_label(ctx, lowering.kernel)
    worst: Optional[CheckResult] = None
    for kind, samples in _sample_sets(specs):
        try:
            with torch.no_grad():
                want = _reference_output(ctx, lowering, samples)
        except _Unknown as e:
            return CheckResult(True, checked=False, engine=engine,
                               note=f"the op reads {e} computed at run time")
        except Exception as e:  # noqa: BLE001 - the reference itself cannot run on these
            return CheckResult(True, checked=False, engine=engine,
                               note=f"the reference op does not run on random inputs: "
                                    f"{_first_line(e)}")
        layouts = _layouts(samples) if kind == "uniform" else _layouts(samples)[:1]
        want_ints: dict = {}  # the reference's integers, shared by the layouts
        for layout, inputs in layouts:
            label = layout if kind == "uniform" else f"{layout} {kind}"
            result = _compare_layout(ctx, lowering, inputs, want, label, engine, want_ints)
            if worst is None or _badness(result) > _badness(worst):
                worst = result
    return worst


@contextmanager
def _weights_fixed(ctx: LowerCtx, nodes: Sequence[fx.Node]) -> Iterator[None]:
    """The reference modules among ``nodes`` compute their fake-quantized weight once for the
    whole check instead of on every call (each sample set calls them again): the weight does
    not change during a check, and quantizing it is as costly as the reference conv itself."""
    fixed = []
    for n in nodes:
        mod = ctx.modules.get(n.target) if n.op == "call_module" else None
        method = getattr(mod, "fake_quantized_weight", None)
        if callable(method) and "fake_quantized_weight" not in vars(mod):
            with torch.no_grad():
                weight = method()
            object.__setattr__(mod, "fake_quantized_weight", lambda w=weight: w)
            fixed.append(mod)
    try:
        yield
    finally:
        for mod in fixed:
            object.__delattr__(mod, "fake_quantized_weight")


def _sample_sets(specs: Mapping[Any, InputSpec]) -> list[tuple[str, dict[Any, torch.Tensor]]]:
    """Uniform random integers; and, where an input spans more than 7 bits (what can make
    int16 pair sums saturate without VNNI), integers mostly at the range's top: a uniform
    sample of a small tensor (a 2-feature Linear after tanh) rarely puts both values of a
    pair high, real data after tanh / sigmoid does."""
    sets = [("uniform", random_inputs(specs))]
    if any(s.qrange[1] - s.qrange[0] > 128 for s in specs.values()):
        sets.append(("extremes", random_inputs(specs, top_heavy=True)))
    return sets


def _badness(r: CheckResult) -> tuple:
    return (not r.checked, not r.ok, r.max_steps, r.fraction_off)


def _reference_output(ctx: LowerCtx, lowering: Lowering, samples: Mapping[Any, torch.Tensor]
                      ) -> torch.Tensor:
    from fxquant.backends.reference_ops import is_dequantize
    from fxquant.slots import get_input

    first = lowering.reference[0]
    env = {get_input(first, key): t.dequantize() for key, t in samples.items()
           if key in ctx.qinputs}
    by_source = {operands(ctx)[key]: t.dequantize() for key, t in samples.items()}
    for node in lowering.reference[1:]:  # a group's other operands
        for arg in node.args[1:]:
            if is_dequantize(arg) and arg.args[0] in by_source:
                env.setdefault(arg, by_source[arg.args[0]])
    return evaluate(ctx.gm, lowering.reference, env, ctx.modules)


def _compare_layout(ctx: LowerCtx, lowering: Lowering, inputs: Mapping[Any, torch.Tensor],
                    want: torch.Tensor, layout: str, engine: str,
                    want_ints: Optional[dict] = None) -> CheckResult:
    env = {operands(ctx)[key]: t for key, t in inputs.items()}
    try:
        with torch.no_grad():
            got = evaluate(ctx.gm, lowering.kernel, env)
    except _Unknown as e:
        return CheckResult(True, checked=False, layout=layout, engine=engine,
                           note=f"the kernel reads {e} computed at run time")
    except Exception as e:  # noqa: BLE001 - runs on zeros, raises on random data: wrong too
        return CheckResult(False, max_steps=-1, fraction_off=1.0, layout=layout, engine=engine,
                           note=f"raises on random inputs: {_first_line(e)}")
    return verdict(ctx, lowering.q_out, got, want, layout, engine, want_ints)


def verdict(ctx: LowerCtx, q_out: fx.Node, got: Any, want: torch.Tensor, layout: str,
            engine: str, want_ints: Optional[dict] = None) -> CheckResult:
    """Compare in integer steps of the output qparams (the kernel's own when it derives them,
    as add_scalar does). ``want_ints`` keeps ``want``'s integers per qparams between calls
    with the same ``want``."""
    from fxquant.backends.reference_ops import quantize_qparams

    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return CheckResult(False, max_steps=-1, fraction_off=1.0, layout=layout, engine=engine,
                           note=f"returns {shape}, the reference {tuple(want.shape)}")
    scale, zp, dtype = quantize_qparams(q_out)
    if ctx.derived_qparams and got.is_quantized:
        scale, zp, dtype = got.q_scale(), got.q_zero_point(), got.dtype
    memo = want_ints if want_ints is not None else {}
    key = (scale, zp, dtype)
    if key not in memo:
        memo[key] = _ints(want, scale, zp, dtype)
    diff = (_ints(got, scale, zp, dtype) - memo[key]).abs_()
    n = max(diff.numel(), 1)
    worst = int(diff.max()) if diff.numel() else 0
    off = int((diff > STEP_TOLERANCE).sum()) if worst > STEP_TOLERANCE else 0
    ok = worst <= MAX_OUTLIER_STEPS and off <= OUTLIER_FRACTION * n
    return CheckResult(ok, max_steps=worst, fraction_off=off / n, layout=layout, engine=engine)


def _ints(t: torch.Tensor, scale: float, zp: int, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as contiguous integers of (scale, zp, dtype): requantized when its own qparams
    differ."""
    if t.is_quantized and t.qscheme() == torch.per_tensor_affine and t.dtype == dtype \
            and t.q_zero_point() == zp and math.isclose(t.q_scale(), scale, rel_tol=1e-6):
        ints = t.int_repr()
    else:
        x = t.dequantize() if t.is_quantized else t.float()
        ints = torch.quantize_per_tensor(x, scale, zp, dtype).int_repr()
    # one memory format for both sides: arithmetic across formats takes a slow path
    return ints.contiguous().to(_wide(dtype))


def _wide(dtype: torch.dtype) -> torch.dtype:
    """An integer type that holds the difference of two ``dtype`` integers: int16 for the
    8-bit types (a third of int32's cost on large outputs), int32 otherwise."""
    return torch.int16 if dtype in _INT_DTYPE else torch.int32


def engine_label(ctx: LowerCtx, nodes: Iterable[fx.Node]) -> str:
    """The engine the kernel runs on, and the one its weights were packed with if another."""
    current = str(torch.backends.quantized.engine)
    for n in nodes:
        if n.op == "call_module":
            packed = getattr(ctx.gm.get_submodule(n.target), "packed_engine", None)
            if isinstance(packed, str) and packed != current:
                return f"{current} engine, weights packed with {packed}"
    return f"{current} engine"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
