"""The ``fxquant`` command.

    fxquant quantize tests.models:TinyResNet --example-shape 1,3,32,32 --backend x86 \\
        --calib random --steps 8 --out model.fxq --report report.html
    fxquant report model.fxq                       # the decisions, from the file alone
    fxquant report model.fxq --float tests.models:TinyResNet --example-shape 1,3,32,32 --out r.md
    fxquant viz model.fxq --out model.svg --collapse-depth 2

MODULE:FACTORY is a dotted module importable from the current directory
(``tests.models:TinyResNet``) or a path to a Python file (``examples/static_ptq_resnet.py:
make_model``); FACTORY is called with no arguments, after ``torch.manual_seed(0)`` (so that a
randomly initialized model is the same each time), and returns the float ``nn.Module``.

Model files are safe to open. ``quantize --out`` writes :func:`fxquant.save`'s format: tensors
and JSON in a file that ``torch.load(path, weights_only=True)`` reads, with no pickled code.
``report`` and ``viz`` read the decision records and the graph from it alone
(:func:`fxquant.serialize.read_graph`); ``report --float --example-shape`` rebuilds the
runnable model from the float model (:func:`fxquant.load`, checked against the file) to
measure it. A pickle (e.g. a GraphModule saved with ``torch.save``) is refused without being
unpickled, and so is a ``--calib`` / ``--inputs`` file holding anything but tensors.

Every output path (``--out``, ``--report``, ``--viz``) is checked (writable, known extension)
before anything is calibrated. A usage problem (a factory that cannot be imported, a shape
the model does not accept, a missing or wrong file, an output that cannot be written) exits
with status 2 and one message that names it and the fix, never a traceback; a problem fxquant
finds in the model exits with status 1.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from typing import Any, Optional, Sequence, TextIO

import torch
import torch.fx as fx
import torch.nn as nn

USAGE_ERROR = 2
FAILURE = 1
INTERRUPTED = 130
REPORT_SUFFIXES = (".html", ".htm", ".md", ".txt")
VIZ_SUFFIXES = (".svg", ".png", ".dot")


class UsageError(Exception):
    """A problem with the command line: the message names it and the fix."""


# ------------------------------------------------------------------------------ model files
def save_model(model: nn.Module, path: str) -> None:
    """Write a converted model as a safe fxquant model file (:func:`fxquant.save`)."""
    from fxquant.serialize import save

    save(model, path)


def load_model(path: str) -> nn.Module:
    """The graph and decision records of a model file, for report / viz
    (:func:`fxquant.serialize.read_graph`; it does not run). Usage errors name the fix."""
    from fxquant.serialize import ArtifactError, read_graph

    try:
        model = read_graph(path)
    except ArtifactError as e:
        raise UsageError(_one_line(e)) from e
    if not hasattr(model, "graph"):
        from fxquant.errors import FxQuantError

        pieces = [n for n, m in model.named_modules() if hasattr(m, "graph")]
        raise FxQuantError(f"{path!r} holds a model quantized piece by piece (its forward runs "
                           f"eagerly; pieces {pieces}): report and viz draw one graph",
                           hint="use fxquant.serialize.read_graph(path).get_submodule(piece) "
                                "in Python")
    return model


def load_runnable(path: str, float_model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The runnable quantized model of a model file, rebuilt from its float model."""
    from fxquant.serialize import ArtifactError, load

    try:
        return load(copy.deepcopy(float_model), path, (example,))
    except ArtifactError as e:
        raise UsageError(_one_line(e)) from e


def _one_line(e: Exception) -> str:
    from fxquant.errors import FxQuantError

    if isinstance(e, FxQuantError):
        return f"{e.raw_message}. Fix: {e.hint}" if e.hint else e.raw_message
    return str(e)


# ------------------------------------------------------------------------------ output paths
def check_output(path: str, flag: str, suffixes: Sequence[str] = ()) -> None:
    """Before any work: ``path`` has a known suffix and can be written (its directory exists
    or can be made, and a file can be created there). Creates missing parent directories."""
    if suffixes and os.path.splitext(path)[1].lower() not in suffixes:
        raise UsageError(f"{flag} {path!r}: unknown file type "
                         f"{os.path.splitext(path)[1] or '(no extension)'!r}. Fix: end it with "
                         f"{', '.join(suffixes)}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory. Fix: give a file path, e.g. "
                         f"{os.path.join(path, 'out' + (suffixes[0] if suffixes else '.fxq'))}")
    parent = os.path.dirname(os.path.abspath(path))
    blocker = _file_in_the_way(parent)
    if blocker:
        raise UsageError(f"{flag} {path!r} cannot be written: {blocker!r} is a file, not a "
                         f"directory. Fix: choose a path in a directory")
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".fxquant-write-check-"):
            pass
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as e:
        raise UsageError(f"{flag} {path!r} cannot be written ({e.strerror or e}). Fix: choose "
                         f"a path in a directory you can write to") from e


def _file_in_the_way(directory: str) -> Optional[str]:
    """The nearest existing ancestor of ``directory`` (itself included) when it is a file."""
    d = directory
    while d and not os.path.exists(d):
        d = os.path.dirname(d) if os.path.dirname(d) != d else ""
    return d if d and not os.path.isdir(d) else None


def check_viz_output(path: str, fmt: Optional[str] = None, flag: str = "--viz") -> None:
    """Known drawing suffix, writable, and Graphviz's ``dot`` present for svg / png."""
    if fmt is None:
        check_output(path, flag, VIZ_SUFFIXES)
        fmt = os.path.splitext(path)[1].lower().lstrip(".")
    else:
        check_output(path, flag)
    if fmt != "dot" and shutil.which("dot") is None:
        raise UsageError(f"{flag} {path!r}: drawing {fmt} needs Graphviz's `dot`, which is not "
                         f"installed. Fix: install graphviz (apt-get install graphviz) or write "
                         f"a .dot file")


# ------------------------------------------------------------------------------ arguments
_FACTORY_HELP = ("MODULE:FACTORY, e.g. tests.models:TinyResNet or "
                 "examples/static_ptq_resnet.py:make_model")


def _import_module(name: str) -> Any:
    if name.endswith(".py") or os.sep in name or "/" in name:
        return _import_file(name)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise UsageError(f"cannot import module {name!r} ({e}). Fix: run from the directory "
                         f"that contains it, install it, or give a file path "
                         f"({_FACTORY_HELP})") from e
    except Exception as e:  # noqa: BLE001 - reported with the fix
        raise UsageError(f"importing module {name!r} failed: {type(e).__name__}: {e}. "
                         f"Fix the error in that module") from e


def _import_file(name: str) -> Any:
    if not os.path.isfile(name):
        raise UsageError(f"cannot import {name!r}: no such file. Fix: give the path of a "
                         f"Python file relative to {os.getcwd()} ({_FACTORY_HELP})")
    stem = os.path.splitext(os.path.basename(name))[0]
    spec = importlib.util.spec_from_file_location(stem, name)
    if spec is None or spec.loader is None or not name.endswith(".py"):
        raise UsageError(f"{name!r} is not a Python file. Fix: MODULE is a .py file or a dotted "
                         f"module name ({_FACTORY_HELP}); model files go after `report` / `viz`")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - reported with the fix
        sys.modules.pop(stem, None)
        raise UsageError(f"importing {name!r} failed: {type(e).__name__}: {e}. "
                         f"Fix the error in that file") from e
    return module


def load_factory(spec: str) -> nn.Module:
    """Import MODULE:FACTORY, call FACTORY() (after ``torch.manual_seed(0)``) and return the
    float model in eval mode."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{spec!r} is not MODULE:FACTORY. Fix: write it as {_FACTORY_HELP}")
    module = _import_module(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"{module_name!r} has no callable {attr!r}. Fix: use one of "
                         f"{', '.join(names) or '(none found)'}")
    torch.manual_seed(0)  # a randomly initialized model is the same in `quantize` and `report`
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - reported with the fix
        raise UsageError(f"{spec}() raised {type(e).__name__}: {e}. Fix: FACTORY must be "
                         f"callable with no arguments") from e
    if isinstance(model, tuple) and model and isinstance(model[0], nn.Module):
        model = model[0]
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module. "
                         f"Fix: point at a function or class that builds the float model")
    return model.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--example-shape {text!r} is not a shape. Fix: give positive integers "
                         f"separated by commas, batch first, e.g. 1,3,224,224")
    return shape


def check_shape(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """Run the float model once on a random input of ``shape``; a clear error when it fails."""
    x = torch.randn(*shape)
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:  # noqa: BLE001 - reported with the fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"the model does not accept an input of shape {list(shape)}: "
                         f"{type(e).__name__}: {first}. Fix: pass the --example-shape its "
                         f"forward expects (batch first), e.g. 1,3,224,224 for an image "
                         f"model") from e
    return x


def _calibration(calib: str, shape: tuple[int, ...], steps: int, seed: int,
                 flag: str = "--calib") -> list[torch.Tensor]:
    if calib == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*shape, generator=g) for _ in range(steps)]
    data = _load_tensors(calib, flag)
    if isinstance(data, torch.Tensor):
        data = list(torch.split(data, shape[0])) if data.dim() and len(data) else []
    if not isinstance(data, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in data):
        raise UsageError(f"{flag} {calib!r} holds {type(data).__name__}. Fix: save a tensor "
                         f"(N, ...) or a list of batch tensors")
    if not data:
        raise UsageError(f"{flag} {calib!r} holds no batches. Fix: save a tensor (N, ...) "
                         f"with N >= 1 or a non-empty list of batch tensors")
    bad = [tuple(t.shape) for t in data if tuple(t.shape[1:]) != shape[1:]]
    if bad:
        raise UsageError(f"{flag} {calib!r}: batch of shape {list(bad[0])} does not fit "
                         f"--example-shape {list(shape)}. Fix: make the sizes after the batch "
                         f"dimension match")
    return [t.float() for t in data[:steps]]


def _load_tensors(path: str, flag: str) -> Any:
    """A tensor file, read with ``weights_only=True``: a pickle with code is refused."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r}: no such file. Fix: pass 'random' or a file "
                         f"written with torch.save(tensor_or_list_of_tensors, path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickles with code, text, truncated files
        from fxquant.serialize import pickled_code

        unsafe = pickled_code(e)
        why = ("holds pickled Python objects, which could run code: refused" if unsafe
               else f"is not a file torch.save wrote ({type(e).__name__})")
        raise UsageError(f"{flag} {path!r} {why}. Fix: save the data with "
                         f"torch.save(tensor_or_list_of_tensors, path)") from None


def progress(i: int, n: int, stream: TextIO, label: str = "calibrating", width: int = 30) -> None:
    """A plain-text progress bar on one line of ``stream``."""
    filled = width * i // max(n, 1)
    stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {i}/{n}")
    if i >= n:
        stream.write("\n")
    stream.flush()


# ------------------------------------------------------------------------------ commands
def check_quantize_outputs(args: argparse.Namespace) -> None:
    """Every output of ``quantize`` can be written, before the model is even built."""
    if args.out:
        check_output(args.out, "--out")
    if args.report:
        check_output(args.report, "--report", REPORT_SUFFIXES)
    if args.viz:
        check_viz_output(args.viz)
    paths = [os.path.abspath(p) for p in (args.out, args.report, args.viz) if p]
    if len(set(paths)) < len(paths):
        raise UsageError("--out, --report and --viz name the same file. Fix: give each its own")


def cmd_quantize(args: argparse.Namespace) -> int:
    import fxquant
    from fxquant.backends.registry import get_backend
    from fxquant.backends.engine import engine

    check_quantize_outputs(args)
    shape = parse_shape(args.example_shape)
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: calibrate on at least 1 batch")
    try:
        backend = get_backend(args.backend)
    except fxquant.FxQuantError as e:
        raise UsageError(f"--backend {args.backend!r}: {e}") from e
    model = load_factory(args.factory)
    example = check_shape(model, shape)
    batches = _calibration(args.calib, shape, args.steps, args.seed)
    mapping = fxquant.get_default_qconfig_mapping(backend.name)
    prepared = fxquant.prepare_fx(model, mapping, (example,), backend=backend.name)
    with torch.no_grad(), engine(backend.engine):
        for i, batch in enumerate(batches, 1):
            prepared(batch)
            progress(i, len(batches), sys.stderr)
        quantized = fxquant.convert_fx(prepared)
    _outputs(args, model, quantized, batches)
    return 0


def _outputs(args: argparse.Namespace, model: nn.Module, quantized: nn.Module,
             batches: list[torch.Tensor]) -> None:
    from fxquant.report import build

    if args.out:
        save_model(quantized, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    rep = build(quantized, model, batches[: max(1, args.eval_steps)])
    if args.report:
        rep.save(args.report)
        print(f"wrote {args.report}", file=sys.stderr)
    else:
        print(rep.to_text())
    if args.viz:
        from fxquant.viz import visualize

        visualize(quantized, args.viz)
        print(f"wrote {args.viz}", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    from fxquant.report import build

    if args.out:
        check_output(args.out, "--out", REPORT_SUFFIXES)
    if not args.float and (args.example_shape or args.inputs != "random"):
        raise UsageError("--example-shape / --inputs measure the model against float and need "
                         "--float MODULE:FACTORY too. Fix: add --float, or drop them for the "
                         "decisions only")
    if args.float and args.inputs != "random" and not args.example_shape:
        raise UsageError("--inputs PATH needs --example-shape too (the batch layout). Fix: add "
                         "--example-shape N,C,H,W")
    gm = load_model(args.model)  # the file is checked (and pickles refused) first
    model, inputs = None, None
    if args.float:
        model = load_factory(args.float)
        if args.example_shape:
            shape = parse_shape(args.example_shape)
            example = check_shape(model, shape)
            inputs = _calibration(args.inputs, shape, args.steps, args.seed, "--inputs")
            gm = load_runnable(args.model, model, example)
    rep = build(gm, copy.deepcopy(model) if model is not None else None, inputs,
                title=f"fxquant report: {os.path.basename(args.model)}")
    if args.out:
        rep.save(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(rep.to_text())
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from fxquant.viz import visualize

    if args.collapse_depth is not None and args.collapse_depth < 1:
        raise UsageError(f"--collapse-depth {args.collapse_depth}: use 1 or more")
    check_viz_output(args.out, args.format, "--out")
    gm = load_model(args.model)
    visualize(gm, args.out, args.format, args.collapse_depth,
              show_observers=not args.hide_observers)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxquant", description="Quantize PyTorch models with "
                                "torch.fx and see every decision fxquant made.")
    sub = p.add_subparsers(dest="command", metavar="{quantize,report,viz}")
    sub.required = True
    q = sub.add_parser("quantize", help="static int8 post-training quantization of a model",
                       description="Build the float model, calibrate it and convert it to int8; "
                                   "print or write the report.")
    q.add_argument("factory", metavar="MODULE:FACTORY", help=_FACTORY_HELP)
    q.add_argument("--example-shape", required=True, metavar="N,C,H,W",
                   help="shape of one input batch, e.g. 1,3,224,224")
    q.add_argument("--backend", default="auto", help="x86, fbgemm, qnnpack, onednn or auto")
    q.add_argument("--calib", default="random", metavar="random|PATH",
                   help="random inputs, or a torch.save'd tensor (N, ...) / list of batches")
    q.add_argument("--steps", type=int, default=8, help="calibration batches (default 8)")
    q.add_argument("--eval-steps", type=int, default=2,
                   help="batches the report's per-layer SQNR is measured on (default 2)")
    q.add_argument("--seed", type=int, default=0, help="seed of random calibration data")
    q.add_argument("--out", metavar="model.fxq",
                   help="write the quantized model here (a safe fxquant model file)")
    q.add_argument("--report", metavar="report.html",
                   help="write the report (.html, .md or .txt) instead of printing it")
    q.add_argument("--viz", metavar="graph.svg", help="also draw the graph (.svg, .png, .dot)")
    q.set_defaults(run=cmd_quantize)
    r = sub.add_parser("report", help="the report of a model written by `quantize --out`",
                       description="One row per op: decision, qconfig rule, dtypes, qparams, "
                                   "kernel; with --float, per-layer SQNR against float.")
    r.add_argument("model", metavar="model.fxq")
    r.add_argument("--float", metavar="MODULE:FACTORY",
                   help="the float model the file was made from (size; with --example-shape, "
                        "the model is rebuilt and measured against it)")
    r.add_argument("--example-shape", metavar="N,C,H,W", help="input shape for the numerics")
    r.add_argument("--inputs", default="random", metavar="random|PATH")
    r.add_argument("--steps", type=int, default=2, help="batches to measure on (default 2)")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--out", metavar="report.html", help=".html, .md or .txt (default: print)")
    r.set_defaults(run=cmd_report)
    v = sub.add_parser("viz", help="draw a model written by `quantize --out`",
                       description="Graphviz drawing colored by decision, tooltips with reasons.")
    v.add_argument("model", metavar="model.fxq")
    v.add_argument("--out", required=True, metavar="graph.svg")
    v.add_argument("--format", choices=("svg", "png", "dot"), help="default: from --out")
    v.add_argument("--collapse-depth", type=int, help="one box per module path prefix")
    v.add_argument("--hide-observers", action="store_true")
    v.set_defaults(run=cmd_viz)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fxquant.errors import FxQuantError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"fxquant {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except FxQuantError as e:
        print(f"fxquant {args.command}: error: {e}", file=sys.stderr)
        return FAILURE
    except KeyboardInterrupt:
        print(f"fxquant {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
