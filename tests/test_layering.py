"""Layering rules, checked on the source with ``ast``:

1. no module under fxquant/ or passes/ imports torch.ao (import statements, ``torch.ao.*``
   attribute chains, and module-path strings such as ``importlib.import_module("torch.ao...")``);
2. quantized-tensor operations (``torch.ops.quantized``, ``torch.quantize_per_tensor``,
   ``torch.quantize_per_channel``, ``.int_repr()`` ...) appear only under fxquant/backends/ and
   fxquant/nn/;
3. passes/ never name quantized dtypes (``torch.quint8`` / ``qint8`` / ``qint32`` ...): they ask
   the backend layer / the spec instead;
4. backend / engine names ("x86", "fbgemm", "qnnpack", "onednn") appear in code only under
   fxquant/backends/ (docstrings and messages may name them): the rest asks the Backend.

Each offender is reported as ``file:line: what``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("fxquant", "passes")
KERNEL_LAYER = ("fxquant/backends/", "fxquant/nn/")

QUANTIZED_OPS = ("torch.ops.quantized", "torch.quantize_per_tensor", "torch.quantize_per_channel",
                 "torch.quantize_per_tensor_dynamic", "torch._empty_affine_quantized",
                 "torch._empty_per_channel_affine_quantized", "torch.dequantize")
QUANTIZED_TENSOR_METHODS = ("int_repr", "q_scale", "q_zero_point", "q_per_channel_scales",
                            "q_per_channel_zero_points")
QUANTIZED_DTYPES = ("torch.quint8", "torch.qint8", "torch.qint32", "torch.quint4x2",
                    "torch.quint2x4")
_AO_MODULE = re.compile(r"^torch\.ao(\.[\w.]*)?$")
_IMPORTERS = ("importlib.import_module", "import_module", "__import__", "importlib.__import__")


def library_files() -> list[Path]:
    files = []
    for d in LIBRARY_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    assert len(files) > 20, files  # the scan really sees the library
    return files


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _torch_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to torch modules: ``import torch as t`` → {"t": "torch"};
    ``from torch import ops`` → {"ops": "torch.ops"}."""
    aliases = {"torch": "torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "torch" or node.module.startswith("torch.")):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _resolve(name: str, aliases: dict[str, str]) -> str:
    head, _, rest = name.partition(".")
    if head in aliases:
        return aliases[head] + ("." + rest if rest else "")
    return name


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def torch_ao_uses(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    aliases = _torch_aliases(tree)
    docstrings = _docstring_nodes(tree)
    out = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            out += [f"{filename}:{line}: import {a.name}" for a in node.names
                    if _AO_MODULE.match(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _AO_MODULE.match(node.module):
                out.append(f"{filename}:{line}: from {node.module} import ...")
            elif node.module == "torch" and any(a.name == "ao" for a in node.names):
                out.append(f"{filename}:{line}: from torch import ao")
        elif isinstance(node, ast.Attribute) and node.attr == "ao":
            name = dotted(node)
            if name and _resolve(name, aliases) == "torch.ao":
                out.append(f"{filename}:{line}: {name}")
        elif isinstance(node, ast.Call):
            fn = dotted(node.func) or ""
            if fn in _IMPORTERS and node.args and isinstance(node.args[0], ast.Constant) and \
                    isinstance(node.args[0].value, str) and _AO_MODULE.match(node.args[0].value):
                out.append(f"{filename}:{line}: {fn}({node.args[0].value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                id(node) not in docstrings and _AO_MODULE.match(node.value):
            out.append(f"{filename}:{line}: string {node.value!r}")
    return sorted(set(out))


def named_chains(source: str, filename: str, wanted: tuple[str, ...],
                 methods: tuple[str, ...] = ()) -> list[str]:
    """Where the source names one of ``wanted`` (dotted, after resolving torch aliases and
    ``from torch import x``) or calls a method in ``methods``."""
    tree = ast.parse(source, filename)
    aliases = _torch_aliases(tree)
    out = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.Attribute, ast.Name)):
            name = dotted(node)
            if name is None:
                continue
            full = _resolve(name, aliases)
            for w in wanted:
                if full == w or full.startswith(w + "."):
                    out.append(f"{filename}:{line}: {full}")
            if isinstance(node, ast.Attribute) and node.attr in methods:
                out.append(f"{filename}:{line}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if any(full == w or full.startswith(w + ".") for w in wanted):
                    out.append(f"{filename}:{line}: from {node.module} import {a.name}")
    # one report per line and name (an Attribute chain also visits its inner parts)
    return sorted(set(out))


# ------------------------------------------------------------------------- the scanners work


def test_scanner_finds_torch_ao_in_every_form():
    src = '''
"""Docstring mentioning torch.ao.quantization is fine."""
import importlib
import torch
import torch as T
import torch.ao.quantization
from torch.ao.quantization import quantize_fx
from torch import ao
mod = importlib.import_module("torch.ao.quantization.quantize_fx")
other = __import__("torch.ao")
x = T.ao.quantization.default_qconfig
name = "torch.ao.nn.quantized"
ok = "torch.ao is mentioned in a message" + "xyz"
'''
    found = sorted(f.split(": ", 1)[1] for f in torch_ao_uses(src, "x.py"))
    assert found == sorted([
        "import torch.ao.quantization", "from torch.ao.quantization import ...",
        "from torch import ao", "importlib.import_module('torch.ao.quantization.quantize_fx')",
        "string 'torch.ao.quantization.quantize_fx'", "__import__('torch.ao')", "string 'torch.ao'",
        "T.ao", "string 'torch.ao.nn.quantized'"])


def test_scanner_finds_quantized_ops_and_dtypes():
    src = '''
import torch
import torch as T
from torch import quint8
from torch.ops import quantized
q = T.quantize_per_tensor(x, 0.1, 0, torch.quint8)
y = torch.ops.quantized.add(q, q, 0.1, 0)
z = q.int_repr()
w = torch.float32
'''
    ops = named_chains(src, "x.py", QUANTIZED_OPS, QUANTIZED_TENSOR_METHODS)
    assert sorted(o.split(": ", 1)[1] for o in ops) == sorted([
        "from torch.ops import quantized", "torch.quantize_per_tensor",
        "torch.ops.quantized", "torch.ops.quantized.add", ".int_repr"])
    dtypes = named_chains(src, "x.py", QUANTIZED_DTYPES)
    assert sorted(d.split(": ", 1)[1] for d in dtypes) == ["from torch import quint8",
                                                           "torch.quint8"]


# ------------------------------------------------------------------------------ the rules


def test_library_never_imports_torch_ao():
    offenders = []
    for path in library_files():
        offenders += torch_ao_uses(path.read_text(), rel(path))
    assert not offenders, "torch.ao used by the library:\n" + "\n".join(offenders)


def quantized_op_offenders() -> list[str]:
    offenders = []
    for path in library_files():
        name = rel(path)
        if name.startswith(KERNEL_LAYER):
            continue
        offenders += named_chains(path.read_text(), name, QUANTIZED_OPS, QUANTIZED_TENSOR_METHODS)
    return offenders


def passes_dtype_offenders() -> list[str]:
    offenders = []
    for path in sorted((ROOT / "passes").rglob("*.py")):
        offenders += named_chains(path.read_text(), rel(path), QUANTIZED_DTYPES)
    return offenders


def test_passes_never_call_quantized_ops():
    """The passes build q/dq nodes only through fxquant.backends.reference_ops."""
    offenders = [o for o in quantized_op_offenders() if o.startswith("passes/")]
    assert not offenders, "\n".join(offenders)


def test_quantized_ops_only_in_backends_and_nn():
    offenders = quantized_op_offenders()
    assert not offenders, ("quantized-tensor ops outside fxquant/backends and fxquant/nn:\n"
                           + "\n".join(offenders))


def test_passes_never_name_quantized_dtypes():
    offenders = passes_dtype_offenders()
    assert not offenders, "quantized dtypes named in passes/:\n" + "\n".join(offenders)


def _file_and_name(offender: str) -> tuple[str, str]:
    where, what = offender.split(": ", 1)
    return where.rsplit(":", 1)[0], what


def test_no_new_layering_offenders():
    """The two xfails above list the known offenders; this one fails on any NEW offender (file,
    name) even while those are expected to fail. Line numbers are not pinned (the files change);
    fixing a known offender keeps this passing."""
    known_ops = {("fxquant/lint.py", "torch.quantize_per_tensor")}
    known_dtypes = {("passes/annotate.py", "torch.quint8"), ("passes/annotate.py", "torch.qint8"),
                    ("passes/convert.py", "torch.quint8"), ("passes/convert.py", "torch.qint8"),
                    ("passes/convert.py", "torch.qint32")}
    new_ops = {_file_and_name(o) for o in quantized_op_offenders()} - known_ops
    new_dtypes = {_file_and_name(o) for o in passes_dtype_offenders()} - known_dtypes
    assert not new_ops and not new_dtypes, (sorted(new_ops), sorted(new_dtypes))


# ------------------------------------------------------------ backend names stay in backends/

# The built-in backend / engine names, spelled here too so that emptying a constant in the
# library cannot silence the check.
BACKEND_NAMES = frozenset({"fbgemm", "x86", "qnnpack", "onednn"})
BACKEND_LAYER = "fxquant/backends/"


def _all_backend_names() -> frozenset[str]:
    from fxquant.backends.engine import KNOWN_ENGINES
    from fxquant.backends.names import BUILTIN_BACKENDS

    return BACKEND_NAMES | frozenset(BUILTIN_BACKENDS) | frozenset(KNOWN_ENGINES)


def backend_name_strings(source: str, filename: str, names: frozenset[str]) -> list[str]:
    """Where the code (not a docstring) holds a string constant equal to one of ``names``:
    a comparison, an ``in`` test, a default argument, a tuple or a call argument alike."""
    tree = ast.parse(source, filename)
    docstrings = _docstring_nodes(tree)
    return sorted({f"{filename}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)
                   and node.value in names and id(node) not in docstrings})


def test_scanner_finds_backend_names_in_code_not_docstrings():
    src = '''
"""Module docstring naming "x86" and qnnpack is fine."""
def f(backend: str = "x86") -> bool:
    """So is a function docstring: 'fbgemm'."""
    if backend == "qnnpack":
        return backend in ("fbgemm", "onednn")
    msg = f"use the {backend!r} engine, e.g. 'x86'"  # part of a message: not a name
    return get(backend, "onednn")
'''
    found = backend_name_strings(src, "x.py", BACKEND_NAMES)
    assert sorted(found) == sorted(["x.py:3: 'x86'", "x.py:5: 'qnnpack'", "x.py:6: 'fbgemm'",
                                    "x.py:6: 'onednn'", "x.py:8: 'onednn'"])


def test_no_backend_names_outside_backends():
    """Backend policy belongs to the Backend (fxquant/backends/): the rest of the library
    asks it (``get_backend(name)``, ``fxquant.backends.engine``), never compares names."""
    names = _all_backend_names()
    offenders = []
    for path in library_files():
        name = rel(path)
        if not name.startswith(BACKEND_LAYER):
            offenders += backend_name_strings(path.read_text(), name, names)
    assert not offenders, ("backend / engine names outside fxquant/backends/ (ask the Backend "
                           "or fxquant.backends.engine instead):\n" + "\n".join(offenders))
