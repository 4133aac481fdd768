"""``fxquant.compile(qmodel, example_inputs, backend=...)``: run a converted model on another
execution engine and get back an ``nn.Module`` to call.

Each engine lives in ``fxquant/backends/`` and is imported only when asked for, so the core
install stays torch + networkx + graphviz; an engine whose package is missing raises
:class:`EngineUnavailable` naming the extra to install. Engines register here by name
(:func:`register_engine`); the built-in ones are listed lazily in ``_BUILTIN`` as
``"module:function"``. An engine function takes ``(qmodel, example_inputs, **options)`` and
returns an ``nn.Module`` whose outputs agree with ``qmodel``'s.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Union

import torch.nn as nn

from fxquant.errors import FxQuantError

EngineFn = Callable[..., nn.Module]

_BUILTIN: dict[str, str] = {
    "inductor": "fxquant.backends.inductor:compile_inductor",
    "onnxruntime": "fxquant.backends.onnx:compile_onnxruntime",
    "openvino": "fxquant.backends.openvino:compile_openvino",
}
_ENGINES: dict[str, Union[str, EngineFn]] = dict(_BUILTIN)


class EngineUnavailable(FxQuantError):
    """The engine's package (an optional extra) is not installed."""


def register_engine(name: str, fn: Union[str, EngineFn]) -> None:
    """Make ``fxquant.compile(..., backend=name)`` call ``fn`` (a callable or a lazy
    ``"module:function"`` string)."""
    _ENGINES[name] = fn


def engines() -> tuple[str, ...]:
    return tuple(sorted(_ENGINES))


def _resolve(name: str) -> EngineFn:
    if name not in _ENGINES:
        raise FxQuantError(f"unknown compile backend '{name}'",
                           hint=f"use one of {list(engines())} or register_engine(...) your own")
    fn = _ENGINES[name]
    if isinstance(fn, str):
        module, _, attr = fn.partition(":")
        fn = getattr(importlib.import_module(module), attr)
    return fn


def compile(qmodel: nn.Module, example_inputs: tuple, backend: str = "inductor",
            **options: Any) -> nn.Module:  # noqa: A001 - the public name users expect
    """Run ``qmodel`` (a ``convert_fx`` result) on ``backend``; see the module docstring."""
    return _resolve(backend)(qmodel, tuple(example_inputs), **options)
