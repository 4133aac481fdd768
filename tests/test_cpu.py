"""fxquant.backends.cpu: CPU flags → int8 class, ISA caps, and agreement with the kernels."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fxquant.backends import cpu
from fxquant.backends.engine import engine, supported_engines
from fxquant.errors import FxQuantError
from tests.util import int16_pair_saturation_bound

_COMMON = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx "
           "fxsr sse sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology "
           "pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c "
           "rdrand hypervisor lahf_lm abm fsgsbase bmi1 smep bmi2 erms invpcid rdseed adx smap")
_AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl"
# flag lines as /proc/cpuinfo prints them (trimmed; the int8-relevant flags as on the real CPUs)
FLAGS = {
    "zen3": f"flags\t\t: {_COMMON} avx2 sse4a clflushopt clwb sha_ni xsaveopt vaes vpclmulqdq",
    "zen4": f"flags\t\t: {_COMMON} avx2 {_AVX512} avx512_bf16 avx512vbmi avx512_vbmi2 gfni "
            "avx512_vnni avx512_bitalg avx512_vpopcntdq",
    "skylake_sp": f"flags\t\t: {_COMMON} avx2 {_AVX512} clflushopt clwb",
    "cascade_lake": f"flags\t\t: {_COMMON} avx2 {_AVX512} clflushopt clwb avx512_vnni",
    "alder_lake": f"flags\t\t: {_COMMON} avx2 clflushopt clwb sha_ni avx_vnni serialize",
    "sapphire_rapids": f"flags\t\t: {_COMMON} avx2 {_AVX512} avx_vnni avx512_bf16 avx512_vnni "
                       "amx_bf16 avx512_fp16 amx_tile amx_int8",
    "westmere": "flags\t\t: fpu vme de pse tsc msr pae mce cx8 sse sse2 ssse3 sse4_1 sse4_2 popcnt",
    "graviton2": "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
                 "cpuid asimdrdm lrcpc dcpop asimddp ssbs",
}
ARM_MACHINES = {"graviton2"}


def flags_of(name: str) -> frozenset[str]:
    text = f"processor\t: 0\nmodel name\t: {name}\n{FLAGS[name]}\n\nprocessor\t: 1\n"
    flags = cpu.parse_cpuinfo_flags(text)
    assert flags is not None
    return flags


def kind(name: str, **env: str) -> str:
    return cpu.classify(flags_of(name), "aarch64" if name in ARM_MACHINES else "x86_64", env)


# ---------------------------------------------------------------------------------------------
# parsing and classification


def test_parse_cpuinfo_flags_reads_the_first_flags_line() -> None:
    text = "processor : 0\nflags : avx2 AVX512_VNNI sse\n\nprocessor : 1\nflags : sse\n"
    assert cpu.parse_cpuinfo_flags(text) == frozenset({"avx2", "avx512_vnni", "sse"})
    assert "asimddp" in flags_of("graviton2")
    assert cpu.parse_cpuinfo_flags("processor : 0\nmodel name : ? flags\n") is None
    assert cpu.parse_cpuinfo_flags("") is None


@pytest.mark.parametrize("name,expected", [
    ("zen3", "avx2"), ("skylake_sp", "avx2"), ("westmere", "other"), ("graviton2", "arm"),
    ("zen4", "vnni"), ("cascade_lake", "vnni"), ("alder_lake", "vnni"), ("sapphire_rapids", "vnni"),
])
def test_classify_sample_cpus(name: str, expected: str) -> None:
    assert kind(name) == expected


def test_classify_needs_flags_not_just_a_vnni_like_word() -> None:
    assert cpu.classify(frozenset({"avx2", "avx512_4vnniw"}), "x86_64", {}) == "avx2"
    assert cpu.classify(frozenset(), "AMD64", {}) == "other"
    assert cpu.classify(frozenset({"asimddp"}), "arm64", {}) == "arm"


@pytest.mark.parametrize("env,expected", [
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, "avx2"),
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "avx512"}, "avx2"),  # fbgemm upper-cases; AVX-512, no VNNI
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1"}, "vnni"),
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "NOT_AN_ISA"}, "vnni"),  # fbgemm ignores unknown names
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "avx2"),
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "avx2"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, "vnni"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}, "vnni"),  # Sapphire Rapids has AVX_VNNI
    ({"DNNL_MAX_CPU_ISA": "AVX2"}, "avx2"),
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "avx2"),
])
def test_isa_caps_in_the_environment_are_honoured(env: dict[str, str], expected: str) -> None:
    assert kind("sapphire_rapids", **env) == expected


def test_an_isa_cap_never_adds_vnni_a_cpu_lacks() -> None:
    assert kind("zen3", FBGEMM_ENABLE_INSTRUCTIONS="AVX512_E1") == "avx2"
    assert kind("zen3", ONEDNN_MAX_CPU_ISA="AVX512_CORE_AMX") == "avx2"
    # AVX2_VNNI caps oneDNN to AVX_VNNI, which Cascade Lake does not have: AVX2 kernels run
    assert kind("cascade_lake", ONEDNN_MAX_CPU_ISA="AVX2_VNNI") == "avx2"


def test_int32_accumulation_per_engine() -> None:
    def int32(name: str, eng: str, system: str = "Linux", **env: str) -> bool:
        return cpu.engine_accumulates_int32(eng, flags_of(name), env, system)

    assert all(int32(n, "qnnpack") for n in FLAGS)
    assert not any(int32("zen3", e) for e in ("fbgemm", "x86", "onednn"))
    assert all(int32("zen4", e) for e in ("fbgemm", "x86", "onednn"))
    # fbgemm has no AVX_VNNI kernels: Alder Lake runs its AVX2 ones (and x86 runs fbgemm there)
    assert int32("alder_lake", "onednn") and not int32("alder_lake", "fbgemm")
    assert not int32("alder_lake", "x86")
    # x86 on Linux + AVX512_VNNI also runs onednn convs: both must be int32
    assert not int32("zen4", "x86", ONEDNN_MAX_CPU_ISA="AVX2")
    assert int32("zen4", "x86", system="Darwin", ONEDNN_MAX_CPU_ISA="AVX2")  # fbgemm only there
    assert not int32("zen4", "fbgemm", FBGEMM_ENABLE_INSTRUCTIONS="AVX2")


def test_x86_engine_uses_onednn_like_torch() -> None:
    assert cpu.x86_engine_uses_onednn(flags_of("cascade_lake"), "Linux")
    assert not cpu.x86_engine_uses_onednn(flags_of("cascade_lake"), "Windows")
    assert not cpu.x86_engine_uses_onednn(flags_of("alder_lake"), "Linux")
    assert not cpu.x86_engine_uses_onednn(flags_of("zen3"), "Linux")


def test_unknown_engine_is_an_fxquant_error_naming_the_engines() -> None:
    with pytest.raises(FxQuantError, match="(?s)'fbgemmm'.*one of fbgemm, x86, onednn, qnnpack"):
        cpu.full_range_activations_safe("fbgemmm")


# ---------------------------------------------------------------------------------------------
# this process: sources, caching, the environment


@pytest.fixture
def fresh_host() -> Iterator[None]:
    """Re-read the host inside the test and again afterwards (the real environment)."""
    cpu.host.cache_clear()
    cpu.host_flags.cache_clear()
    yield
    cpu.host.cache_clear()
    cpu.host_flags.cache_clear()


def test_host_flags_fall_back_to_torch_then_to_the_capability(fresh_host, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "cpuinfo_flags", lambda: None)
    monkeypatch.setattr(cpu, "_torch_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert cpu.host_flags() == frozenset({"avx2", "avx512_vnni"})
    cpu.host_flags.cache_clear()
    monkeypatch.setattr(cpu, "_torch_flags", lambda: None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu.host_flags() == frozenset({"avx2"})  # no VNNI news: the safe side


def test_torch_flags_name_the_flags_as_proc_cpuinfo_does() -> None:
    proc, ours = cpu.cpuinfo_flags(), cpu._torch_flags()
    if proc is None or ours is None or not proc & {"avx2", "asimd"}:
        pytest.skip("needs /proc/cpuinfo and torch.cpu.get_capabilities on x86")
    for flag in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8"):
        assert (flag in proc) == (flag in ours), flag


def test_cpu_features_follows_the_environment(fresh_host, monkeypatch) -> None:
    for name in (cpu.FBGEMM_ENV, *cpu.ONEDNN_ENVS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setattr(cpu, "host_flags", lambda: flags_of("sapphire_rapids"))
    assert cpu.cpu_features() == "avx2"
    assert not cpu.full_range_activations_safe("fbgemm")
    assert cpu.full_range_activations_safe("qnnpack")
    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS")
    assert cpu.cpu_features() == "avx2", "read once per process, as fbgemm does"
    cpu.host.cache_clear()
    assert cpu.cpu_features() == "vnni"
    assert cpu.full_range_activations_safe("fbgemm") and cpu.full_range_activations_safe("x86")


def test_readme_command_reports_the_simulated_cpu() -> None:
    code = "from fxquant.backends.cpu import cpu_features; print(cpu_features())"
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out in ("avx2", "other", "arm"), out
    if "avx2" in cpu.host_flags():
        assert out == "avx2"


# ---------------------------------------------------------------------------------------------
# what the kernels do agrees with what this module says


PROBE_ENGINES = [e for e in ("fbgemm", "x86", "onednn", "qnnpack") if e in supported_engines()]
PROBE_OUT_SCALE = 1024.0


def probe(kind: str) -> tuple[int, int, float]:
    """(kernel output, exact output, 1 + saturation bound) in output steps of a worst case for
    int16 pair sums: 4 channels of 255 x 127 (pair sums 64 770), 1x1 conv or linear."""
    q = torch._make_per_tensor_quantized_tensor
    if kind == "conv":
        module: nn.Module = nn.Conv2d(4, 4, 1, bias=False)
        x_int = torch.full((1, 4, 2, 2), 255, dtype=torch.uint8)
        w = q(torch.full((4, 4, 1, 1), 127, dtype=torch.int8), 1.0, 0)
        packed = torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [0, 0], [1, 1], 1)
        out = torch.ops.quantized.conv2d(q(x_int, 1.0, 0), packed, PROBE_OUT_SCALE, 0)
    else:
        module = nn.Linear(4, 4, bias=False)
        x_int = torch.full((2, 4), 255, dtype=torch.uint8)
        w = q(torch.full((4, 4), 127, dtype=torch.int8), 1.0, 0)
        packed = torch.ops.quantized.linear_prepack(w, None)
        out = torch.ops.quantized.linear(q(x_int, 1.0, 0), packed, PROBE_OUT_SCALE, 0)
    got = out.int_repr()
    assert bool((got == got.flatten()[0]).all())
    exact = round(4 * 255 * 127 / PROBE_OUT_SCALE)
    bound = int16_pair_saturation_bound(module, x_int, w.int_repr(), 0)
    return int(got.flatten()[0]), exact, 1 + float(bound.max()) / PROBE_OUT_SCALE


def library_of(eng: str, kind: str) -> str:
    """The library whose kernel runs the probe: the x86 engine runs convs on onednn where
    torch prefers it (Linux, AVX512_VNNI; symmetric weights, no output_padding), else fbgemm."""
    if eng != "x86":
        return eng
    return "onednn" if kind == "conv" and cpu.x86_engine_uses_onednn() else "fbgemm"


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("eng", PROBE_ENGINES)
def test_kernels_saturate_exactly_where_full_range_is_called_unsafe(eng: str, kind: str) -> None:
    with engine(eng):
        got, exact, allowed = probe(kind)
    assert abs(got - exact) <= allowed  # the bound holds on every CPU (tight: 63 vs 63.5)
    if cpu.full_range_activations_safe(eng):
        assert got == exact, f"{eng} saturated on a CPU reported {cpu.cpu_features()!r}"
    lib = library_of(eng, kind)
    if cpu.full_range_activations_safe(lib):
        assert got == exact, f"{lib} ({eng}) saturated on a CPU reported {cpu.cpu_features()!r}"
    elif cpu.cpu_features() in ("avx2", "vnni"):  # known x86 kernels: the saturation shows
        assert exact - got > 50, f"{lib} ({eng}) did not saturate on {cpu.cpu_features()!r}"
