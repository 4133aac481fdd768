"""The activation / normalization / resampling op set (fxquant/backends/activations.py).

Every case is a family: a conv (or linear) whose output feeds each spelling of one op (a
fan-out, one converted model per family and engine), quantized with the default mapping of the
engine (x86 and qnnpack), calibrated on the same batches and converted.

Positive cases: the converted graph holds the op's kernel (counted), the quantized region is
unbroken (one quantize at the input, one dequantize per output: every op ran on the quantized
tensor), and each output is within a per-op SQNR floor of float. Where torch.ao's FX flow
quantizes the same op, the output must also be within one output quantum of torch.ao's on the
same calibration data and identical on >= 99% of the elements (observed: identical everywhere).
Where fxquant goes past torch.ao (GELU, SiLU, SELU, CELU, F.softmax, nn.GroupNorm, functional
batch norm, nn.Upsample, pad ...), the floor is the issue's 25 dB or above.

Negative cases: an op or a case without a kernel stays float with a keep_float (annotate: no
rule, or a rule's check declined) or keep_reference (lowering: the engine's kernel is missing)
decision that names the reason, and the converted model still matches float.

Observed SQNR (dB, x86 / qnnpack; x86's default activation observer has 7-bit range, hence
its ~5 dB less): hardswish 30.6 / 36.4, elu 31.2-31.4 / 36.5, leaky_relu 30.9-31.5 / 36.7,
sigmoid 44.5 / 48.8, hardsigmoid 46.6 / 50.3, tanh 32.4 / 37.3, softmax 37.3-37.4 / 39.9-40.4,
layer_norm 30.3-30.5 / 34.1-36.3, group_norm 29.4-30.4 / 33.8-36.4, instance_norm 29.2-31.9 /
27.2-38.3, selu 31.0 / 36.7, celu 30.5-31.3 / 36.4, prelu 31.1-32.1 / 36.3-36.4, gelu 28.5 /
33.7, silu 30.8 / 36.4, batch norm (functional, BatchNorm1d, running-stats instance norm)
28.7-34.2 / 33.3-39.5, interpolate / upsample 29.0-32.5 (area 25.9) / 32.7-37.9, pad 32.4-36.0 /
36.6-41.9, clamp_ 31.1 / 36.9.
"""
from __future__ import annotations

import copy
import io
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.meta import qinfo
from tests.models import calibration_batches
from tests.util import ao_default_qconfig_mapping, ao_quantize_fx, op_counts

ENGINES = ["x86", "qnnpack"]
FRONTS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
SHAPES = {3: (2, 3, 16), 4: (2, 3, 8, 8), 5: (2, 3, 4, 6, 6)}


class Net(nn.Module):
    """front (conv over the input's rank, or linear for rank 2) → each op on the front's output
    (a fan-out: one converted model checks every spelling of a family)."""

    def __init__(self, ops: list[nn.Module], rank: int = 4) -> None:
        super().__init__()
        self.front = nn.Linear(6, 8) if rank == 2 else FRONTS[rank](3, 8, 3, padding=1)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.front(x)
        return tuple(op(y) for op in self.ops)


class Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Affine(nn.Module):
    """A functional op with parameters / buffers (get_attr nodes in the graph)."""

    def __init__(self, kind: str, c: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.kind = kind
        self.w = nn.Parameter(torch.rand(c, generator=g) + 0.5)
        self.b = nn.Parameter(torch.randn(c, generator=g) * 0.1)
        self.register_buffer("mean", torch.randn(c, generator=g) * 0.1)
        self.register_buffer("var", torch.rand(c, generator=g) + 0.5)
        self.slope = nn.Parameter(torch.linspace(-0.3, 0.4, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "layer_norm":
            return F.layer_norm(x, (8,), self.w, self.b)
        if k == "group_norm":
            return F.group_norm(x, 4, self.w, self.b)
        if k == "instance_norm":
            return F.instance_norm(x, weight=self.w, bias=self.b)
        if k == "instance_norm_running":
            return F.instance_norm(x, self.mean, self.var, self.w, self.b, use_input_stats=False)
        if k == "batch_norm":
            return F.batch_norm(x, self.mean, self.var, self.w, self.b)
        if k == "batch_norm_no_affine":
            return F.batch_norm(x, self.mean, self.var)
        if k == "torch.batch_norm":
            return torch.batch_norm(x, self.w, self.b, self.mean, self.var, False, 0.1, 1e-5, False)
        if k == "prelu":
            return F.prelu(x, self.slope)
        if k == "x.prelu":
            return x.prelu(self.slope)
        raise ValueError(k)


def _layer_norm_computed_weight(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (8,), x.mean((0, 1, 2)) + 1.0)  # weight computed at run time


def _running_in(rank: int) -> nn.Module:
    m = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d}[rank](8, affine=True,
                                                            track_running_stats=True)
    g = torch.Generator().manual_seed(4)
    m.running_mean.copy_(torch.randn(8, generator=g) * 0.2)
    m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return m


def _bn1d_after_relu() -> nn.Module:
    """ReLU first, so that the BatchNorm1d is not folded into the linear/conv in front."""
    m = nn.BatchNorm1d(8)
    g = torch.Generator().manual_seed(5)
    m.running_mean.copy_(torch.randn(8, generator=g) * 0.2)
    m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    m.weight.data.copy_(torch.rand(8, generator=g) + 0.5)
    return nn.Sequential(nn.ReLU(), m)


# ---------------------------------------------------------------- the cases
# A family: (id, input rank, [op factories: one spelling each], {op_counts key: count}, SQNR
# floor in dB for every output).
# Ops torch.ao's FX flow quantizes too: compared with it.
WITH_TORCH_AO = [
    ("hardswish", 4, [nn.Hardswish, lambda: Fn(F.hardswish)], {"quantized::hardswish": 2}, 28),
    ("elu", 4, [lambda: nn.ELU(0.7), lambda: Fn(lambda x: F.elu(x, 0.5))],
     {"quantized::elu": 2}, 28),
    ("leaky_relu", 4, [lambda: nn.LeakyReLU(0.1), lambda: Fn(lambda x: F.leaky_relu(x, 0.2))],
     {"quantized::leaky_relu": 2}, 28),
    ("sigmoid", 4, [nn.Sigmoid, lambda: Fn(torch.sigmoid), lambda: Fn(lambda x: x.sigmoid())],
     {"quantized::sigmoid": 3}, 40),
    ("hardsigmoid", 4, [nn.Hardsigmoid, lambda: Fn(F.hardsigmoid)], {"hardsigmoid": 2}, 40),
    ("tanh", 4, [nn.Tanh, lambda: Fn(torch.tanh), lambda: Fn(lambda x: x.tanh())],
     {"tanh": 3}, 30),
    ("softmax", 4, [lambda: nn.Softmax(1)], {"quantized::softmax": 1}, 33),
    ("layer_norm", 4, [lambda: nn.LayerNorm([8, 8]), lambda: Affine("layer_norm")],
     {"quantized::layer_norm": 2}, 28),
    ("group_norm", 4, [lambda: Affine("group_norm")], {"quantized::group_norm": 1}, 28),
    ("instance_norm1d", 3, [lambda: nn.InstanceNorm1d(8, affine=True)],
     {"quantized::instance_norm": 1}, 28),
    ("instance_norm2d", 4, [lambda: nn.InstanceNorm2d(8), lambda: Affine("instance_norm")],
     {"quantized::instance_norm": 2}, 26),
    ("instance_norm3d", 5, [lambda: nn.InstanceNorm3d(8, affine=True)],
     {"quantized::instance_norm": 1}, 27),
    ("interpolate", 4, [lambda: Fn(lambda x: F.interpolate(x, scale_factor=2)),
                        lambda: Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"))],
     {"interpolate": 2}, 28),
]

# Ops (or spellings) torch.ao leaves float: fxquant quantizes them, floor >= 25 dB.
BEYOND_TORCH_AO = [
    ("selu_celu", 4, [nn.SELU, lambda: Fn(torch.selu), lambda: nn.CELU(0.5),
                      lambda: Fn(lambda x: F.celu(x, 2.0))],
     {"quantized::elu": 2, "quantized::celu": 2}, 28),
    ("prelu", 4, [lambda: nn.PReLU(8), nn.PReLU, lambda: Affine("prelu"),
                  lambda: Affine("x.prelu")], {"quantized::prelu": 4}, 28),
    ("gelu", 4, [nn.GELU, lambda: nn.GELU("tanh"), lambda: Fn(F.gelu)],
     {"gelu": 3}, 25),  # nn.GELU: F.gelu after normalize
    ("silu", 4, [nn.SiLU, lambda: Fn(F.silu)],
     {"quantized::sigmoid": 2, "quantized::mul": 2}, 28),
    ("softmax_spellings", 4, [lambda: Fn(lambda x: F.softmax(x, -1)),
                              lambda: Fn(lambda x: x.softmax(1)),
                              lambda: Fn(lambda x: torch.softmax(x, 2)), nn.Softmax2d],
     {"quantized::softmax": 4}, 33),
    ("sigmoid_expit", 4, [lambda: Fn(torch.special.expit)], {"quantized::sigmoid": 1}, 40),
    ("group_norm_module", 4, [lambda: nn.GroupNorm(2, 8)], {"quantized::group_norm": 1}, 28),
    ("norm_running_stats2d", 4, [lambda: _running_in(4), lambda: Affine("instance_norm_running"),
                                 lambda: Affine("batch_norm"), lambda: Affine("torch.batch_norm")],
     {"quantized::batch_norm2d": 4}, 27),
    ("norm_running_stats1d", 3, [lambda: _running_in(3), lambda: Affine("batch_norm"),
                                 _bn1d_after_relu], {"quantized::batch_norm1d": 3}, 28),
    ("batch_norm3d", 5, [lambda: Affine("batch_norm_no_affine")],
     {"quantized::batch_norm3d": 1}, 28),
    ("batch_norm1d_2d_input", 2, [_bn1d_after_relu], {"quantized::batch_norm1d": 1}, 28),
    ("upsample", 4, [lambda: nn.Upsample(scale_factor=2),
                     lambda: nn.Upsample(size=(11, 13), mode="bilinear"),
                     lambda: nn.UpsamplingNearest2d(scale_factor=2),
                     lambda: nn.UpsamplingBilinear2d(scale_factor=2),
                     lambda: Fn(lambda x: F.upsample(x, scale_factor=2)),
                     lambda: Fn(lambda x: F.interpolate(x, size=x.shape[2:],
                                                        mode="nearest-exact")),
                     lambda: Fn(lambda x: F.interpolate(x, size=(3, 5), mode="area"))],
     {"interpolate": 7}, 25),  # nn.Upsample* : F.interpolate after normalize
    ("upsample3d", 5, [lambda: Fn(lambda x: F.interpolate(x, scale_factor=2))],
     {"interpolate": 1}, 28),
    ("pad", 4, [lambda: nn.ZeroPad2d((1, 2, 0, 3)), lambda: nn.ConstantPad2d(2, 0.5),
                lambda: Fn(lambda x: F.pad(x, (1, 1, 2, 2))),
                lambda: Fn(lambda x: F.pad(x, (1, 1, 2, 2), mode="reflect")),
                lambda: Fn(lambda x: torch.constant_pad_nd(x, (1, 1)))],
     {"pad": 5}, 28),  # nn.ZeroPad2d / nn.ConstantPad2d / torch.constant_pad_nd: F.pad
    ("pad1d", 3, [lambda: nn.ReflectionPad1d(2), lambda: nn.ConstantPad1d((0, 3), -1.0)],
     {"pad": 2}, 28),  # nn.ReflectionPad1d / nn.ConstantPad1d: F.pad after normalize
    # x.clamp_ right after the model's conv fuses into it (issue 10: the bound is in the
    # conv's output qparams, or clipped inside the quantized module): no separate clamp
    ("clamp_inplace", 4, [lambda: Fn(lambda x: x.clamp_(-0.5, 1.0))], {"clamp": 0}, 28),
]

POSITIVE = [(e, *c) for c in WITH_TORCH_AO + BEYOND_TORCH_AO for e in ENGINES]
AO_IDS = {c[0] for c in WITH_TORCH_AO}


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - x).norm()))


def _float_model(factories: list[Callable[[], nn.Module]], rank: int) -> nn.Module:
    torch.manual_seed(0)
    return Net([f() for f in factories], rank).eval()


def _shape(rank: int) -> tuple[int, ...]:
    return (32, 6) if rank == 2 else SHAPES[rank]


def ours(model: nn.Module, shape: tuple[int, ...], engine: str) -> fx.GraphModule:
    torch.backends.quantized.engine = engine
    mapping = fxquant.get_default_qconfig_mapping(engine)
    prepared = fxquant.prepare_fx(copy.deepcopy(model), mapping, (torch.randn(*shape),),
                                  backend=engine)
    with torch.no_grad():
        for batch in calibration_batches(shape, n=2):
            prepared(batch)
    return fxquant.convert_fx(prepared)


def theirs(model: nn.Module, shape: tuple[int, ...], engine: str) -> fx.GraphModule:
    qfx = ao_quantize_fx()
    torch.backends.quantized.engine = engine
    prepared = qfx.prepare_fx(copy.deepcopy(model), ao_default_qconfig_mapping(engine),
                              (torch.randn(*shape),))
    with torch.no_grad():
        for batch in calibration_batches(shape, n=2):
            prepared(batch)
    return qfx.convert_fx(prepared)


def _test_input(shape: tuple[int, ...]) -> torch.Tensor:
    return calibration_batches(shape, n=1, seed=7)[0]


def _run(gm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = gm(x.clone())
    return out if isinstance(out, tuple) else (out,)


def output_steps(gm: fx.GraphModule) -> list[float]:
    """The output quantum of each output of a converted fan-out model."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    items = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    steps = []
    for dq in items:
        assert dq.op == "call_method" and dq.target == "dequantize", dq.format_node()
        steps.append(float(qinfo(dq.args[0]).qparams["scale"]))
    return steps


def decisions(gm: fx.GraphModule, action: str) -> list[str]:
    return [f"{n.name}: {d.reason}" for n in gm.graph.nodes for d in qinfo(n).decisions
            if d.action == action]


# ---------------------------------------------------------------- positive
@pytest.mark.parametrize("engine,family,rank,factories,kernels,floor", POSITIVE,
                         ids=[f"{c[1]}-{c[0]}" for c in POSITIVE])
def test_quantized_kernel_and_numerics(engine, family, rank, factories, kernels, floor):
    model, shape = _float_model(factories, rank), _shape(rank)
    quantized = ours(model, shape, engine)
    counts = op_counts(quantized)
    for kernel, n in kernels.items():
        assert counts[kernel] == n, f"{kernel}: expected {n}: {dict(counts)}"
    # one quantize at the input and one dequantize per output: every op ran quantized
    assert counts["quantize_per_tensor"] == 1 and counts[".dequantize"] == len(factories), (
        f"an op left the quantized region: {dict(counts)}; "
        f"{decisions(quantized, 'keep_reference') + decisions(quantized, 'keep_float')}")
    x = _test_input(shape)
    refs, gots = _run(model, x), _run(quantized, x)
    for i, (ref, got) in enumerate(zip(refs, gots)):
        assert sqnr(ref, got) >= floor, f"output {i}: SQNR {sqnr(ref, got):.1f} dB < {floor}"
    if family not in AO_IDS:
        return
    others = _run(theirs(model, shape, engine), x)
    for i, (got, other, step) in enumerate(zip(gots, others, output_steps(quantized))):
        diff = (got - other).abs()
        assert diff.max().item() <= step * 1.0001, f"output {i}: {diff.max()} > one step {step}"
        assert (diff == 0).float().mean().item() >= 0.99


def test_fixed_qparams_are_the_ops_range():
    model = _float_model([lambda: Fn(lambda x: torch.tanh(torch.sigmoid(x) * 4 - 2))], 4)
    quantized = ours(model, SHAPES[4], "x86")
    fixed = {qinfo(n).kernel: (qinfo(n).qparams["scale"], qinfo(n).qparams["zero_point"])
             for n in quantized.graph.nodes if qinfo(n).kernel in ("quantized::sigmoid",
                                                                   "aten::tanh (QuantizedCPU)")}
    assert fixed == {"quantized::sigmoid": (1 / 256, 0),
                     "aten::tanh (QuantizedCPU)": (2 / 256, 128)}


class _InPlaceChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.hs = nn.Hardswish(inplace=True)
        self.elu = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu_(self.elu(self.hs(self.conv(x))), 0.1)
        return F.silu(y, inplace=True).sigmoid_()


@pytest.mark.parametrize("engine", ENGINES)
def test_inplace_spellings_with_one_reader_run_quantized(engine):
    torch.manual_seed(0)
    model = _InPlaceChain().eval()
    quantized = ours(model, SHAPES[4], engine)
    counts = op_counts(quantized)
    for kernel in ("quantized::hardswish", "quantized::elu", "quantized::leaky_relu",
                   "quantized::mul"):
        assert counts[kernel] == 1, dict(counts)
    assert counts["quantized::sigmoid"] == 2  # silu's and the last op's
    assert counts["quantize_per_tensor"] == 1 and counts[".dequantize"] == 1, dict(counts)
    x = _test_input(SHAPES[4])
    assert sqnr(model(x.clone()), quantized(x)) >= 22  # five int8 ops in a row


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu = nn.PReLU(8)
        self.ln = nn.LayerNorm([8, 8])
        self.aff = Affine("batch_norm_no_affine")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.prelu(self.conv(x)))
        y = F.pad(F.interpolate(self.aff(self.ln(y)), scale_factor=2.0), (1, 1, 1, 1))
        return torch.softmax(F.gelu(y), 1)


@pytest.mark.parametrize("engine", ENGINES)
def test_script_save_and_decisions(engine):
    torch.manual_seed(0)
    quantized = ours(_Mixed().eval(), SHAPES[4], engine)
    x = _test_input(SHAPES[4])
    expected = quantized(x)
    assert torch.equal(torch.jit.script(quantized)(x), expected)
    buf = io.BytesIO()
    torch.save(quantized, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), expected)
    undecided = [n.name for n in quantized.graph.nodes
                 if n.op.startswith("call_") and not qinfo(n).decisions]
    assert not undecided
    kernels = {qinfo(n).kernel for n in quantized.graph.nodes if qinfo(n).kernel}
    assert {"quantized::prelu", "quantized::sigmoid + quantized::mul", "quantized::layer_norm",
            "quantized::batch_norm2d", "quantized::softmax"} <= kernels
    assert op_counts(quantized)[".dequantize"] == 1


# ---------------------------------------------------------------- torch.ao defects pinned
@pytest.mark.parametrize("engine", ENGINES)
def test_torch_ao_defects_fxquant_avoids(engine):
    """nn.PReLU: quantized::prelu represents the slope 1 of positive inputs in the weight's
    qparams; torch.ao's PReLU weight observer never sees 1.0, so positive inputs are scaled
    down. InstanceNorm with running statistics: torch.ao lowers it to quantized::instance_norm,
    which normalizes with the batch's statistics."""
    model, shape = _float_model([lambda: nn.PReLU(8), lambda: _running_in(4)], 4), SHAPES[4]
    x = _test_input(shape)
    refs, goods, bads = _run(model, x), _run(ours(model, shape, engine), x), \
        _run(theirs(model, shape, engine), x)
    for ref, good, bad in zip(refs, goods, bads):
        assert sqnr(ref, good) >= 28
        assert sqnr(ref, bad) < 15, "torch.ao fixed this defect: drop the case"


def test_torch_ao_softmax_negative_dim_raises_on_qnnpack():
    """qnnpack's quantized softmax indexes out of range for dim=-1 on channels-last input (a
    conv's output); torch.ao passes dim through, fxquant passes the non-negative dim."""
    model, shape = _float_model([lambda: nn.Softmax(-1)], 4), SHAPES[4]
    x = _test_input(shape)
    with pytest.raises(IndexError):
        theirs(model, shape, "qnnpack")(x)
    (ref,), (got,) = _run(model, x), _run(ours(model, shape, "qnnpack"), x)
    assert sqnr(ref, got) >= 33


# ---------------------------------------------------------------- negative
# (id, input rank, [(op factory, decision action, words its reason must contain)])
NEGATIVE = [
    ("no_rule_or_declined", 4, [
        (nn.Mish, "keep_float", ["no quantized kernel", "Mish"]),
        (nn.Softplus, "keep_float", ["no quantized kernel", "Softplus"]),
        (lambda: Fn(lambda x: F.log_softmax(x, 1)), "keep_float",
         ["no quantized kernel", "log_softmax"]),
        (lambda: Fn(lambda x: F.batch_norm(x, None, None, training=True)), "keep_float",
         ["batch statistics"]),
        (lambda: Fn(_layer_norm_computed_weight), "keep_float",
         ["weight is computed at run time"]),
        (lambda: Fn(lambda x: F.softmax(x, 1, dtype=torch.float32)), "keep_float", ["dtype="]),
    ]),
    ("kernel_missing_on_engine", 4, [
        (lambda: Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic")),
         "keep_reference", ["bicubic", "upsample_bicubic2d"]),
        (lambda: nn.ReplicationPad2d(1), "keep_reference",
         ["ReplicationPad2d", "replication_pad2d"]),
        (lambda: Fn(lambda x: F.pad(x, (1, 1, 1, 1), mode="circular")), "keep_reference",
         ["circular"]),
    ]),
    ("kernel_missing_3d", 5, [
        (lambda: Fn(lambda x: F.interpolate(x, scale_factor=2, mode="trilinear")),
         "keep_reference", ["trilinear", "upsample_trilinear3d"]),
        (lambda: nn.ReflectionPad3d(1), "keep_reference", ["reflection_pad3d"]),
    ]),
    ("kernel_missing_1d", 3, [
        (lambda: nn.Upsample(scale_factor=2), "keep_reference", ["upsample_nearest1d"]),
        (lambda: nn.Upsample(scale_factor=2, mode="linear"), "keep_reference",
         ["upsample_linear1d"]),
    ]),
    ("tensor_bound", 4, [
        (lambda: Fn(lambda x: x.clamp_(x.mean())), "keep_float", ["min is a tensor"]),
    ]),
]
NEGATIVE_CASES = [(e, *c) for c in NEGATIVE for e in ENGINES]


@pytest.mark.parametrize("engine,family,rank,cases", NEGATIVE_CASES,
                         ids=[f"{c[1]}-{c[0]}" for c in NEGATIVE_CASES])
def test_without_kernel_stays_float_with_reason(engine, family, rank, cases):
    model, shape = _float_model([c[0] for c in cases], rank), _shape(rank)
    quantized = ours(model, shape, engine)
    for _, action, words in cases:
        found = [r for r in decisions(quantized, action) if all(w in r for w in words)]
        assert found, (f"no {action} decision naming {words}: "
                       f"{decisions(quantized, 'keep_float')}"
                       f"{decisions(quantized, 'keep_reference')}")
    x = _test_input(shape)
    for i, (ref, got) in enumerate(zip(_run(model, x), _run(quantized, x))):
        assert sqnr(ref, got) >= 25, f"output {i}"  # the front is int8; the op runs float


def test_qnnpack_clamp_without_max_stays_float():
    """qnnpack's quantized clamp needs both bounds ("Both min and max should be specified"):
    the probe sees it and the op stays a float reference op; x86 runs it quantized."""
    model, shape = _float_model([lambda: Fn(lambda x: x.clamp_(min=0.1))], 4), SHAPES[4]
    q_qnnpack, q_x86 = ours(model, shape, "qnnpack"), ours(model, shape, "x86")
    assert any("Both min and max" in r for r in decisions(q_qnnpack, "keep_reference"))
    assert op_counts(q_x86)["clamp"] == 1 and op_counts(q_x86)[".dequantize"] == 1
    x = _test_input(shape)
    for quantized in (q_qnnpack, q_x86):
        assert sqnr(_run(model, x)[0], _run(quantized, x)[0]) >= 28


def test_kernel_output_dtype_or_qparams_mismatch_stays_reference():
    """qint8 activations: quantized::sigmoid keeps its input's dtype (qint8) while the fixed
    [0, 1] output is quint8, and hardswish then gets a quint8 input for a qint8 output. The
    checked probe compares the kernel's output with the reference graph's quantize and keeps
    such ops as float reference ops instead of lowering them wrongly."""
    from fxquant.observers import MinMaxObserver, default_weight_observer

    qconfig = fxquant.QConfig(activation=MinMaxObserver.with_args(dtype=torch.qint8),
                              weight=default_weight_observer)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sigmoid(), nn.Hardswish()).eval()
    mapping = fxquant.QConfigMapping().set_global(qconfig).set_module_name("0", None)
    prepared = fxquant.prepare_fx(model, mapping, (torch.randn(*SHAPES[4]),), backend="x86")
    for batch in calibration_batches(SHAPES[4], n=2):
        prepared(batch)
    quantized = fxquant.convert_fx(prepared)
    kept = decisions(quantized, "keep_reference")
    assert any("quantized::sigmoid" in r and "torch.qint8" in r and "torch.quint8" in r
               for r in kept), kept
    assert any("quantized::hardswish" in r for r in kept), kept
    x = _test_input(SHAPES[4])
    assert sqnr(model(x), quantized(x)) >= 30


class _Unbatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 64)
        self.inorm = nn.InstanceNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inorm(self.fc(x).reshape(8, 8))  # (C, L): no batch dimension


def test_unbatched_instance_norm_stays_float():
    torch.manual_seed(0)
    model = _Unbatched().eval()
    quantized = ours(model, (6,), "x86")
    assert any("unbatched" in r for r in decisions(quantized, "keep_float")), \
        decisions(quantized, "keep_float")
    x = torch.randn(6)
    assert sqnr(model(x), quantized(x)) >= 20  # normalizing 8 values amplifies the int8 error


class _MutatedThenRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = y.sigmoid_()  # mutates y, which conv2 reads afterwards
        return self.conv2(y) + z


def test_inplace_with_a_later_reader_reads_the_result_and_is_lowered():
    # normalize points conv2 at the result of y.sigmoid_() (the tensor it mutated), so nothing
    # reads y afterwards and the sigmoid can run on its quantized kernel
    torch.manual_seed(0)
    quantized = ours(_MutatedThenRead().eval(), SHAPES[4], "x86")
    assert op_counts(quantized)["quantized::sigmoid"] == 1


def test_inplace_with_a_later_reader_keeps_float_semantics():
    torch.manual_seed(0)
    model = _MutatedThenRead().eval()
    quantized = ours(model, SHAPES[4], "x86")
    x = _test_input(SHAPES[4])
    assert sqnr(model(x), quantized(x)) >= 25
