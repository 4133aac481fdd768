"""The Backend owns its policy (issue 12 item 2): the default qconfigs ask the Backend object,
engine quirks are asked of fxquant.backends.engine, and a fused group lowers as the kernel of
what it really ends in (an add + sigmoid group is not lowered as add_relu)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.backends import engine as E
from fxquant.backends import names as N
from fxquant.backends.base import LowerCtx
from fxquant.backends.registry import get_backend, register_backend, unregister_backend
from fxquant.errors import ConfigError
from fxquant.extend import Chain, GroupFusion, Op, compose_backend, with_fusions
from fxquant.fake_quantize import get_default_qat_qconfig, get_default_qat_qconfig_mapping
from fxquant.meta import qinfo
from fxquant.passes import prepare_pipeline
from fxquant.patterns import NoMatch
from fxquant.qconfig import get_default_qconfig, get_default_qconfig_mapping, resolve_backend


def _scheme(factory) -> torch.qscheme:
    return factory().qscheme


@pytest.mark.parametrize(("name", "per_channel", "transpose_per_tensor"), [
    ("fbgemm", True, True), ("x86", True, True), ("onednn", True, False),
    ("qnnpack", False, False)])
def test_builtin_policy_fields(name, per_channel, transpose_per_tensor):
    backend = get_backend(name)
    assert backend.per_channel_weights is per_channel
    assert backend.per_tensor_conv_transpose is transpose_per_tensor


def test_default_backend_and_builtin_order():
    assert N.BUILTIN_BACKENDS == ("fbgemm", "x86", "qnnpack", "onednn")
    assert N.DEFAULT_BACKEND == "x86"
    assert N.machine_backend("AMD64") == "x86" and N.machine_backend("aarch64") == "qnnpack"
    with pytest.raises(ConfigError, match="machine 'riscv64'"):
        N.machine_backend("riscv64")
    assert get_backend(N.AUTO).name == N.machine_backend()


def test_composed_backend_brings_its_policy_to_the_default_qconfigs():
    """A backend composed from x86 with per-tensor weights: the default PTQ and QAT qconfigs
    follow its fields, not its parent's name."""
    mine = replace(compose_backend("x86", name="x86-per-tensor-test"), per_channel_weights=False,
                   per_tensor_conv_transpose=False)
    register_backend(mine)
    try:
        assert resolve_backend("x86-per-tensor-test") == "x86-per-tensor-test"
        qconfig = get_default_qconfig("x86-per-tensor-test")
        assert _scheme(qconfig.weight) == torch.per_tensor_symmetric
        assert _scheme(get_default_qconfig("x86").weight) == torch.per_channel_symmetric
        qat = get_default_qat_qconfig("x86-per-tensor-test")
        assert qat.weight().qscheme == torch.per_tensor_symmetric
        mapping = get_default_qconfig_mapping("x86-per-tensor-test")
        assert mapping.backend == "x86-per-tensor-test"
        assert mapping.object_type_qconfigs[nn.ConvTranspose2d] is mapping.global_qconfig
        qat_mapping = get_default_qat_qconfig_mapping("x86-per-tensor-test")
        assert qat_mapping.object_type_qconfigs[nn.ConvTranspose2d] is qat_mapping.global_qconfig
    finally:
        unregister_backend("x86-per-tensor-test")
    with pytest.raises(ConfigError, match="unknown quantization backend 'x86-per-tensor-test'"):
        get_default_qconfig("x86-per-tensor-test")


def test_engine_quirks_are_asked_by_meaning():
    assert E.clamp_needs_contiguous("qnnpack") and not E.clamp_needs_contiguous("x86")
    assert not E.fp16_packing_available("qnnpack") and E.fp16_packing_available("fbgemm")
    assert E.conv_unpack_unavailable("qnnpack", 3) and not E.conv_unpack_unavailable("qnnpack", 2)
    assert E.has_per_channel_deconv("qnnpack") and not E.has_per_channel_deconv("fbgemm")
    assert E.is_deconv3d_wrong("qnnpack") and not E.is_deconv3d_wrong("onednn")
    assert E.deconv_packing_engine("qnnpack") == "qnnpack"
    if "fbgemm" in E.supported_engines():
        assert E.deconv_packing_engine("x86") == "fbgemm"
        assert E.deconv_packing_engine("onednn") == "fbgemm"


def test_clamp_rules_follow_the_engine_quirk():
    """Both clamp rules of qnnpack make their input contiguous; x86's do not."""
    for name in ("qnnpack", "x86"):
        backend = get_backend(name)
        family = backend.rule_named("clamp_family").lower.__name__
        assert (family == "lower_same_op_contiguous") is E.clamp_needs_contiguous(backend.engine)


# ------------------------------------------------------------------ groups lower as what they end in


def _binary_ctx(last: object) -> LowerCtx:
    """A LowerCtx for ``add`` fused with ``last`` (quantized inputs without recorded shapes,
    so the kernel is not probed)."""
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    qa, qb = g.placeholder("qa"), g.placeholder("qb")
    add = g.call_function(torch.add, (a, b))
    end = g.call_function(last, (add,))
    g.output(end)
    gm = fx.GraphModule(nn.Module(), g)
    return LowerCtx(gm, add, {}, {0: qa, 1: qb}, 0.1, 0, torch.quint8, (add, end))


def test_add_relu_group_lowers_as_add_relu():
    ctx = _binary_ctx(F.relu)
    rule = get_backend("x86").rule_named("add")
    with ctx.gm.graph.inserting_before(ctx.node):
        new = rule.lower(ctx)
    assert isinstance(new, fx.Node) and new.target is torch.ops.quantized.add_relu


def test_add_sigmoid_group_is_refused_not_lowered_as_add_relu():
    ctx = _binary_ctx(torch.sigmoid)
    rule = get_backend("x86").rule_named("add")
    with ctx.gm.graph.inserting_before(ctx.node):
        new = rule.lower(ctx)
    assert isinstance(new, NoMatch)
    assert "torch.sigmoid" in new.reason and "no fused kernel" in new.reason


class _AddSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.a(x) + self.b(x))


def test_user_add_sigmoid_group_stays_float_end_to_end():
    """A user's add + sigmoid group fusion: convert keeps the group float (with why) instead
    of running quantized::add_relu, and the output stays close to float."""
    torch.manual_seed(0)
    group = GroupFusion(Chain(Op(torch.add, name="add"), Op(torch.sigmoid, name="sigmoid"),
                              name="add_sigmoid"), "add_sigmoid", "add + sigmoid")
    model, x = _AddSigmoid().eval(), torch.randn(2, 3, 8, 8)
    prepared = fxquant.prepare_fx(model, get_default_qconfig_mapping("x86"), (x,), backend="x86",
                                  passes=with_fusions(prepare_pipeline(), group_fusions=[group]))
    for _ in range(4):
        prepared(torch.randn(2, 3, 8, 8))
    quantized = fxquant.convert_fx(prepared)
    targets = [n.target for n in quantized.graph.nodes if n.op == "call_function"]
    assert torch.ops.quantized.add_relu not in targets
    grouped = [n for n in quantized.graph.nodes if qinfo(n).group is not None]
    assert any("no fused kernel" in d.reason for n in grouped for d in qinfo(n).decisions)
    err = (quantized(x) - model(x)).abs().max().item()
    assert err < 0.05, err


def test_dynamic_integer_linear_range_follows_the_engine():
    """The integer form of a dynamic linear quantizes activations as the engine's kernel:
    7-bit except on qnnpack (a backend's engine decides, not its name)."""
    assert E.dynamic_reduce_range("x86") and E.dynamic_reduce_range("fbgemm")
    assert not E.dynamic_reduce_range("qnnpack")


# ------------------------------------------------------------------ per-layer engine choice policy


@pytest.mark.parametrize(("name", "candidates"), [
    ("fbgemm", ("onednn", "qnnpack")), ("x86", ("onednn", "qnnpack")), ("onednn", ()),
    ("qnnpack", ())])
def test_builtin_engine_candidates(name, candidates):
    assert get_backend(name).engine_candidates == candidates


def test_composed_backend_inherits_engine_candidates():
    assert compose_backend("x86", name="x86-composed-test").engine_candidates == \
        get_backend("x86").engine_candidates


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(F.relu(self.pw(x)))


def _convert_convs(backend: str, **choice: object) -> fx.GraphModule:
    """_Convs quantized on ``backend`` (a registered name), convs probed however fast they are
    (engine choice options ``choice`` on top)."""
    from fxquant.backends import engine_choice

    model, x = _Convs().eval(), torch.randn(1, 8, 8, 8)
    prepared = fxquant.prepare_fx(model, get_default_qconfig_mapping(backend), (x,),
                                  backend=backend)
    prepared(x)
    engine_choice.clear_cache()
    with engine_choice.options(**{"enabled": True, "min_kernel_ms": 0.0, "repeats": 1,
                                  **choice}):
        return fxquant.convert_fx(prepared)


def _engine_choices(gm: fx.GraphModule) -> dict[str, list]:
    return {n.target: [d for d in qinfo(n).decisions if d.action == "engine_choice"]
            for n in gm.graph.nodes if n.op == "call_module"}


def _needs(*engines: str) -> None:
    if not set(engines) <= set(E.supported_engines()):
        pytest.skip(f"needs the {', '.join(engines)} engines")


@pytest.mark.parametrize("name", ["fbgemm", "x86", "onednn", "qnnpack"])
def test_convs_are_probed_where_the_backend_names_candidates(name):
    """x86 / fbgemm time their convs against onednn / qnnpack; onednn / qnnpack do not."""
    _needs(name)
    choices = _engine_choices(_convert_convs(name))
    assert set(choices) == {"pw", "dw"}
    probed = {t for t, ds in choices.items() if ds}
    assert probed == ({"pw", "dw"} if get_backend(name).engine_candidates else set())
    for ds in choices.values():
        for d in ds:
            tried = set(d.detail["times_ms"]) - {name}
            assert tried <= set(get_backend(name).engine_candidates)


def test_composed_backend_without_candidates_never_probes():
    _needs("x86", "onednn")
    register_backend(replace(compose_backend("x86", name="x86-no-choice-test"),
                             engine_candidates=()))
    quantized = _convert_convs("x86-no-choice-test", force="onednn")
    assert all(not ds for ds in _engine_choices(quantized).values())
    assert quantized.get_submodule("dw").packed_engine == "x86"
    forced = _convert_convs("x86", force="onednn")  # its parent does
    assert forced.get_submodule("dw").packed_engine == "onednn"


def test_engine_choice_overrides_of_the_backend_policy():
    """``candidates`` replaces what is tried, ``engines`` which engines' convs are probed
    (None: the backend's policy)."""
    _needs("x86", "onednn", "qnnpack")
    only_onednn = _engine_choices(_convert_convs("x86", candidates=("onednn",)))
    for ds in only_onednn.values():
        (d,) = ds
        assert set(d.detail["times_ms"]) == {"x86", "onednn"}
    assert all(not ds for ds in _engine_choices(_convert_convs("x86", engines=("fbgemm",)))
               .values())
    onednn = _convert_convs("onednn", engines=("onednn",), candidates=("qnnpack",),
                            force="qnnpack")
    for ds in _engine_choices(onednn).values():
        (d,) = ds
        assert set(d.detail["times_ms"]) == {"onednn", "qnnpack"}
