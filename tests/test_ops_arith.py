"""Issue 3's arithmetic and data-movement families, positive and negative: each op runs on its
quantized kernel (counted in the converted graph, numerics bounded against float and, where
torch.ao quantizes the same op, against torch.ao), or stays float with a reason."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.measure import sqnr_db
from fxquant.meta import qinfo
from tests.util import ao_default_qconfig_mapping, ao_quantize_fx, op_counts, output_scale

BACKENDS = ["x86", "qnnpack"]
SHAPE = (2, 4, 6, 6)


class Two(nn.Module):
    """Two convs feeding ``op``: the op's inputs are quantized conv outputs."""

    def __init__(self, op) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.op = op

    def forward(self, x):
        return self.op(self.a(x), self.b(x))


class One(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.op = op

    def forward(self, x):
        return self.op(self.a(x))


def _convert(model, backend, shape=SHAPE, n=4):
    torch.backends.quantized.engine = backend
    torch.manual_seed(0)
    model = model.eval()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend),
                                  (torch.randn(*shape),), backend=backend)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(*shape, generator=g) for _ in range(n)]
    for b in batches:
        prepared(b)
    return fxquant.convert_fx(prepared), batches


def _check(model, backend, kernel, count=1, floor=25.0):
    torch.manual_seed(0)
    quantized, _ = _convert(model, backend)
    counts = op_counts(quantized)
    assert counts[kernel] == count, dict(counts)
    assert counts["quantize_per_tensor"] == 1 and counts[".dequantize"] == 1, dict(counts)
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        assert sqnr_db(model(x), quantized(x)) >= floor
    return quantized


POSITIVE = {
    "add": (lambda: Two(lambda a, b: a + b), "quantized::add"),
    "iadd": (lambda: Two(_iadd), "quantized::add"),
    "torch.add": (lambda: Two(torch.add), "quantized::add"),
    "add_relu": (lambda: Two(lambda a, b: F.relu(a + b)), "quantized::add_relu"),
    "mul": (lambda: Two(lambda a, b: a * b), "quantized::mul"),
    "mul_relu": (lambda: Two(lambda a, b: torch.relu(torch.mul(a, b))), "quantized::mul_relu"),
    "add_scalar": (lambda: One(lambda a: a + 0.75), "quantized::add_scalar"),
    "mul_scalar": (lambda: One(lambda a: a * -0.5), "quantized::mul_scalar"),
    "cat": (lambda: Two(lambda a, b: torch.cat([a, b], 1)), "cat"),
    "concat": (lambda: Two(lambda a, b: torch.concat((a, b), dim=1)), "cat"),
    "matmul": (lambda: Two(lambda a, b: a @ b), "quantized::matmul"),
}


def _chunk_cat(t):
    u, v = t.chunk(2, dim=1)
    return torch.cat([v, u], 1)


def _iadd(a, b):
    a += b
    return a


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(POSITIVE))
def test_arithmetic_runs_on_its_kernel(name, backend):
    factory, kernel = POSITIVE[name]
    quantized = _check(factory(), backend, kernel)
    if name in ("cat", "concat"):
        # inputs and output share one scale/zero_point: the two convs' outputs already have it
        convs = [quantized.get_submodule(t) for t in ("a", "b")]
        assert convs[0].scale == convs[1].scale and convs[0].zero_point == convs[1].zero_point


@pytest.mark.parametrize("name", ["add", "add_relu", "mul", "cat"])
def test_arithmetic_matches_torch_ao_within_one_step(name):
    qfx = ao_quantize_fx()
    factory, _ = POSITIVE[name]
    torch.manual_seed(0)
    model = factory().eval()
    ours, batches = _convert(copy.deepcopy(model), "x86")
    torch.backends.quantized.engine = "x86"
    theirs = qfx.prepare_fx(copy.deepcopy(model), ao_default_qconfig_mapping("x86"),
                            (batches[0],))
    for b in batches:
        theirs(b)
    theirs = qfx.convert_fx(theirs)
    x = torch.randn(*SHAPE)
    diff = (ours(x) - theirs(x)).abs()
    assert diff.max() <= output_scale(ours) * 1.0001
    assert (diff == 0).float().mean() >= 0.99


MOVES = {
    "reshape": lambda t: t.reshape(t.size(0), -1),
    "view": lambda t: t.view(t.size(0), -1),
    "flatten": lambda t: torch.flatten(t, 1),
    "permute": lambda t: t.permute(0, 2, 3, 1),
    "transpose": lambda t: t.transpose(1, 2).contiguous(),
    "getitem": lambda t: t[:, 1:3],
    "mean": lambda t: t.mean((2, 3)),
    "mean_keepdim": lambda t: torch.mean(t, (2, 3), keepdim=True),
    "squeeze_unsqueeze": lambda t: t.unsqueeze(1).squeeze(1),
    "chunk": lambda t: _chunk_cat(t),
    "cat_of_chunk_tuple": lambda t: torch.cat(t.chunk(2, dim=1), 1),
    "split": lambda t: t.split(2, dim=1)[1],
    "maxpool": lambda t: F.max_pool2d(t, 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MOVES))
def test_data_movement_keeps_the_quantized_tensor(name, backend):
    torch.manual_seed(0)
    model = One(MOVES[name]).eval()
    quantized, _ = _convert(model, backend)
    counts = op_counts(quantized)
    assert counts["quantize_per_tensor"] == 1 and counts[".dequantize"] == 1, dict(counts)
    x = torch.randn(*SHAPE)
    assert sqnr_db(model(x), quantized(x)) >= 25
    moved = [n for n in quantized.graph.nodes if qinfo(n).kernel and "quantized tensor" in
             qinfo(n).kernel or (qinfo(n).kernel or "").startswith("item of")]
    assert moved, "the op did not run on the quantized tensor"


def test_functional_conv_and_linear_become_modules():
    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)
            self.b = nn.Parameter(torch.randn(8) * 0.1)
            self.lw = nn.Parameter(torch.randn(5, 8) * 0.2)

        def forward(self, x):
            y = F.relu(F.conv2d(x, self.w, self.b, padding=1))
            return F.linear(y.mean((2, 3)), self.lw)

    quantized = _check(Fn(), "x86", "quantized.ConvReLU2d")
    assert op_counts(quantized)["quantized.Linear"] == 1


def test_negative_cases_stay_float_with_reasons():
    class Neg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))

        def forward(self, x):
            y = self.a(x)
            z = y + y[:, :1]  # broadcasting add: quantized since issue 10 (test_speed_native)
            w = F.conv2d(z, self.w * 2)  # weight computed at run time
            v, _ = torch.sort(w, dim=1)  # no quantized sort
            return v + torch.arange(6.0)  # float tensor from a non-quantized source

    quantized, _ = _convert(Neg(), "x86")
    reasons = " | ".join(r for n in quantized.graph.nodes if qinfo(n)
                         for d in qinfo(n).decisions if d.action in ("keep_float",
                                                                     "keep_functional")
                         for r in [d.reason])
    assert "broadcast" not in reasons  # broadcasting add runs quantized::add now
    assert "computed at run time" in reasons
    assert "torch.sort" in reasons
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        assert quantized(x).shape == (2, 4, 6, 6)  # runs where the float model runs


def test_integer_tensors_are_never_quantized():
    class Idx(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            idx = y.argmax(dim=1)  # int64
            mask = y > 0  # bool
            return y * mask, idx + 1

    quantized, _ = _convert(Idx(), "x86")
    for n in quantized.graph.nodes:
        if n.op == "call_function" and n.target is torch.quantize_per_tensor:
            src = qinfo(n.args[0]).value
            assert src is None or src.is_float_tensor, n.args[0].name
    x = torch.randn(*SHAPE)
    out, idx = quantized(x)
    assert idx.dtype == torch.int64
