"""Quantized regions: a quantize at the entry of each int8 region and a dequantize at its exit,
nothing in between (issue 3).

- conv → add → relu → cat → pool → linear is one region: exactly one quantize (the input) and
  one dequantize (the output), counted on the converted graph;
- a float island in the middle (an op with no quantized kernel, a user function on a leaf
  module, a submodule whose qconfig is None) costs exactly one dequantize before it and one
  quantize after it;
- tensors that are not float (integer indices, boolean masks) and Python values (shapes from
  ``x.shape`` / ``x.size()``) are never quantized.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.meta import qinfo
from tests.models import calibration_batches
from tests.util import op_counts

BACKENDS = ["x86", "qnnpack"]
SHAPE = (2, 3, 8, 8)
SQNR_FLOOR_DB = 20.0


def quantize_and_convert(model: nn.Module, backend: str = "x86", mapping=None, **kwargs
                         ) -> tuple[fx.GraphModule, fx.GraphModule]:
    torch.backends.quantized.engine = backend
    mapping = mapping or fxquant.get_default_qconfig_mapping(backend)
    prepared = fxquant.prepare_fx(model.eval(), mapping, (torch.randn(*SHAPE),),
                                  backend=backend, **kwargs)
    with torch.no_grad():
        for batch in calibration_batches(SHAPE, n=4):
            prepared(batch)
    return prepared, fxquant.convert_fx(prepared)


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - x).norm()))


def is_quantize(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.quantize_per_tensor


def is_dequantize(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "dequantize"


def assert_q_dq(gm: fx.GraphModule, quantize: int, dequantize: int) -> None:
    counts = op_counts(gm)
    assert (counts["quantize_per_tensor"], counts[".dequantize"]) == (quantize, dequantize), \
        f"expected {quantize} quantize / {dequantize} dequantize: {dict(counts)}\n{gm.code}"


def assert_only_float_tensors_quantized(prepared: fx.GraphModule, converted: fx.GraphModule
                                        ) -> None:
    """Observers watch, and quantize nodes read, float tensors only."""
    modules = dict(prepared.named_modules())
    for node in prepared.graph.nodes:
        if node.op == "call_module" and qinfo(node).role == "observer":
            value = qinfo(node.args[0]).value
            assert value is None or value.is_float_tensor, \
                f"observer {node.name} watches {node.args[0].name}: {value}"
            assert modules[node.target] is not None
    for node in converted.graph.nodes:
        if is_quantize(node):
            value = qinfo(node.args[0]).value
            assert value is None or value.is_float_tensor, \
                f"{node.name} quantizes {node.args[0].name}: {value}"


def run_same(model: nn.Module, converted: fx.GraphModule) -> None:
    x = calibration_batches(SHAPE, n=1, seed=9)[0]
    with torch.no_grad():
        ref, out = model(x), converted(x)
    refs, outs = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
    for r, o in zip(refs, outs):
        assert type(r) is type(o)
        if isinstance(r, torch.Tensor):
            assert o.shape == r.shape and o.dtype == r.dtype and not o.is_quantized
            if r.is_floating_point():
                assert sqnr(r, o) >= SQNR_FLOOR_DB, f"SQNR {sqnr(r, o):.1f} dB"
        else:
            assert o == r


# ------------------------------------------------------------------------ one region
class ConvAddReluCatPoolLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        b = self.conv2(a)
        y = F.relu(a + b)
        c = torch.cat([y, b], 1)
        return self.fc(torch.flatten(self.pool(c), 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_region_one_quantize_one_dequantize(backend):
    model = ConvAddReluCatPoolLinear()
    prepared, converted = quantize_and_convert(model, backend)
    assert_q_dq(converted, 1, 1)
    nodes = list(converted.graph.nodes)
    q = next(n for n in nodes if is_quantize(n))
    dq = next(n for n in nodes if is_dequantize(n))
    assert q.args[0].op == "placeholder"  # quantize at the input ...
    assert list(dq.users)[0].op == "output"  # ... dequantize at the output
    counts = op_counts(converted)
    assert counts["quantized::add_relu"] == 1 and counts["quantized.Conv2d"] == 2, dict(counts)
    assert counts["quantized.Linear"] == 1, dict(counts)
    run_same(model, converted)


# ------------------------------------------------------------------------ float islands
def _sort_island(t: torch.Tensor) -> torch.Tensor:
    return torch.sort(t, dim=1)[0]


def _einsum_island(t: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nchw->nchw", t) * 0.5


class UserFn(nn.Module):
    """A leaf module running arbitrary Python: stays a single float call."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.sum() > 0:  # data-dependent control flow: not traceable
            return t.flip(1)
        return t


class FloatHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(t))


class Island(nn.Module):
    """conv → island → conv → add → pool → linear."""

    def __init__(self, island: str) -> None:
        super().__init__()
        self.island = island
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = {"leaf": UserFn(), "none_qconfig": FloatHead()}.get(island, nn.Identity())
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        if self.island == "sort":
            m = _sort_island(a)
        elif self.island == "topk":
            m = torch.topk(a, 8, dim=1).values
        elif self.island == "einsum":
            m = _einsum_island(a)
        else:
            m = self.mid(a)
        b = self.conv2(m)
        y = b + self.conv3(b)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


ISLANDS = ["sort", "topk", "einsum", "leaf", "none_qconfig"]


def _island_prepare(island: str, backend: str):
    model = Island(island)
    mapping = fxquant.get_default_qconfig_mapping(backend)
    kwargs = {}
    if island == "leaf":
        kwargs["leaf_modules"] = [UserFn]
    if island == "none_qconfig":
        mapping.set_module_name("mid", None)
    return model, quantize_and_convert(model, backend, mapping, **kwargs)


def _island_nodes(gm: fx.GraphModule, island: str) -> list[fx.Node]:
    """The float ops of the island in the converted graph."""
    out = []
    for n in gm.graph.nodes:
        if not n.op.startswith("call_") or is_quantize(n) or is_dequantize(n):
            continue
        info = qinfo(n)
        if info.kernel is None and info.role == "op":
            out.append(n)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("island", ISLANDS)
def test_float_island_costs_one_dequantize_and_one_quantize(island, backend):
    model, (prepared, converted) = _island_prepare(island, backend)
    # input quantize, dequantize before the island, quantize after it, output dequantize
    assert_q_dq(converted, 2, 2)
    float_ops = _island_nodes(converted, island)
    assert float_ops, f"no float op in the converted graph:\n{converted.code}"
    for n in float_ops:
        reasons = [d.action for d in qinfo(n).decisions]
        assert "keep_float" in reasons or "keep_reference" in reasons, \
            f"{n.name} is float without a keep_float decision: {qinfo(n).decisions}"
    order = {n: i for i, n in enumerate(converted.graph.nodes)}
    dqs = sorted((n for n in converted.graph.nodes if is_dequantize(n)), key=order.get)
    qs = sorted((n for n in converted.graph.nodes if is_quantize(n)), key=order.get)
    first_float, last_float = min(float_ops, key=order.get), max(float_ops, key=order.get)
    assert order[dqs[0]] < order[first_float] and order[last_float] < order[qs[1]]
    assert_only_float_tensors_quantized(prepared, converted)
    run_same(model, converted)


# ------------------------------------------------------------------------ non-float values
class NonFloat(nn.Module):
    """Integer indices, a boolean mask and shapes flow next to the quantized activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor):
        a = F.relu(self.conv(x))
        n, c, h, w = a.shape
        flat = a.reshape(n, c * h * w)
        y = self.fc(flat)
        idx = torch.argmax(y, dim=1)  # int64
        mask = y > 0  # bool
        picked = torch.gather(y, 1, idx.unsqueeze(1))
        count = mask.sum(1)  # int64
        size = x.size(0) * a.size(1)  # Python int
        return y, picked, idx, count, size


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_float_values_are_never_quantized(backend):
    model = NonFloat()
    prepared, converted = quantize_and_convert(model, backend)
    assert_only_float_tensors_quantized(prepared, converted)
    for node in converted.graph.nodes:
        value = qinfo(node).value
        if node.op.startswith("call_") and value is not None and not value.is_float_tensor \
                and qinfo(node).role == "op":
            assert qinfo(node).qparams is None, f"{node.name} ({value}) got qparams"
    assert op_counts(converted)["quantize_per_tensor"] == 1
    x = calibration_batches(SHAPE, n=1, seed=9)[0]
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert out[4] == ref[4] == 2 * 8
    assert out[2].dtype == torch.int64 and out[3].dtype == torch.int64
    assert out[0].shape == ref[0].shape and not out[0].is_quantized
    assert sqnr(ref[0], out[0]) >= SQNR_FLOOR_DB

