"""Per-layer engine choice: pack a conv's weights for another engine where that runs faster.

A quantized conv's packed weights carry their engine: weights packed for onednn run under the
x86 (or fbgemm) engine with onednn's kernel. Some fbgemm kernels are far slower than onednn's
on the same CPU: depthwise 3x3 convs with 58 or 116 channels (ShuffleNetV2) take 2.4-8.7 ms
where onednn's take ~0.1 ms (issue 10, AMD Zen 3, 1 thread). No table can say which shapes
are slow on which CPU, so lowering measures: for each conv on a backend that names
``engine_candidates`` (x86 and fbgemm: onednn, qnnpack; the Backend owns this policy) it times
the module packed for the current engine and for each candidate engine on the recorded
example shape (a few interleaved runs, the minimum of each), and keeps a candidate only when

* it passes the same numeric test as lowering's kernel check (``kernel_check``: at most 1
  step off the reference on all but 0.1% of elements, never more than 2) on random inputs of
  the input's real integer range, and is within that tolerance of the current engine's
  kernel too, and the current engine's kernel passes it as well (otherwise the kernel check's
  own fallback decides: a measured choice never hides a wrong kernel);
* it is clearly faster: ``min_speedup`` (1.5x) or more.

The decision (engine, every time measured, the steps off) is recorded on the node as an
``engine_choice`` decision, and cached per (module configuration, input shape and range
class, output qparams class, engine, candidates, options) so repeated layers are measured
once per process. Timings are noisy by nature: tests assert that a decision is recorded and
that the output is within one step of the current engine's, never which engine won.

Switch it off (or force an engine) with :func:`configure` / the :func:`options` context
manager, e.g. ``with engine_choice.options(enabled=False): convert_fx(prepared)``; the
environment variable ``FXQUANT_ENGINE_CHOICE=0`` switches it off too.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Iterator, Optional

import torch
import torch.nn as nn

from fxquant.backends.base import LowerCtx


@dataclass(frozen=True)
class EngineChoiceOptions:
    """The user's run-time knobs; which convs are probed, and for which engines, is the
    backend's policy (``Backend.engine_candidates``).

    ``enabled``: measure at all. ``min_speedup``: how much faster a candidate must be.
    ``repeats``: timed runs per engine (interleaved). ``min_kernel_ms``: kernels faster than
    this are not probed (nothing worth the convert time to win).
    ``force``: take this engine whenever it passes the numeric test, whatever the times (for
    tests and benchmarks; timings are still measured and recorded).

    Overrides of the backend's policy (None: the backend's): ``engines``: probe the convs
    lowered under these engines only, whatever their backend (a backend without candidates
    then needs ``candidates`` too: it has none to try); ``candidates``: try these engines, in
    order, on the convs probed."""

    enabled: bool = True
    engines: Optional[tuple[str, ...]] = None
    candidates: Optional[tuple[str, ...]] = None
    min_speedup: float = 1.5
    repeats: int = 5
    min_kernel_ms: float = 0.2
    force: Optional[str] = None
    # (module target, engine) pairs decided before: fxquant.load replays a saved model's
    # choices instead of timing again (a timing may pick another engine: other outputs)
    replay: Optional[tuple[tuple[str, str], ...]] = None


_OPTIONS: list[EngineChoiceOptions] = [EngineChoiceOptions(
    enabled=os.environ.get("FXQUANT_ENGINE_CHOICE", "1").strip().lower()
    not in ("0", "false", "no", "off"))]


def current_options() -> EngineChoiceOptions:
    return _OPTIONS[-1]


def configure(**changes: Any) -> EngineChoiceOptions:
    """Change the options for the rest of the process; returns the previous ones."""
    previous = _OPTIONS[-1]
    _OPTIONS[-1] = replace(previous, **changes)
    return previous


@contextlib.contextmanager
def options(**changes: Any) -> Iterator[EngineChoiceOptions]:
    """Options changed inside a ``with`` block only."""
    _OPTIONS.append(replace(_OPTIONS[-1], **changes))
    try:
        yield _OPTIONS[-1]
    finally:
        _OPTIONS.pop()


@dataclass(frozen=True)
class Choice:
    """The outcome for one layer. ``engine``: the engine the weights are packed for (None: the
    current engine's own kernel). ``times_ms``: engine -> minimum run time measured.
    ``steps``: engine -> max steps off the reference; ``steps_vs_own``: engine -> max steps
    off the current engine's output. ``reason``: the sentence recorded on the node."""

    engine: Optional[str]
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    steps_vs_own: dict[str, int] = field(default_factory=dict)


_CACHE: dict[Hashable, Choice] = {}


def clear_cache() -> None:
    _CACHE.clear()


Build = Callable[[Optional[str]], nn.Module]


def choose(ctx: LowerCtx, own: nn.Module, build: Build) -> nn.Module:
    """The module to use for ``ctx``'s conv: ``own`` (packed for the current engine) or one
    ``build(engine)`` packed for a faster candidate. Records the decision on ``ctx.node`` and
    sets ``ctx.pack_engine`` when a candidate is taken."""
    opts = current_options()
    engine = str(torch.backends.quantized.engine)
    if opts.replay is not None:
        return _replay(ctx, own, build, dict(opts.replay), engine)
    candidates = _candidates(ctx, opts, engine)
    if not _applies(ctx, own, opts, candidates):
        return own
    from fxquant.backends import kernel_check

    specs = kernel_check.input_specs(ctx)
    if not specs or len(specs) != 1:
        return own
    key = (_config(ctx), tuple((s.shape, s.dtype, s.qrange) for s in specs.values()),
           ctx.out_dtype, engine, candidates, opts)
    choice = _CACHE.get(key)
    chosen = None
    if choice is None or choice.engine is not None:
        choice, chosen = _measure(ctx, own, build, specs, opts, engine, candidates) \
            if choice is None else (choice, _try_build(build, choice.engine))
        _CACHE[key] = choice
    _record(ctx, choice, engine)
    if choice.engine is None or chosen is None:
        return own
    ctx.pack_engine = choice.engine
    return chosen


def _replay(ctx: LowerCtx, own: nn.Module, build: Build, saved: dict[str, str],
            engine: str) -> nn.Module:
    """The engine recorded for this conv (by its module target) when the model was saved;
    the current engine's own kernel where none was."""
    from fxquant.meta import record
    from fxquant.records import Action

    wanted = saved.get(str(ctx.node.target))
    if wanted is None or wanted == engine:
        return own
    chosen = _try_build(build, wanted)
    if chosen is None:
        record(ctx.node, "lower_to_backend", Action.ENGINE_CHOICE,
               f"the saved model packed these weights for {wanted}, which does not pack here: "
               f"kept {engine}'s own kernel", engine=engine)
        return own
    record(ctx.node, "lower_to_backend", Action.ENGINE_CHOICE,
           f"weights packed for {wanted}, as in the saved model (not measured again)",
           engine=wanted)
    ctx.pack_engine = wanted
    return chosen


def saved_choices(gms: Any) -> tuple[tuple[str, str], ...]:
    """(module target, engine) of every conv whose weights an engine choice packed for
    another engine, in converted graphs ``gms``; targets chosen differently in two graphs
    are left out (cannot be told apart at replay)."""
    from fxquant.meta import qinfo
    from fxquant.records import Action

    seen: dict[str, set[str]] = {}
    for gm in gms:
        for n in gm.graph.nodes:
            for d in qinfo(n).decisions:
                if d.action == Action.ENGINE_CHOICE and n.op == "call_module":
                    seen.setdefault(str(n.target), set()).add(str(d.detail.get("engine")))
    return tuple(sorted((t, next(iter(e))) for t, e in seen.items() if len(e) == 1))


def _candidates(ctx: LowerCtx, opts: EngineChoiceOptions, engine: str
                ) -> Optional[tuple[str, ...]]:
    """The engines to try for ``ctx``'s conv, None when it is not probed: the backend's
    ``engine_candidates`` (not probed where it has none, or the lowering names no backend),
    unless the options override which engines' convs are probed (``engines``) or what is
    tried (``candidates``)."""
    own = ctx.backend.engine_candidates if ctx.backend is not None else ()
    if opts.engines is not None:
        if engine not in opts.engines:
            return None
    elif not own:
        return None
    return own if opts.candidates is None else tuple(opts.candidates)


def _applies(ctx: LowerCtx, own: nn.Module, opts: EngineChoiceOptions,
             candidates: Optional[tuple[str, ...]]) -> bool:
    from fxquant.nn import quantized as q

    return (opts.enabled and candidates is not None and ctx.pack_engine is None
            and isinstance(own, (q.Conv1d, q.Conv2d, q.Conv3d))
            and not isinstance(own, q._ConvTransposeNd))


def _config(ctx: LowerCtx) -> Hashable:
    from fxquant.backends.kernel_check import _module_config

    return _module_config(ctx.module)


def _try_build(build: Build, engine: Optional[str]) -> Optional[nn.Module]:
    try:
        return build(engine)
    except (ValueError, TypeError, NotImplementedError, RuntimeError):
        return None


def _measure(ctx: LowerCtx, own: nn.Module, build: Build, specs: Any,
             opts: EngineChoiceOptions, engine: str, candidates: tuple[str, ...]
             ) -> tuple[Choice, Optional[nn.Module]]:
    from fxquant.backends import kernel_check
    from fxquant.backends.engine import conv_unpack_unavailable, supported_engines

    x = next(iter(kernel_check.random_inputs(specs).values()))
    if x.dim() in (4, 5):  # what a quantized conv feeds the next one
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    want = _reference_ints(ctx, x)
    mods: dict[str, nn.Module] = {engine: own}
    for cand in candidates:
        if conv_unpack_unavailable(cand, x.dim() - 2):
            continue  # a qnnpack-packed Conv3d cannot be unpacked: state_dict / save fail
        if cand != engine and cand in supported_engines():
            mod = _try_build(build, cand)
            if mod is not None:
                mods[cand] = mod
    outs = {e: _ints_of(m, x, ctx) for e, m in mods.items()}
    runnable = {e: m for e, m in mods.items() if outs[e] is not None}
    if engine not in runnable:
        return Choice(None, f"not probed: the {engine} kernel does not run on random "
                            f"inputs"), None
    times = _time(runnable, x, opts.repeats, opts.min_kernel_ms, engine)
    steps = {e: _steps(o, want) for e, o in outs.items() if o is not None}
    vs_own = {e: _steps(o, outs[engine]) for e, o in outs.items() if o is not None}
    return _decide(engine, times, steps, vs_own, opts, runnable)


def _reference_ints(ctx: LowerCtx, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ref = ctx.module(x.dequantize())
    return torch.quantize_per_tensor(ref, ctx.out_scale, ctx.out_zero_point,
                                     ctx.out_dtype).int_repr().to(torch.int32)


def _ints_of(mod: nn.Module, x: torch.Tensor, ctx: LowerCtx) -> Optional[torch.Tensor]:
    try:
        with torch.no_grad():
            out = mod(x)
    except Exception:  # noqa: BLE001 - a candidate that fails to run is no candidate
        return None
    if not isinstance(out, torch.Tensor) or not out.is_quantized:
        return None
    return out.int_repr().to(torch.int32)


def _steps(got: torch.Tensor, want: torch.Tensor) -> tuple[int, float]:
    """(max steps off, fraction of elements more than the check's tolerance off)."""
    from fxquant.backends.kernel_check import STEP_TOLERANCE

    if got.shape != want.shape:
        return (10 ** 6, 1.0)
    diff = (got - want).abs()
    return int(diff.max()) if diff.numel() else 0, \
        float((diff > STEP_TOLERANCE).float().mean()) if diff.numel() else 0.0


def _passes(steps: tuple[int, float]) -> bool:
    from fxquant.backends.kernel_check import MAX_OUTLIER_STEPS, OUTLIER_FRACTION

    return steps[0] <= MAX_OUTLIER_STEPS and steps[1] <= OUTLIER_FRACTION


def _time(mods: dict[str, nn.Module], x: torch.Tensor, repeats: int, min_ms: float,
          engine: str) -> dict[str, float]:
    """Minimum wall time per engine over ``repeats`` interleaved runs (one warm-up each).
    Stops after the current engine's first run when that is below ``min_ms``."""
    best = {e: float("inf") for e in mods}
    with torch.no_grad():
        for m in mods.values():
            m(x)
        for i in range(max(repeats, 1)):
            for e, m in mods.items():
                t0 = time.perf_counter()
                m(x)
                best[e] = min(best[e], (time.perf_counter() - t0) * 1e3)
            if i == 0 and best[engine] < min_ms:
                break
    return best


def _decide(engine: str, times: dict[str, float], steps: dict[str, tuple[int, float]],
            vs_own: dict[str, tuple[int, float]], opts: EngineChoiceOptions,
            mods: dict[str, nn.Module]) -> tuple[Choice, Optional[nn.Module]]:
    shown = ", ".join(f"{e} {t:.3f} ms" for e, t in times.items())
    detail = dict(times_ms=dict(times), steps={e: s[0] for e, s in steps.items()},
                  steps_vs_own={e: s[0] for e, s in vs_own.items()})
    if not _passes(steps[engine]):
        return Choice(None, f"kept {engine}'s own kernel: it is off the reference on random "
                            f"inputs (max {steps[engine][0]} steps), so the kernel check "
                            f"decides ({shown})", **detail), None
    if opts.force is None and times[engine] < opts.min_kernel_ms:
        return Choice(None, f"kept {engine}'s own kernel: {times[engine]:.3f} ms, below the "
                            f"{opts.min_kernel_ms} ms worth probing", **detail), None
    ok = [e for e in times if e != engine and _passes(steps[e]) and _passes(vs_own[e])]
    if opts.force is not None:
        pick = opts.force if opts.force in ok else None
        why = f"forced by the engine_choice option (force={opts.force!r})"
    else:
        fast = [e for e in ok if times[engine] >= opts.min_speedup * times[e]]
        pick = min(fast, key=lambda e: times[e]) if fast else None
        why = (f"{times[engine] / times[pick]:.1f}x faster than {engine}'s own kernel"
               if pick else "")
    if pick is None:
        wrong = [e for e in times if e != engine and e not in ok]
        return Choice(None, f"kept {engine}'s own kernel: no other engine is "
                            f"{opts.min_speedup}x faster and within the numeric check"
                            + (f" ({', '.join(wrong)} off the reference)" if wrong else "")
                            + f" ({shown})", **detail), None
    return Choice(pick, f"weights packed for {pick}: {why}, max {steps[pick][0]} step(s) off "
                        f"the reference and {vs_own[pick][0]} off {engine}'s output on random "
                        f"inputs ({shown})", **detail), mods[pick]


def _record(ctx: LowerCtx, choice: Choice, engine: str) -> None:
    from fxquant.meta import record
    from fxquant.records import Action

    record(ctx.node, "lower_to_backend", Action.ENGINE_CHOICE, choice.reason,
           engine=choice.engine or engine, times_ms=dict(choice.times_ms),
           steps=dict(choice.steps), steps_vs_own=dict(choice.steps_vs_own))
