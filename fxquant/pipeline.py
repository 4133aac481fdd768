"""Pass protocol, PassContext, PassResult and the PassManager that runs an ordered pipeline."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch.fx as fx

from fxquant.errors import FxQuantError, PassFailed
from fxquant.options import QuantOptions


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    modified: bool
    stats: Mapping[str, int] = field(default_factory=dict)


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run.

    ``options`` is what the API was called with (:class:`~fxquant.options.QuantOptions`:
    qconfig mapping, backend, is_qat ...; an options dict is read as
    ``QuantOptions.from_dict``); ``facts`` is what earlier passes provided.
    """

    options: QuantOptions = field(default_factory=QuantOptions)
    facts: set[str] = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Mapping[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.options, Mapping):  # user code written for the options dict
            self.options = QuantOptions.from_dict(self.options)
        elif not isinstance(self.options, QuantOptions):
            raise FxQuantError(f"PassContext options must be QuantOptions, got "
                               f"{type(self.options).__name__}",
                               hint="PassContext(options=QuantOptions.build(backend=..., ...))")


@runtime_checkable
class Pass(Protocol):
    """A graph transformation: a frozen dataclass whose fields are its options."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]]
    provides: ClassVar[frozenset[str]]

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult: ...


class Instrument:
    """Hooks the PassManager calls around each pass (debug output lives here, never in a pass)."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, index: int) -> None: ...


class DumpInstrument(Instrument):
    """Writes ``NN_<pass>.txt`` (the graph) and ``NN_<pass>.dot`` after each pass to a directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, index: int) -> None:
        stem = os.path.join(self.directory, f"{index:02d}_{p.name}")
        with open(stem + ".txt", "w") as f:
            f.write(dump_graph(result.gm))
        with open(stem + ".dot", "w") as f:
            f.write(graph_to_dot(result.gm))


class PrintInstrument(Instrument):
    """Prints one line per pass: name, time, stats."""

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, index: int) -> None:
        t = ctx.timings.get(p.name, 0.0) * 1e3
        print(f"[fxquant] {index:02d} {p.name:<18} {t:8.1f} ms  modified={result.modified} "
              f"{dict(result.stats)}")


def dump_graph(gm: fx.GraphModule) -> str:
    from fxquant.meta import qinfo_or_none

    lines = [str(gm.graph)]
    for node in gm.graph.nodes:
        info = qinfo_or_none(node)
        if info is not None and info.decisions:
            lines.append(f"# {node.name}: " + "; ".join(str(d) for d in info.decisions))
    return "\n".join(lines) + "\n"


def graph_to_dot(gm: fx.GraphModule) -> str:
    out = ["digraph G {", "  node [shape=box, fontname=monospace];"]
    for node in gm.graph.nodes:
        label = f"{node.name}\\n{node.op}: {_target_name(node)}".replace('"', "'")
        out.append(f'  "{node.name}" [label="{label}"];')
        for inp in node.all_input_nodes:
            out.append(f'  "{inp.name}" -> "{node.name}";')
    out.append("}")
    return "\n".join(out) + "\n"


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class PassManager:
    """Runs an explicit ordered tuple of passes.

    Before running it checks that each pass's ``requires`` were provided by an earlier pass (or
    are in ``initial_facts``). It times each pass, verifies the graph after each one when
    ``verify`` is set, and wraps any failure in :class:`PassFailed`.
    """

    def __init__(self, passes: Sequence[Pass], *, verify: bool = True,
                 instruments: Iterable[Instrument] = (), dump_dir: Optional[str] = None,
                 initial_facts: Iterable[str] = ()) -> None:
        self.passes = tuple(passes)
        self.verify = verify
        self.instruments = list(instruments)
        if dump_dir:
            self.instruments.append(DumpInstrument(dump_dir))
        self.initial_facts = frozenset(initial_facts)
        self.check()

    def check(self) -> None:
        have = set(self.initial_facts)
        for i, p in enumerate(self.passes):
            missing = set(p.requires) - have
            if missing:
                before = [q.name for q in self.passes[:i]]
                raise FxQuantError(
                    f"pass '{p.name}' requires {sorted(missing)}, which no earlier pass provides "
                    f"(earlier passes: {before or 'none'})",
                    hint="reorder the pipeline or add the pass that provides it")
            have |= set(p.provides)

    def run(self, gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        ctx.facts |= set(self.initial_facts)
        modified = False
        for i, p in enumerate(self.passes):
            result = self._run_one(i, p, gm, ctx)
            gm = result.gm
            modified = modified or result.modified
        return PassResult(gm, modified, {k: sum(s.values()) for k, s in ctx.stats.items()})

    def _run_one(self, i: int, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from fxquant.lint import verify as verify_graph

        before = [q.name for q in self.passes[:i]]
        for inst in self.instruments:
            inst.before_pass(p, gm, ctx)
        t0 = time.perf_counter()
        try:
            result = p(gm, ctx)
            if self.verify:
                verify_graph(result.gm, after=p.name)
        except PassFailed:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is reported with its pass
            raise PassFailed(p.name, before, e) from e
        ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - t0
        key, n = p.name, 2
        while key in ctx.stats:  # the same pass again in this pipeline: keep both runs' stats
            key, n = f"{p.name}#{n}", n + 1
        ctx.stats[key] = dict(result.stats)
        ctx.facts |= set(p.provides)
        for inst in self.instruments:
            inst.after_pass(p, result, ctx, i)
        return result
