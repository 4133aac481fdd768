"""The supported-op table, generated from the tables the compiler itself runs on.

Three Markdown tables: the quantized ops (one row per backend rule: every spelling that reaches
it, the kernel on each backend, the qparams policy, notes), the fusions (``fxquant.fusion``) and
the spellings that ``normalize`` rewrites (``fxquant.ops``). Nothing here is written by hand, so
the README cannot drift from the code: ``make optable`` (``python -m fxquant.optable --write
README.md``) rewrites the section between the markers, and a test compares the two.

    python -m fxquant.optable                    # print the section
    python -m fxquant.optable --write README.md  # replace it in README.md
    python -m fxquant.optable --check README.md  # exit 1 when README.md is out of date
"""
from __future__ import annotations

import argparse
import importlib
import operator
import pkgutil
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from fxquant.backends.base import FIXED, Backend, Rule
from fxquant.fusion import GroupFusion, ModuleFusion, default_group_fusions, default_module_fusions
from fxquant.ops import (DROPOUT_FUNCTIONS, DROPOUT_MODULES, IDENTITY_MODULES, SPELLINGS,
                         Spelling)
from fxquant.patterns import Chain, target_name

START = "<!-- optable:start -->"
END = "<!-- optable:end -->"
_NONE = "—"
_SYMBOLS = {operator.add: "a + b", operator.iadd: "a += b", operator.mul: "a * b",
            operator.imul: "a *= b", operator.sub: "a - b", operator.isub: "a -= b",
            operator.truediv: "a / b", operator.itruediv: "a /= b", operator.matmul: "a @ b",
            operator.getitem: "x[...]", operator.neg: "-x"}
_POLICY = {"weighted": "quantized weight, own output qparams",
           "own": "own output qparams",
           "shared": "output shares the input's qparams",
           "shared_all": "every tensor input and the output share one observer",
           "dynamic": "weights ahead of time, activations quantized at run time",
           "weight_only": "weights quantized, activations stay float"}


def builtin_backends() -> tuple[Backend, ...]:
    """Every backend defined in a module of ``fxquant.backends`` (a module with a ``BACKEND``),
    sorted by name; a new backend file shows up without an edit here."""
    import fxquant.backends as pkg

    found: dict[str, Backend] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        backend = getattr(module, "BACKEND", None)
        if isinstance(backend, Backend):
            found[backend.name] = backend
    return tuple(found[name] for name in sorted(found))


# ---------------------------------------------------------------- naming
def spelling_labels(target: Any) -> list[str]:
    """Every way a user writes ``target``: ``nn.ReLU``, ``F.relu``, ``torch.add``, ``x.relu()``,
    ``a + b``; one object exposed under several names (``F.relu_`` is ``torch.relu_``) gets
    each of them."""
    import torch
    import torch.nn.functional as F

    if isinstance(target, str):
        return [f"x.{target}()"]
    if target in _SYMBOLS:
        return [_SYMBOLS[target]]
    if isinstance(target, type):
        module = target.__module__
        if module.startswith("fxquant."):
            return [f"{module.rsplit('.', 1)[-1]}.{target.__name__}"]
        return [target_name(target)]
    name = getattr(target, "__name__", None)
    found = [f"{prefix}.{name}" for prefix, ns in (("F", F), ("torch", torch),
                                                    ("torch.Tensor", torch.Tensor))
             if isinstance(name, str) and getattr(ns, name, None) is target]
    return found or [target_name(target)]


def spelling_label(target: Any) -> str:
    return " / ".join(spelling_labels(target))


def _code(text: str) -> str:
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or _NONE


def _spellings_of(target: Any) -> list[Spelling]:
    """Spellings that ``normalize`` rewrites into ``target`` (its own spelling left out)."""
    return [s for s in SPELLINGS if s.canonical is target and s.target is not target]


def _spelling_texts(target: Any, inplace: bool = False) -> list[str]:
    inplace = inplace or any(s.inplace and s.target is target for s in SPELLINGS)
    suffix = " (in place)" if inplace else ""
    if isinstance(target, type) and target.__module__.startswith("fxquant."):
        suffix += " (built by a fusion, see Fusions)"
    return [_code(label) + suffix for label in spelling_labels(target)]


def op_spellings(targets: Iterable[Any]) -> list[str]:
    """Every spelling that reaches one of ``targets``: the targets, then their rewrites."""
    out: list[str] = []
    for target in targets:
        texts = _spelling_texts(target)
        for s in _spellings_of(target):
            texts += _spelling_texts(s.target, s.inplace)
        for text in texts:
            if text not in out:
                out.append(text)
    return out


def _fraction(x: float) -> str:
    f = Fraction(x).limit_denominator(1 << 16)
    if float(f) == x and f.denominator > 1 and f.numerator == 1:
        return f"1/{f.denominator}"
    return f"{x:g}"


def policy_text(rule: Rule) -> str:
    if rule.qparams == FIXED:
        if rule.fixed is None:
            return "fixed"
        scale, zp = rule.fixed
        return f"fixed: scale {_fraction(scale)}, zero_point {zp}"
    if rule.qparams in _POLICY:
        return f"{rule.qparams}: {_POLICY[rule.qparams]}"
    return rule.qparams


# ---------------------------------------------------------------- the op table
@dataclass(frozen=True)
class OpRow:
    name: str
    spellings: tuple[str, ...]
    kernels: tuple[str, ...]  # one per backend, _NONE where the backend has no such rule
    policy: str
    notes: str


def _kernel_text(rule: Optional[Rule], lowers: set[str]) -> str:
    if rule is None:
        return _NONE
    text = rule.kernel
    if len(lowers) > 1:  # the backends lower this rule differently: say how
        text += f" (via {rule.lower.__name__})"
    return text


def _rule_names(backends: Sequence[Backend]) -> list[str]:
    names: list[str] = []
    for backend in backends:
        names += [r.name for r in backend.rules if r.name not in names]
    return names


def _rule_or_none(backend: Backend, name: str) -> Optional[Rule]:
    return next((r for r in backend.rules if r.name == name), None)


def op_rows(backends: Sequence[Backend]) -> list[OpRow]:
    """One row per rule name, in table order (the first backend's order, then the others')."""
    rows = []
    for name in _rule_names(backends):
        rules = [_rule_or_none(b, name) for b in backends]
        present = [r for r in rules if r is not None]
        targets: list[Any] = []
        for r in present:
            targets += [t for t in r.op.targets if t not in targets]
        lowers = {getattr(r.lower, "__name__", "") for r in present}
        policies = list(dict.fromkeys(policy_text(r) for r in present))
        notes = list(dict.fromkeys(r.notes for r in present if r.notes))
        rows.append(OpRow(name, tuple(op_spellings(targets)),
                          tuple(_kernel_text(r, lowers) for r in rules),
                          "; ".join(policies), " ".join(notes)))
    return rows


def op_table(backends: Sequence[Backend]) -> str:
    names = [b.name for b in backends]
    head = ["rule", "op (all spellings)", *[f"{n} kernel" for n in names], "qparams", "notes"]
    lines = [_row(head), _row(["---"] * len(head))]
    for r in op_rows(backends):
        lines.append(_row([_code(r.name), ", ".join(r.spellings), *r.kernels, r.policy,
                           r.notes]))
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


# ---------------------------------------------------------------- fusion and spelling tables
def _chain_text(chain: Chain) -> str:
    steps = []
    for op in chain.ops:
        labels = [label for t in op.targets for label in spelling_labels(t)]
        steps.append(" / ".join(_code(label) for label in labels))
    return " → ".join(steps)


def fusion_table(module_fusions: Sequence[ModuleFusion],
                 group_fusions: Sequence[GroupFusion]) -> str:
    head = ["pattern", "chain (root last)", "becomes", "what"]
    lines = [_row(head), _row(["---"] * len(head))]
    for f in module_fusions:
        folds = any(isinstance(t, type) and "BatchNorm" in t.__name__
                    for op in f.pattern.ops for t in op.targets)
        becomes = "one fused module" + (" (BatchNorm folded in eval mode)" if folds else "")
        lines.append(_row([_code(f.pattern.name), _chain_text(f.pattern), becomes,
                           f.description]))
    for g in group_fusions:
        lines.append(_row([_code(g.pattern.name), _chain_text(g.pattern),
                           f"one kernel group: `{g.kernel}`", g.description]))
    return "\n".join(lines)


def spelling_table() -> str:
    head = ["written as", "normalized to", "how"]
    lines = [_row(head), _row(["---"] * len(head))]
    seen: set[tuple[str, str]] = set()
    for s in SPELLINGS:
        key = (spelling_label(s.target), spelling_label(s.canonical))
        if key in seen:
            continue  # one object under two names (F.relu_ is torch.relu_)
        seen.add(key)
        how = []
        if s.inplace:
            how.append("in place → out of place, later readers re-pointed")
        if s.tensor_only:
            how.append("tensors only (Python numbers stay Python)")
        if s.module_args is not None:
            how.append("module → function with the module's arguments")
        lines.append(_row([", ".join(_spelling_texts(s.target)),
                           ", ".join(_spelling_texts(s.canonical)), "; ".join(how)]))
    removed: list[str] = []
    for t in (*DROPOUT_MODULES, *IDENTITY_MODULES, *DROPOUT_FUNCTIONS):
        removed += [text for text in _spelling_texts(t) if text not in removed]
    lines.append(_row([", ".join(removed), "removed", "identity at inference (eval mode)"]))
    return "\n".join(lines)


# ---------------------------------------------------------------- the README section
def generate(backends: Optional[Sequence[Backend]] = None,
             module_fusions: Optional[Sequence[ModuleFusion]] = None,
             group_fusions: Optional[Sequence[GroupFusion]] = None) -> str:
    """The Markdown between the markers (without them), ending with a newline."""
    backends = tuple(backends) if backends is not None else builtin_backends()
    module_fusions = default_module_fusions() if module_fusions is None else module_fusions
    group_fusions = default_group_fusions() if group_fusions is None else group_fusions
    parts = [
        "<!-- generated by `make optable` (python -m fxquant.optable --write README.md) from "
        "fxquant/backends, fxquant/fusion.py and fxquant/ops.py: do not edit by hand -->",
        "An op that no rule of the chosen backend accepts stays float, with a `keep_float` "
        "decision that names the reason. Lowering probes each kernel on the real shapes: an op "
        "whose kernel fails there runs in float between dequantize and quantize, with the "
        "reason recorded. Backends: "
        + ", ".join(f"`{b.name}` ({b.description})" if b.description else f"`{b.name}`"
                    for b in backends) + ".",
        "### Quantized ops\n\n" + op_table(backends),
        "### Fusions\n\nEach op of a chain in any of its spellings (see below); interior nodes "
        "must have no other users.\n\n" + fusion_table(module_fusions, group_fusions),
        "### Spellings\n\nWhat `normalize` rewrites before any pattern is matched; the op table "
        "above lists each spelling with the op it reaches.\n\n" + spelling_table(),
    ]
    return "\n\n".join(parts) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the markers replaced by ``section``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"markers {START} ... {END} not found (in this order)")
    return text[:start + len(START)] + "\n" + section + text[end:]


def current_section(text: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"markers {START} ... {END} not found (in this order)")
    return text[start + len(START):end].lstrip("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxquant.optable", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the section between the markers")
    group.add_argument("--check", metavar="FILE", help="exit 1 if the section is out of date")
    args = parser.parse_args(argv)
    section = generate()
    if args.write:
        path = Path(args.write)
        new = replace_section(path.read_text(), section)
        if new != path.read_text():
            path.write_text(new)
            print(f"{path}: supported-op table updated")
        return 0
    if args.check:
        if current_section(Path(args.check).read_text()) != section:
            print(f"{args.check}: supported-op table is out of date; run `make optable`",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
