"""Select torch's quantized CPU engine for a block of code.

Quantized modules pack their weights for the engine that is current when they are built
(and re-pack after ``torch.load`` / ``load_state_dict``), so the converter wraps lowering in
``with engine(backend_name):``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["KNOWN_ENGINES", "clamp_needs_contiguous", "conv_unpack_unavailable",
           "current_engine", "deconv_packing_engine", "dynamic_reduce_range", "engine",
           "fp16_packing_available", "has_per_channel_deconv", "is_deconv3d_wrong",
           "keeps_first_call_primitive", "supported_engines"]

KNOWN_ENGINES: tuple[str, ...] = ("fbgemm", "x86", "qnnpack", "onednn")

# What torch 2.13's engines get wrong or lack, asked by fxquant.nn's quantized modules
# (which never compare engine names themselves; tests/test_layering.py).
_CONTIGUOUS_CLAMP = frozenset({"qnnpack"})  # clamp kernels wrong on channels-last input
_NO_FP16_PACKING = frozenset({"qnnpack"})  # no linear_prepack_fp16
_NO_CONV_UNPACK = frozenset({("qnnpack", 3)})  # (engine, spatial dims): packed, not unpackable
_WRONG_DECONV = frozenset({"x86", "onednn"})  # onednn's deconvolution: off by up to 255 steps
_DECONV_FALLBACK = "fbgemm"  # ... so their transposed convs are packed with this engine
_PER_CHANNEL_DECONV = frozenset({"qnnpack"})  # per-channel transposed-conv weights
_WRONG_DECONV3D = frozenset({"qnnpack"})  # conv_transpose3d nondeterministic, wrong
_FULL_RANGE_DYNAMIC = frozenset({"qnnpack"})  # dynamic linear: 8-bit activations, not 7-bit
# packed weights that keep oneDNN's primitive of their first call's input shape and rebuild it
# on every call of another shape (x86 hands convs to oneDNN on VNNI CPUs)
_FIRST_CALL_PRIMITIVE = frozenset({"x86", "onednn"})


def keeps_first_call_primitive(engine_name: str) -> bool:
    """Whether weights packed for ``engine_name`` may cache the kernel of the first input shape
    they run on: a call with another shape then builds the kernel again, every time (torch
    2.13's oneDNN conv; ResNet-18 at batch 1 after a first call at batch 4: 1.3x the time,
    AVX-512 VNNI CPU). Modules run during convert repack so that the user's first call sets it."""
    return engine_name in _FIRST_CALL_PRIMITIVE


def supported_engines() -> tuple[str, ...]:
    """The quantized engines this torch build can run ("none" left out)."""
    return tuple(e for e in torch.backends.quantized.supported_engines if e != "none")


def current_engine() -> str:
    """The engine torch.ops.quantized.* would pack and run with right now."""
    return str(torch.backends.quantized.engine)


def _check_engine(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"engine name must be a str such as 'fbgemm', got {type(name).__name__}")
    available = supported_engines()
    if name not in available:
        hint = "" if name in KNOWN_ENGINES else f" (known engine names: {', '.join(KNOWN_ENGINES)})"
        raise ValueError(
            f"quantized engine {name!r} is not supported by this torch build; "
            f"pick one of {', '.join(available)}{hint}"
        )


@contextmanager
def engine(name: str) -> Iterator[str]:
    """Set ``torch.backends.quantized.engine`` to ``name`` inside the block, then restore it.

    Raises ValueError naming the available engines when ``name`` is not in
    ``torch.backends.quantized.supported_engines``.
    """
    _check_engine(name)
    previous = current_engine()
    torch.backends.quantized.engine = name
    try:
        yield name
    finally:
        torch.backends.quantized.engine = previous


def _named(name: str | None) -> str:
    return current_engine() if name is None else name


def clamp_needs_contiguous(name: str | None = None) -> bool:
    """Whether engine ``name`` (default: the current one) clamps channels-last input wrongly,
    so an in-place clamp must first make its input contiguous."""
    return _named(name) in _CONTIGUOUS_CLAMP


def fp16_packing_available(name: str | None = None) -> bool:
    """Whether engine ``name`` (default: the current one) packs float16 linear weights."""
    return _named(name) not in _NO_FP16_PACKING


def conv_unpack_unavailable(name: str, spatial_dims: int) -> bool:
    """Whether conv weights packed by ``name`` for this many spatial dims run but cannot be
    unpacked again (the module must keep an unpacked copy for state_dict and pickling)."""
    return (name, spatial_dims) in _NO_CONV_UNPACK


def deconv_packing_engine(name: str | None = None) -> str | None:
    """The engine to pack a transposed conv with when ``name`` (default: the current one) is
    asked for: ``name`` itself, or fbgemm where ``name``'s deconvolution is wrong; None when it
    is wrong and this build has no fbgemm."""
    requested = _named(name)
    if requested not in _WRONG_DECONV:
        return requested
    return _DECONV_FALLBACK if _DECONV_FALLBACK in supported_engines() else None


def has_per_channel_deconv(name: str) -> bool:
    """Whether weights packed by ``name`` may be per-channel for a transposed conv."""
    return name in _PER_CHANNEL_DECONV


def is_deconv3d_wrong(name: str | None = None) -> bool:
    """Whether engine ``name``'s (default: the current one) 3-d transposed conv is wrong."""
    return _named(name) in _WRONG_DECONV3D


def dynamic_reduce_range(name: str) -> bool:
    """Whether engine ``name``'s dynamic linear kernels quantize their activations to 7 bits
    (reduce_range), as the integer representation of a dynamic linear must then too."""
    return name not in _FULL_RANGE_DYNAMIC
