"""A backend that runs conv + add (+ ReLU) as one oneDNN kernel, on the public API only.

``quantized::conv2d_add(_relu)`` computes ``relu?(conv(x) + other)`` in one pass: the conv's
int32 sums get ``other`` (int8, its own scale / zero point) added before the single
requantization. The example adds, with ``fxquant.extend``:

* two ``GroupFusion`` chains, ``Conv2d -> add -> ReLU`` and ``Conv2d -> add`` (the conv is
  the add's first operand, as in ``self.conv(x) + x``), so the fuse pass groups them;
* a ``Rule`` for those convs on a backend composed from "onednn": its lowering builds the
  quantized conv with the built-in ``lower_weighted``, then wraps its weights in
  :class:`QuantizedConvAdd2d`, which takes the group's output qparams and the add's other
  (quantized) operand. Convs outside such a group get the built-in lowering unchanged.

Two facts about the kernel the module handles (found by calling it directly; see
docs/extending.md):

* it writes its result into ``other``'s memory when ``other`` is already channels-last, which
  is what every quantized conv returns. In a residual block ``other`` is the conv's own input:
  the conv then reads rows it has already overwritten (many steps off on AVX2-class kernels),
  and any later reader of ``other`` sees the sum. The module hands it a fresh copy.
* it runs only while torch's quantized engine is "onednn" (elsewhere it raises "Didn't find
  engine for operation quantized::conv2d_add"), so the module selects it around the call.

lower_to_backend's numeric check runs the lowered kernel against the reference (dequantize ->
conv -> add -> relu -> quantize) on random integers in both layouts and keeps it only when it
agrees. The test counts the fused kernels and expects > 25 dB SQNR vs float (measured:
36.2 dB with VNNI kernels and 8-bit activations, 30.3 dB with ONEDNN_MAX_CPU_ISA=AVX2).

    python examples/ext_conv_add.py
"""
from __future__ import annotations

from functools import partial
from typing import Any, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.extend import (WEIGHTED, Chain, GroupFusion, LowerCtx, NoMatch, Op, Rule,
                            compose_backend, example_shape, is_dequantize, lower_weighted,
                            prepare_pipeline, quantized_engine, register_backend,
                            tensor_qparams, unregister_backend, with_fusions)

ADD = Op(torch.add, name="add")
FUSIONS = (
    GroupFusion(Chain(Op(nn.Conv2d, name="conv"), ADD, Op(F.relu, name="relu"),
                      name="conv2d_add_relu"), "quantized::conv2d_add_relu",
                "Conv2d + add + ReLU"),
    GroupFusion(Chain(Op(nn.Conv2d, name="conv"), ADD, name="conv2d_add"),
                "quantized::conv2d_add", "Conv2d + add"),
)


class QuantizedConvAdd2d(nn.Module):
    """``relu?(conv(x) + other)`` on onednn's fused kernel; ``conv`` is the quantized conv
    (it owns the weights); they are packed again here, for onednn. ``copy_other=False`` is
    the naive form that lets the kernel overwrite ``other`` (kept to show the check refusing
    it on AVX2-class kernels; see the test)."""

    def __init__(self, conv: nn.Module, relu: bool, scale: float, zero_point: int,
                 copy_other: bool = True) -> None:
        super().__init__()
        self.conv, self.relu, self.copy_other = conv, relu, copy_other
        self.scale, self.zero_point = float(scale), int(zero_point)
        self._pack()

    def _pack(self) -> None:
        c = self.conv
        with quantized_engine("onednn"):
            self.packed = torch.ops.quantized.conv2d_prepack(
                c.weight(), c.bias(), list(c.stride), list(c.padding), list(c.dilation),
                c.groups)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        kernel = (torch.ops.quantized.conv2d_add_relu if self.relu
                  else torch.ops.quantized.conv2d_add)
        # the kernel writes into `other` when it is channels-last: give it memory of its own
        accum = other.clone(memory_format=torch.channels_last) if self.copy_other else other
        with quantized_engine("onednn"):
            return kernel(x, accum, self.packed, self.scale, self.zero_point)

    def __getstate__(self) -> dict[str, Any]:  # pickling / deepcopy: pack again on arrival
        state = dict(self.__dict__)
        state.pop("packed", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pack()

    def extra_repr(self) -> str:
        return f"relu={self.relu}, scale={self.scale}, zero_point={self.zero_point}"


def _feeds_add(node: fx.Node, modules: Any) -> bool:
    """The conv's only user is an add whose first operand it is (what the fusions match)."""
    users = list(node.users)
    return len(users) == 1 and ADD.matches(users[0], modules) and users[0].args[0] is node


def conv_add_rule(copy_other: bool = True) -> Rule:
    """The rule for convs that feed an add: grouped ones run QuantizedConvAdd2d."""
    return Rule("conv2d_add", Op(nn.Conv2d, check=_feeds_add), WEIGHTED,
                "quantized::conv2d_add(_relu)", partial(lower_conv_add, copy_other=copy_other))


def lower_conv_add(ctx: LowerCtx, copy_other: bool = True) -> Union[fx.Node, NoMatch]:
    """A grouped conv -> add (-> relu) becomes QuantizedConvAdd2d(x, other); a conv the
    fuse pass did not group gets the built-in lowering."""
    if not ctx.group:
        ctx.kernel = "quantized::conv2d"
        return lower_weighted(ctx)
    add, relu = ctx.group[1], len(ctx.group) == 3
    other = add.args[1] if len(add.args) == 2 and not add.kwargs else None
    if not is_dequantize(other):
        return NoMatch("the add's other operand is not a quantized tensor (or alpha is given)")
    accum = tensor_qparams(other.args[0])
    if accum is None or accum[2] != torch.quint8 or ctx.out_dtype != torch.quint8:
        return NoMatch("the kernel takes a quint8 operand with static qparams and gives quint8")
    out_shape = example_shape(ctx.group[-1])
    if out_shape is None or example_shape(other) != out_shape:
        return NoMatch(f"the add's other operand is not shaped like the output {out_shape} "
                       f"(the kernel does not broadcast)")
    if ctx.module.padding_mode != "zeros":
        return NoMatch("padding_mode is not 'zeros'")
    conv = lower_weighted(ctx)  # swaps in the quantized conv; its call node is not used
    if isinstance(conv, NoMatch):
        return conv
    ctx.gm.graph.erase_node(conv)
    fused = QuantizedConvAdd2d(ctx.gm.get_submodule(ctx.node.target), relu, ctx.out_scale,
                               ctx.out_zero_point, copy_other)
    err = ctx.probe(lambda x: fused(x, fused.conv(x)))
    if err:
        ctx.set_module(ctx.module)  # the reference conv again (ctx.modules is the one before)
        return NoMatch(f"quantized::conv2d_add does not run here: {err}")
    ctx.set_module(fused)
    ctx.kernel = "quantized::conv2d_add_relu" if relu else "quantized::conv2d_add"
    return ctx.gm.graph.call_module(ctx.node.target, (ctx.qinputs[0], other.args[0]))


CONV_ADD_RULE = conv_add_rule()
BACKEND = "onednn+conv_add"


class Block(nn.Module):
    """A ResNet basic block without BatchNorm: relu(conv2(relu(conv1(x))) + x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + x)


class Net(nn.Module):
    """stem conv + ReLU, two residual blocks, and a last conv + add without ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block1, self.block2 = Block(16), Block(16)
        self.head = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(x) + x


def quantize(model: nn.Module, backend: str = BACKEND,
             fusions: tuple[GroupFusion, ...] = FUSIONS) -> fx.GraphModule:
    """Prepare with the fusions (on the default qconfig of onednn: 8-bit activations where
    onednn accumulates in int32, 7-bit elsewhere), calibrate, convert."""
    passes = with_fusions(prepare_pipeline(), group_fusions=fusions)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("onednn"),
                                  (torch.randn(1, 3, 16, 16),), backend=backend, passes=passes)
    torch.manual_seed(1)
    for _ in range(8):
        prepared(torch.randn(4, 3, 16, 16))
    return fxquant.convert_fx(prepared)


def fused_kernels(gm: fx.GraphModule) -> list[str]:
    """The conv-add kernels in a converted graph, one entry per call."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantizedConvAdd2d):
            relu = gm.get_submodule(n.target).relu
            out.append("quantized::conv2d_add_relu" if relu else "quantized::conv2d_add")
    return out


def main() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    register_backend(compose_backend("onednn", CONV_ADD_RULE, name=BACKEND))
    try:
        q = quantize(model)
    finally:
        unregister_backend(BACKEND)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), q(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    print(fxquant.report.text_report(q))
    print("fused:", fused_kernels(q))
    print(f"SQNR vs float: {float(sqnr):.1f} dB")


if __name__ == "__main__":
    main()
