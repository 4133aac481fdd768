"""Extending fxquant: a pass of your own in the pipeline, and a backend rule for your own op.

1. ``CountMACs`` is a pass: a frozen dataclass with a name, the facts it needs and gives, and a
   ``__call__`` returning a PassResult with stats. It runs after ``fuse`` in prepare_fx.
2. ``ChannelShuffle`` is the user's module, kept as one call (a leaf). Without a rule fxquant
   keeps it float (with a dequantize/quantize around it); a rule saying that it only moves
   values (shared qparams) lets it run on the int8 tensor directly, on an extended backend.

Built on the public extension API (``fxquant.extend``, docs/extending.md) only.

    python examples/custom_pass_and_rule.py
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn as nn

import fxquant
from fxquant.extend import (SHARED, Op, PassContext, PassResult, Rule, compose_backend,
                            insert_after, lower_same_op, prepare_pipeline, qinfo, register_backend)


@dataclass(frozen=True)
class CountMACs:
    """Counts the multiply-accumulates of the conv and linear layers (from recorded shapes)."""

    name: ClassVar[str] = "count_macs"
    requires: ClassVar[frozenset[str]] = frozenset({"fused"})
    provides: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        macs = 0
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod, out = gm.get_submodule(str(node.target)), qinfo(node).value
            core = mod[0] if isinstance(mod, nn.Sequential) else mod
            if isinstance(core, (nn.Conv2d, nn.Linear)) and out is not None and out.shape:
                per_output = core.weight[0].numel()
                macs += per_output * int(torch.tensor(out.shape).prod())
        return PassResult(gm, False, {"macs": macs})


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.shuffle = ChannelShuffle(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.shuffle(torch.relu(self.conv1(x))))


def quantize(model: nn.Module, backend: str) -> fx.GraphModule:
    example = (torch.randn(1, 3, 16, 16),)
    pipeline = insert_after(prepare_pipeline(), "fuse", CountMACs())  # after normalize and fuse
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), example,
                                  backend=backend, leaf_modules=[ChannelShuffle], passes=pipeline)
    print(f"[{backend}] count_macs: {prepared.meta['fxquant_stats']['count_macs']}")
    for _ in range(4):
        prepared(torch.randn(4, 3, 16, 16))
    return fxquant.convert_fx(prepared)


def shuffle_rule_backend() -> str:
    rule = Rule("channel_shuffle", Op(ChannelShuffle), SHARED,
                "ChannelShuffle on the quantized tensor", lower_same_op,
                notes="moves values only: output shares the input's qparams")
    register_backend(compose_backend("x86", rule, name="x86+shuffle"))
    return "x86+shuffle"


def main() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    plain = quantize(model, "x86")
    extended = quantize(model, shuffle_rule_backend())
    for name, gm in (("x86", plain), ("x86+shuffle", extended)):
        shuffle = next(n for n in gm.graph.nodes if n.target == "shuffle")
        print(f"{name:12s} shuffle: {qinfo(shuffle).decisions[-1]}")
        print(f"{'':12s} graph: {[n.target if isinstance(n.target, str) else n.target.__name__ for n in gm.graph.nodes if n.op != 'placeholder']}")


if __name__ == "__main__":
    main()
