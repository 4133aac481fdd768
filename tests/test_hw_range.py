"""Hardware-aware default activation range (issue 11 item 5).

The x86 / fbgemm / onednn defaults use full 8-bit activations where this CPU runs the engine's
int8 kernels with int32 accumulation (VNNI / AMX), and 7-bit (reduce_range) where they add
pairs of products into a saturating int16 (AVX2, AVX-512 without VNNI); qnnpack is 8-bit
everywhere. The choice is recorded on the mapping and in prepare's decisions, and forcing
8-bit where the kernels saturate warns (SaturationWarning naming the nodes).

The CPU is simulated by replacing ``fxquant.backends.cpu.host`` (flags, machine, OS, ISA caps):
both branches run on every machine. Tests that run kernels hold on both kinds of CPU.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.backends import cpu
from fxquant.errors import SaturationWarning
from fxquant.meta import qinfo

_BASE = "sse sse2 ssse3 sse4_1 sse4_2 avx fma f16c avx2"
_AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl"
FLAGS = {
    "zen3": _BASE,
    "skylake_sp": f"{_BASE} {_AVX512}",
    "cascade_lake": f"{_BASE} {_AVX512} avx512_vnni",
    "alder_lake": f"{_BASE} avx_vnni",
    "sapphire_rapids": f"{_BASE} {_AVX512} avx_vnni avx512_vnni amx_tile amx_int8",
}
NATIVE = ("x86", "fbgemm", "onednn")


def simulate(monkeypatch: pytest.MonkeyPatch, name: str, **env: str) -> None:
    """Make fxquant believe it runs on the CPU ``name`` (Linux x86_64) under ``env``'s ISA caps."""
    flags = frozenset(FLAGS[name].split())
    monkeypatch.setattr(cpu, "host", lambda: cpu.Host(flags, "x86_64", "Linux", dict(env)))


def act_reduce_range(qconfig: fxquant.QConfig) -> bool:
    obs = qconfig.activation()
    return bool(getattr(obs, "reduce_range", False))


@pytest.mark.parametrize("name", ["sapphire_rapids", "cascade_lake"])
def test_vnni_cpus_get_full_8bit_activations(monkeypatch, name) -> None:
    simulate(monkeypatch, name)
    for backend in (*NATIVE, "qnnpack"):
        qc = fxquant.get_default_qconfig(backend)
        obs = qc.activation()
        assert (obs.quant_min, obs.quant_max, obs.reduce_range) == (0, 255, False), backend
        mapping = fxquant.get_default_qconfig_mapping(backend)
        assert mapping.activation_range.reduce_range is False
        assert mapping.activation_range.bits == 8
    assert "VNNI" in fxquant.get_default_qconfig_mapping("x86").activation_range.reason


@pytest.mark.parametrize("name", ["zen3", "skylake_sp"])
def test_avx2_cpus_get_7bit_activations_and_qnnpack_stays_8bit(monkeypatch, name) -> None:
    simulate(monkeypatch, name)
    for backend in NATIVE:
        obs = fxquant.get_default_qconfig(backend).activation()
        assert (obs.quant_min, obs.quant_max, obs.reduce_range) == (0, 127, True), backend
        chosen = fxquant.get_default_qconfig_mapping(backend).activation_range
        assert chosen.reduce_range and chosen.bits == 7 and "saturating int16" in chosen.reason
    assert not act_reduce_range(fxquant.get_default_qconfig("qnnpack"))
    assert "int32 on every CPU" in fxquant.get_default_qconfig_mapping("qnnpack").activation_range.reason


def test_engine_specific_vnni(monkeypatch) -> None:
    """fbgemm has VNNI kernels for AVX512_VNNI only: an AVX_VNNI-only CPU (Alder Lake) runs its
    AVX2 kernels, so fbgemm and x86 stay 7-bit there while onednn gets 8-bit."""
    simulate(monkeypatch, "alder_lake")
    assert act_reduce_range(fxquant.get_default_qconfig("fbgemm"))
    assert act_reduce_range(fxquant.get_default_qconfig("x86"))
    assert not act_reduce_range(fxquant.get_default_qconfig("onednn"))


def test_isa_cap_in_the_environment_counts(monkeypatch) -> None:
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 make a VNNI machine run (and
    fxquant pick for) the AVX2 kernels (tests/test_cpu.py runs the real subprocess)."""
    simulate(monkeypatch, "sapphire_rapids", FBGEMM_ENABLE_INSTRUCTIONS="AVX2",
             ONEDNN_MAX_CPU_ISA="AVX2")
    for backend in NATIVE:
        assert act_reduce_range(fxquant.get_default_qconfig(backend)), backend


def test_qat_defaults_follow_the_same_policy(monkeypatch) -> None:
    for name, expected in (("sapphire_rapids", False), ("zen3", True)):
        simulate(monkeypatch, name)
        for backend in NATIVE:
            for version in (0, 1):
                act = fxquant.get_default_qat_qconfig(backend, version).activation()
                assert act.reduce_range is expected, (name, backend, version)
                assert (act.quant_min, act.quant_max) == ((0, 127) if expected else (0, 255))
            mapping = fxquant.get_default_qat_qconfig_mapping(backend)
            assert mapping.activation_range.reduce_range is expected
        assert not fxquant.get_default_qat_qconfig("qnnpack").activation().reduce_range


def test_reduce_range_argument_pins_the_choice(monkeypatch) -> None:
    simulate(monkeypatch, "zen3")
    mapping = fxquant.get_default_qconfig_mapping("x86", reduce_range=False)
    assert not act_reduce_range(mapping.global_qconfig)
    assert "asked for (reduce_range=False)" in mapping.activation_range.reason
    simulate(monkeypatch, "sapphire_rapids")
    assert act_reduce_range(fxquant.get_default_qconfig("x86", reduce_range=True))
    assert fxquant.get_default_qat_qconfig("onednn", reduce_range=True).activation().reduce_range


def test_saturation_risk() -> None:
    assert cpu.saturation_risk("x86", 0, 127) is None
    assert cpu.saturation_risk("qnnpack", 0, 255) is None


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_prepare_records_the_choice_on_the_nodes() -> None:
    mapping = fxquant.get_default_qconfig_mapping("x86")
    prepared = fxquant.prepare_fx(_mlp(), mapping, (torch.randn(2, 16),), backend="x86")
    texts = [d.reason for n in prepared.graph.nodes if n.op == "call_module"
             for d in qinfo(n).decisions if d.action == "assign_qconfig"]
    assert texts and all(mapping.activation_range.reason in t for t in texts)


def _prepare_warnings(mapping: fxquant.QConfigMapping) -> tuple[nn.Module, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = fxquant.prepare_fx(_mlp(), mapping, (torch.randn(2, 16),), backend="x86")
    return prepared, [w for w in caught if issubclass(w.category, SaturationWarning)]


def test_forcing_8bit_on_a_saturating_cpu_warns_naming_the_nodes(monkeypatch) -> None:
    simulate(monkeypatch, "zen3")
    prepared, caught = _prepare_warnings(fxquant.get_default_qconfig_mapping("x86", reduce_range=False))
    assert len(caught) == 1, [str(w.message) for w in caught]
    text = str(caught[0].message)
    assert "0..255" in text and "module 0" in text and "module 2" in text and "qnnpack" in text
    assert caught[0].filename == __file__  # points at the user's prepare call
    risky = [n for n in prepared.graph.nodes
             if any(d.action == "saturation_risk" for d in qinfo(n).decisions)]
    assert len(risky) == 2
    simulate(monkeypatch, "sapphire_rapids")
    assert not _prepare_warnings(fxquant.get_default_qconfig_mapping("x86", reduce_range=False))[1]
    simulate(monkeypatch, "zen3")
    assert not _prepare_warnings(fxquant.get_default_qconfig_mapping("x86"))[1]


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - x).norm().clamp_min(1e-12)))


def _converted_and_reference(mapping: fxquant.QConfigMapping) -> tuple[nn.Module, nn.Module]:
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SaturationWarning)
        prepared = fxquant.prepare_fx(_mlp(), mapping, (torch.randn(2, 16),), backend="x86")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        prepared(torch.randn(32, 16, generator=gen) * 3)
    return fxquant.convert_fx(prepared), fxquant.convert_to_reference_fx(prepared)


def test_forced_8bit_is_never_silent_garbage() -> None:
    """On this machine, whatever it is: 8-bit activations forced on x86 either run exact
    kernels (VNNI) or saturating ones are replaced (qnnpack packing) or kept float: the
    converted model agrees with the reference graph."""
    quantized, reference = _converted_and_reference(
        fxquant.get_default_qconfig_mapping("x86", reduce_range=False))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 3
    assert _sqnr(reference(x), quantized(x)) >= 30.0
    replaced = [d.reason for n in quantized.graph.nodes for d in qinfo(n).decisions
                if "instead of the backend's kernel" in d.reason]
    if not cpu.full_range_activations_safe("x86"):
        assert replaced, "a saturating kernel was kept on a CPU without VNNI"


def test_the_default_never_needs_a_replacement_kernel_here() -> None:
    """The hardware-chosen default runs the backend's own kernels on this CPU, exactly."""
    quantized, reference = _converted_and_reference(fxquant.get_default_qconfig_mapping("x86"))
    lowered = [d.reason for n in quantized.graph.nodes for d in qinfo(n).decisions
               if d.action == "lower"]
    assert any("quantized::linear" in r for r in lowered)
    assert not any("packed with qnnpack" in r for r in lowered), lowered
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 3
    assert _sqnr(reference(x), quantized(x)) >= 30.0


@pytest.mark.parametrize("backend", ["x86", "fbgemm"])
def test_saturating_depthwise_conv_is_repacked_not_kept_float(backend: str) -> None:
    """fbgemm's depthwise conv (the x86 engine's kernel past 100 groups) adds int16 pair sums
    on every CPU, VNNI included: with full-range activations (the VNNI default, forced here so
    both kinds of CPU run it) lowering's check refuses it and packs the weights for onednn
    (exact where the CPU has VNNI, and faster than qnnpack there) or else qnnpack. The conv
    stays int8 and agrees with the reference graph."""
    from fxquant.nn.quantized import _PackedWeighted

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(144, 144, 3, padding=1, groups=144), nn.ReLU6()).eval()
    with torch.no_grad():
        model[0].weight.uniform_(-0.5, 0.5)
    mapping = fxquant.get_default_qconfig_mapping(backend, reduce_range=False)
    prepared = fxquant.prepare_fx(model, mapping, (torch.randn(1, 144, 14, 14),), backend=backend)
    for _ in range(3):  # ReLU6-like inputs that use the whole 0..255 range
        prepared((torch.rand(1, 144, 14, 14) * 7).clamp(max=6))
    quantized, reference = fxquant.convert_fx(prepared), fxquant.convert_to_reference_fx(prepared)
    (conv,) = [m for m in quantized.modules() if isinstance(m, _PackedWeighted)]
    x = (torch.rand(2, 144, 14, 14) * 7).clamp(max=6)
    step = float(conv.scale)
    assert float((quantized(x) - reference(x)).abs().max()) <= step * 1.01
    if getattr(conv, "pack_engine", None):  # the backend's own kernel was refused
        # onednn is tried first: its depthwise kernel sums no channel pairs, so it passes on
        # AVX2 too (and on VNNI it is the fastest); qnnpack only if onednn was refused as well
        assert conv.packed_engine in ("onednn", "qnnpack"), conv.packed_engine
        reasons = " ".join(d.reason for n in quantized.graph.nodes for d in qinfo(n).decisions)
        assert conv.packed_engine == "onednn" or "onednn" in reasons, reasons
