"""The ``fxquant`` command.

    fxquant quantize tests.models:TinyResNet --example-shape 1,3,32,32 --backend x86 \\
        --calib random --steps 8 --out model.pt --report report.html
    fxquant report model.pt --float tests.models:TinyResNet --example-shape 1,3,32,32 --out r.md
    fxquant viz model.pt --out model.svg --collapse-depth 2

MODULE:FACTORY is a dotted module importable from the current directory
(``tests.models:TinyResNet``) or a path to a Python file (``examples/static_ptq_resnet.py:
make_model``); FACTORY is called with no arguments, after ``torch.manual_seed(0)`` (so that a
randomly initialized model is the same each time), and returns the float ``nn.Module``.
Problems with what was typed (a factory that cannot be imported, a shape the model does not
accept, a missing calibration file) exit with status 2 and say how to fix them.

A model written by ``quantize --out`` is the converted GraphModule (``torch.load(path,
weights_only=False)`` gives it back, runnable) carrying its decision records, which
``report`` and ``viz`` read: see :func:`save_model` / :func:`load_model`.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import pickle
import sys
from typing import Any, Optional, Sequence, TextIO

import torch
import torch.fx as fx
import torch.nn as nn

RECORDS_ATTR = "_fxquant_records"
USAGE_ERROR = 2
FAILURE = 1


class UsageError(Exception):
    """A problem with the command line: the message names it and the fix."""


# ------------------------------------------------------------------------------ model files
def _parent_dir(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _portable(info: Any) -> Any:
    """The record, or a copy whose Python objects that do not pickle are strings."""
    try:
        pickle.dumps(info)
        return info
    except Exception:  # noqa: BLE001 - user classes / lambdas in the record
        new = info.copy()
        new.original = str(new.original)
        new.qconfig = None if new.qconfig is None else str(new.qconfig)
        new.input_specs, new.weight_spec = {}, None
        new.output_spec = None
        return new


def _target_key(node: fx.Node) -> str:
    from fxquant.patterns import target_name

    return target_name(node.target) if node.op == "call_function" else str(node.target)


def save_model(gm: fx.GraphModule, path: str) -> None:
    """``torch.save`` the GraphModule with its decision records (which torch.fx drops when
    pickling): ``torch.load`` returns a runnable model, :func:`load_model` the records too."""
    from fxquant.meta import qinfo_or_none

    records = [(n.op, _target_key(n), _portable(qinfo_or_none(n))) for n in gm.graph.nodes]
    _parent_dir(path)
    setattr(gm, RECORDS_ATTR, records)
    try:
        torch.save(gm, path)
    finally:
        delattr(gm, RECORDS_ATTR)


def load_model(path: str) -> fx.GraphModule:
    """Load a model file of :func:`save_model` and put its records back on the nodes."""
    from fxquant.meta import META_KEY

    if not os.path.exists(path):
        raise UsageError(f"model file {path!r} not found; write one with "
                         f"`fxquant quantize ... --out {path}`")
    gm = torch.load(path, weights_only=False)
    if not isinstance(gm, fx.GraphModule):
        raise UsageError(f"{path!r} holds a {type(gm).__name__}, not a GraphModule; write it "
                         f"with `fxquant quantize ... --out {path}`")
    records = getattr(gm, RECORDS_ATTR, None)
    nodes = list(gm.graph.nodes)
    if records is None or len(records) != len(nodes):
        raise UsageError(f"{path!r} has no fxquant decision records (torch.save drops them); "
                         f"write it with `fxquant quantize ... --out` or "
                         f"fxquant.cli.save_model(gm, path)")
    for node, (op, target, info) in zip(nodes, records):
        if node.op != op or _target_key(node) != target:
            raise UsageError(f"{path!r}: the records do not match the graph at {node.name}")
        if info is not None:
            node.meta[META_KEY] = info
    delattr(gm, RECORDS_ATTR)
    return gm


# ------------------------------------------------------------------------------ arguments
_FACTORY_HELP = ("MODULE:FACTORY, e.g. tests.models:TinyResNet or "
                 "examples/static_ptq_resnet.py:make_model")


def _import_module(name: str) -> Any:
    if name.endswith(".py") or os.sep in name or "/" in name:
        if not os.path.isfile(name):
            raise UsageError(f"cannot import {name!r}: no such file. Fix: give the path of a "
                             f"Python file relative to {os.getcwd()} ({_FACTORY_HELP})")
        stem = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(stem, name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[stem] = module  # so that its classes pickle by name in this process
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - reported with the fix
            sys.modules.pop(stem, None)
            raise UsageError(f"importing {name!r} failed: {type(e).__name__}: {e}. "
                             f"Fix the error in that file") from e
        return module
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


def _calibration(calib: str, shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    if calib == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*shape, generator=g) for _ in range(steps)]
    if not os.path.isfile(calib):
        raise UsageError(f"--calib {calib!r}: no such file. Fix: pass 'random' or a file "
                         f"written with torch.save(tensor_or_list_of_tensors, path)")
    data = torch.load(calib, weights_only=False)
    if isinstance(data, torch.Tensor):
        data = list(torch.split(data, shape[0]))
    if not isinstance(data, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in data):
        raise UsageError(f"--calib {calib!r} holds {type(data).__name__}. Fix: save a tensor "
                         f"(N, ...) or a list of batch tensors")
    bad = [tuple(t.shape) for t in data if tuple(t.shape[1:]) != shape[1:]]
    if bad:
        raise UsageError(f"--calib {calib!r}: batch of shape {list(bad[0])} does not fit "
                         f"--example-shape {list(shape)}. Fix: make the sizes after the batch "
                         f"dimension match")
    return [t.float() for t in data[:steps]]


def progress(i: int, n: int, stream: TextIO, label: str = "calibrating", width: int = 30) -> None:
    """A plain-text progress bar on one line of ``stream``."""
    filled = width * i // max(n, 1)
    stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {i}/{n}")
    if i >= n:
        stream.write("\n")
    stream.flush()


# ------------------------------------------------------------------------------ commands
def cmd_quantize(args: argparse.Namespace) -> int:
    import fxquant
    from fxquant.backends.base import get_backend
    from fxquant.backends.engine import engine

    shape = parse_shape(args.example_shape)
    model = load_factory(args.factory)
    example = check_shape(model, shape)
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: calibrate on at least 1 batch")
    batches = _calibration(args.calib, shape, args.steps, args.seed)
    try:
        backend = get_backend(args.backend)
    except fxquant.FxQuantError as e:
        raise UsageError(f"--backend {args.backend!r}: {e}") from e
    mapping = fxquant.get_default_qconfig_mapping(backend.name)
    prepared = fxquant.prepare_fx(model, mapping, (example,), backend=backend.name)
    with torch.no_grad(), engine(backend.engine):
        for i, batch in enumerate(batches, 1):
            prepared(batch)
            progress(i, len(batches), sys.stderr)
        quantized = fxquant.convert_fx(prepared)
    _outputs(args, model, quantized, batches)
    return 0


def _outputs(args: argparse.Namespace, model: nn.Module, quantized: fx.GraphModule,
             batches: list[torch.Tensor]) -> None:
    from fxquant.report import build

    if args.out:
        save_model(quantized, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    rep = build(quantized, model, batches[: max(1, args.eval_steps)])
    if args.report:
        _parent_dir(args.report)
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

    gm = load_model(args.model)
    model, inputs = None, None
    if args.float:
        model = load_factory(args.float)
        if args.example_shape:
            shape = parse_shape(args.example_shape)
            check_shape(model, shape)
            inputs = _calibration(args.inputs, shape, args.steps, args.seed)
        elif args.inputs != "random":
            raise UsageError("--inputs PATH needs --example-shape too (the batch layout)")
    rep = build(gm, copy.deepcopy(model) if model is not None else None, inputs,
                title=f"fxquant report: {os.path.basename(args.model)}")
    if args.out:
        _parent_dir(args.out)
        rep.save(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(rep.to_text())
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from fxquant.viz import visualize

    gm = load_model(args.model)
    if args.collapse_depth is not None and args.collapse_depth < 1:
        raise UsageError(f"--collapse-depth {args.collapse_depth}: use 1 or more")
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
    q.add_argument("--out", metavar="model.pt", help="write the quantized model here")
    q.add_argument("--report", metavar="report.html",
                   help="write the report (.html, .md or text) instead of printing it")
    q.add_argument("--viz", metavar="graph.svg", help="also draw the graph (.svg, .png, .dot)")
    q.set_defaults(run=cmd_quantize)
    r = sub.add_parser("report", help="the report of a model written by `quantize --out`",
                       description="One row per op: decision, qconfig rule, dtypes, qparams, "
                                   "kernel; with --float, per-layer SQNR against float.")
    r.add_argument("model", metavar="model.pt")
    r.add_argument("--float", metavar="MODULE:FACTORY", help="the float model, for numerics")
    r.add_argument("--example-shape", metavar="N,C,H,W", help="input shape for the numerics")
    r.add_argument("--inputs", default="random", metavar="random|PATH")
    r.add_argument("--steps", type=int, default=2, help="batches to measure on (default 2)")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--out", metavar="report.html", help=".html, .md or text (default: print)")
    r.set_defaults(run=cmd_report)
    v = sub.add_parser("viz", help="draw a model written by `quantize --out`",
                       description="Graphviz drawing colored by decision, tooltips with reasons.")
    v.add_argument("model", metavar="model.pt")
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


if __name__ == "__main__":
    sys.exit(main())
