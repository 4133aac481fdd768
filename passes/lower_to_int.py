"""lower_to_int: the reference graph respelled on plain uint8/int8 tensors (the integer
representation, ``convert_fx(..., representation="int")``). Runs after ``convert`` and
``cleanup`` instead of ``lower_to_backend``; the vocabulary (the ``fxquant::`` q/dq ops, the
int8-weight modules, the dtype mapping) lives in :mod:`fxquant.backends.integer`, so this pass
names no quantized dtype."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from fxquant.pipeline import PassContext, PassResult


@dataclass(frozen=True)
class LowerToInt:
    name: ClassVar[str] = "lower_to_int"
    requires: ClassVar[frozenset[str]] = frozenset({"reference", "clean"})
    provides: ClassVar[frozenset[str]] = frozenset({"lowered", "int_representation"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from fxquant.backends.integer import lower_graph

        stats = lower_graph(gm, ctx.options.backend_name or "")
        return PassResult(gm, bool(stats), stats)
