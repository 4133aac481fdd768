"""What ``fxquant.compile(..., backend="inductor")`` hands Inductor, and how it calls the result.

* ``inductor_model(..., fuse_post_ops=True)`` drops the conv output's quantize -> dequantize pair
  before an activation that onednn fuses into the int8 conv: checked on the graph
  (which pairs go, which stay) and numerically, eagerly, within one output step of the native
  model on >= 99% of elements (no C++ compile: fast);
* ``float_convs=True`` / ``float_linears=True`` (what "auto" picks where onednn's int8 kernels
  are slower than fp32) give every int8-weight conv / linear a precomputed float weight:
  checked on the model (which modules change, the graph does not), eagerly equal to the
  int8-weight model, and the "auto" decision follows the CPU policy;
* compiled (``FXQUANT_INDUCTOR_TESTS=1``: C++ compiles take minutes on a busy 2-core machine):
  the generated code runs the activations as onednn post-ops, agrees with native, and the
  guard-skipping fast path of :class:`InductorModule` gives the guarded call's result, while a
  new input shape takes the guarded path (a recompile) and is still right; with float convs and
  linears, no int8 conv / linear is left in the generated code and it still agrees with native.
"""
from __future__ import annotations

import operator
import re

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.backends.integer import IntWeighted
from tests.models import build, calibration_batches
from tests.util import inductor_or_skip, output_scale


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class MBBlock(nn.Module):
    """MobileNetV3 / EfficientNet pieces: conv-bn-hardswish, depthwise conv-bn-SiLU, a
    squeeze-excite gate (pool, 1x1 conv, ReLU, 1x1 conv, sigmoid, broadcasting mul), a project
    conv-bn and a residual add, then a ReLU6 conv and a linear head."""

    def __init__(self, c: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), _bn(c),
                                  nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), _bn(hidden),
                                    nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden,
                                          bias=False), _bn(hidden), nn.SiLU())
        self.se1, self.se2 = nn.Conv2d(hidden, 4, 1), nn.Conv2d(4, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), _bn(c))
        self.tail = nn.Sequential(nn.Conv2d(c, 12, 3, padding=1), nn.ReLU6())
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.dw(self.expand(x))
        gate = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1)))))
        x = x + self.project(h * gate)
        x = self.tail(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


SHAPE = (2, 3, 12, 12)


def _converted() -> tuple[nn.Module, nn.Module]:
    torch.backends.quantized.engine = "x86"
    model = build(MBBlock)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"),
                                  (torch.randn(*SHAPE),), backend="x86")
    for batch in calibration_batches(SHAPE):
        prepared(batch)
    return fxquant.convert_fx(prepared, representation="int"), fxquant.convert_fx(prepared)


def _reference_outputs(model, first_seed: int, scale: float):
    """Three seeded random inputs and ``model``'s outputs on them (real outputs, not zeros)."""
    for seed in range(3):
        x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(first_seed + seed))
        ref = model(x)
        assert ref.abs().max() > 10 * scale
        yield x, ref


def _assert_within_one_step(ours: torch.Tensor, native: torch.Tensor, scale: float) -> None:
    steps = (ours - native).abs() / scale
    within = (steps <= 1.0 + 1e-3).float().mean().item()
    assert within >= 0.99, f"only {within:.2%} within one step (max {steps.max():.2f} steps)"


def _is_conv(gm: fx.GraphModule, n: object) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_module" and \
        isinstance(gm.get_submodule(str(n.target)), IntWeighted)


def _quantizes(gm: fx.GraphModule) -> int:
    qd = torch.ops.quantized_decomposed
    return sum(n.op == "call_function" and n.target == qd.quantize_per_tensor.default
               for n in gm.graph.nodes)


def test_post_op_pairs_are_dropped_and_stay_within_one_step() -> None:
    from fxquant.backends.inductor import inductor_model

    ours, native = _converted()
    fused, kept = inductor_model(ours, fuse_post_ops=True), inductor_model(ours, False)
    # stem->hardswish, expand->hardswish, dw->SiLU: three pairs; the SE gate's conv (sigmoid has
    # no onednn post-op), the project conv before the residual add (left to a fused loop) and the
    # ReLU / ReLU6 convs (the clamp is folded into their output qparams: no float op follows)
    # keep theirs
    assert _quantizes(kept) - _quantizes(fused) == 3
    act_inputs = {n.target: n.args[0] for n in fused.graph.nodes
                  if n.op == "call_function" and n.target in (F.hardswish, F.silu)}
    assert len(act_inputs) == 2 and all(_is_conv(fused, a) for a in act_inputs.values())
    for target in (torch.sigmoid, torch.add, operator.add):
        for n in fused.graph.nodes:
            if n.op == "call_function" and n.target == target:
                assert not any(_is_conv(fused, a) for a in n.args), n.format_node()
    scale = output_scale(native)
    with torch.no_grad():
        for x, ref in _reference_outputs(native, 10, scale):
            _assert_within_one_step(kept(x), ref, scale)
            _assert_within_one_step(fused(x), ref, scale)


def test_no_fusion_keeps_every_pair() -> None:
    from fxquant.backends.inductor import inductor_model

    ours, _ = _converted()
    qs = sum(n.op == "call_function" and n.target == torch.ops.fxquant.quantize_per_tensor.default
             for n in ours.graph.nodes)
    assert _quantizes(inductor_model(ours, fuse_post_ops=False)) == qs


def test_signature_fast_path_only_for_plain_tensor_calls() -> None:
    from fxquant.backends.inductor import _signature

    x = torch.randn(1, 3, 4, 4)
    assert _signature((x,), {}) == _signature((torch.randn(1, 3, 4, 4),), {})
    assert _signature((x,), {}) != _signature((torch.randn(1, 3, 4, 5),), {})
    assert _signature((x,), {}) != _signature((x.transpose(2, 3),), {})  # strides count
    with torch.inference_mode():
        y = torch.randn(1, 3, 4, 4)
    assert _signature((x,), {}) != _signature((y,), {})  # so do inference-mode tensors
    assert _signature((x,), {"y": x}) is None
    assert _signature((x, 3), {}) is None
    assert _signature((x, x[0]), {}) is None  # aliased inputs
    assert _signature((), {}) is None


def _graph_ops(gm: fx.GraphModule) -> list[tuple[str, object]]:
    return [(n.op, n.target) for n in gm.graph.nodes]


def test_float_convs_replace_every_int8_conv_weight_and_nothing_else() -> None:
    from fxquant.backends.inductor import FloatWeighted, inductor_model

    ours, native = _converted()
    kept = inductor_model(ours, fuse_post_ops=True, float_convs=False)
    fl = inductor_model(ours, fuse_post_ops=True, float_convs=True)
    both = inductor_model(ours, fuse_post_ops=True, float_convs=True, float_linears=True)
    int_convs = {name for name, m in kept.named_modules()
                 if isinstance(m, IntWeighted) and m.kind == "conv"}
    # stem, expand, dw, se1 (inside ConvReLU2d), se2, project, tail (inside a ConvClamp2d)
    assert len(int_convs) == 7
    assert fl.fxquant_float_convs.enabled and set(fl.fxquant_float_convs.modules) == int_convs
    assert not kept.fxquant_float_convs.enabled and kept.fxquant_float_convs.modules == ()
    assert not fl.fxquant_float_linears.enabled and fl.fxquant_float_linears.modules == ()
    assert both.fxquant_float_linears.modules == ("head",)
    for name in int_convs | {"head"}:
        m, old = both.get_submodule(name), kept.get_submodule(name)
        assert isinstance(m, FloatWeighted) and m.weight.dtype == torch.float32
        assert old.weight.weight_int.dtype == torch.int8
        torch.testing.assert_close(m.weight, old.weight.dequantized(), rtol=0, atol=0)
        assert m.weight.abs().max() > 0
    # the 1x1 convs (expand, se1, se2, project) are spelled as linears over the channels: the
    # same values up to float rounding (sum order), on a random input of each module's shape
    assert {n for n in int_convs if both.get_submodule(n).pointwise} == \
        {"expand.0", "se1.0", "se2", "project.0"}
    for name in int_convs:
        m, old = both.get_submodule(name), kept.get_submodule(name)
        x = torch.randn(2, old.weight.weight_int.shape[1] * old.groups, 6, 6,
                        generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(m(x), old(x), rtol=1e-5, atol=1e-5)
    # float_convs alone: the linear head keeps its int8 weight
    assert isinstance(fl.head, IntWeighted) and fl.head.kind == "linear"
    assert not any(isinstance(m, IntWeighted) and m.kind == "conv" for m in fl.modules())
    assert not any(isinstance(m, IntWeighted) for m in both.modules())
    # the graph itself (q/dq, activations) is unchanged; the model given was copied, not changed
    assert _graph_ops(fl) == _graph_ops(both) == _graph_ops(kept)
    assert not any(isinstance(m, FloatWeighted) for m in ours.modules())
    scale = output_scale(native)
    with torch.no_grad():
        for x, ref in _reference_outputs(kept, 20, scale):
            # the same float weights the int8 dequantize computes, the same ops up to the sum
            # order of the 1x1 convs: every output within one step of the int8-weight graph's
            for model in (fl, both):
                assert ((model(x) - ref).abs() / scale).max() <= 1.0 + 1e-3
            _assert_within_one_step(both(x), native(x), scale)


def test_float_convs_auto_follows_the_cpu_policy(monkeypatch) -> None:
    import fxquant.backends.cpu as cpu
    from fxquant.backends.inductor import float_conv_plan, inductor_model
    from fxquant.errors import FxQuantError

    for kind in ("conv", "linear"):
        assert float_conv_plan(True, kind).enabled and not float_conv_plan(False, kind).enabled
        assert float_conv_plan("auto", kind).enabled == \
            (not cpu.full_range_activations_safe("onednn"))
    ours, _ = _converted()
    for int32_accumulation in (True, False):  # VNNI / AMX, then AVX2-only (or an ISA cap)
        monkeypatch.setattr(cpu, "full_range_activations_safe",
                            lambda engine, v=int32_accumulation: v if engine == "onednn" else 1 / 0)
        plan = float_conv_plan("auto")
        assert plan.enabled is (not int32_accumulation) and plan.reason.startswith("auto:")
        model = inductor_model(ours, float_convs="auto", float_linears="auto")
        assert len(model.fxquant_float_convs.modules) == (0 if int32_accumulation else 7)
        assert len(model.fxquant_float_linears.modules) == (0 if int32_accumulation else 1)
    with pytest.raises(FxQuantError, match="float_convs"):
        float_conv_plan("yes")


# ------------------------------------------------------------------------------ compiled
def test_compiled_runs_post_ops_in_onednn_and_agrees_with_native() -> None:
    inductor_or_skip()
    from torch._inductor.utils import run_and_get_code

    ours, native = _converted()
    example = (torch.randn(*SHAPE),)
    compiled, code = run_and_get_code(fxquant.compile, ours, example, backend="inductor")
    code = "\n".join(code)  # Python or C++ wrapper: quote and separator spellings differ
    for post_op in ("hardswish", "swish"):  # onednn post-ops of the int8 convs
        assert re.search(rf"""["']{post_op}["']""", code), post_op
    if not compiled.float_convs.enabled:  # "auto" on a VNNI / AMX CPU keeps the int8 convs
        assert "qconv" in code and not compiled.float_convs.modules
    scale = output_scale(native)
    with torch.no_grad():
        x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3))
        guarded = compiled(x)
        assert compiled._checked  # the first call vouched for this signature
        fast = compiled(x)  # guard evaluation skipped
        torch.testing.assert_close(fast, guarded, rtol=0, atol=0)
        _assert_within_one_step(fast, native(x), scale)
        # a new shape is not on the fast path: Dynamo's guards fail and it recompiles
        y = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(4))
        _assert_within_one_step(compiled(y), native(y), scale)
        _assert_within_one_step(compiled(y), native(y), scale)
        assert len(compiled._checked) == 2


def test_compiled_float_convs_run_fp32_kernels_and_agree_with_native() -> None:
    inductor_or_skip()
    from torch._inductor.utils import run_and_get_code

    ours, native = _converted()
    example = (torch.randn(*SHAPE),)
    compiled, code = run_and_get_code(fxquant.compile, ours, example, backend="inductor",
                                      float_convs=True, float_linears=True)
    code = "\n".join(code)
    assert len(compiled.float_convs.modules) == 7 and compiled.float_linears.modules == ("head",)
    assert "qconv" not in code and "qlinear" not in code  # no onednn int8 kernel left ...
    # stem, dw, tail as fp32 mkldnn convs; the 1x1 convs and the head as fp32 linears
    assert len(re.findall(r"mkldnn[._]+convolution_pointwise(?:\.default)?\(", code)) == 3
    assert len(re.findall(r"_mkl_linear(?:\.default)?\(", code)) >= 4  # one may be inlined
    for post_op in ("hardswish", "swish"):  # ... and the activations fused into the fp32 convs
        assert re.search(rf"""["']{post_op}["']""", code), post_op
    scale = output_scale(native)
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(30 + seed))
            ref = native(x)
            assert ref.abs().max() > 10 * scale
            _assert_within_one_step(compiled(x), ref, scale)
