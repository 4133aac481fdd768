"""What this CPU's int8 kernels guarantee: can full-range (8-bit) activations be used?

x86 int8 kernels multiply uint8 activations by int8 weights. Without VNNI (AVX2, and AVX-512
without VNNI) they use ``vpmaddubsw``, which adds the products of two adjacent input channels
into a *saturating int16* before widening to int32: with full-range activations (0..255 times
-128..127, pair sums up to 65 280) the sum clips at 32 767 and the output is wrong by many
steps. With reduce_range activations (0..127) a pair sum stays below 32 512 and nothing clips.
VNNI (``vpdpbusd``: AVX512_VNNI, AVX_VNNI; AMX) accumulates the products straight into int32.

Which kernel runs depends on the engine:

* fbgemm has VNNI kernels for AVX512_VNNI only (an AVX_VNNI-only CPU runs its AVX2 kernels),
  and not for its depthwise convs (groups = channels), which add int16 pair sums on every CPU
  (torch 2.13: up to 74 steps off with full-range activations on an AVX-512 VNNI + AMX Xeon;
  lowering's numeric check catches them and packs those convs for onednn or qnnpack,
  ``fxquant.backends.native``);
* onednn uses AVX512_VNNI, AVX_VNNI or AMX;
* x86 runs fbgemm, and onednn for some convolutions on Linux with AVX512_VNNI
  (:func:`x86_engine_uses_onednn`, after torch's ``should_use_onednn_quant``);
* qnnpack accumulates in int32 on every CPU.

Both libraries let a process cap the ISA they use, which also simulates an older CPU:
``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` make an AVX-512 VNNI machine
run the AVX2 kernels, and this module reports what those kernels do. Both variables are read
once per process by the libraries, so this module reads them once too (:func:`host`).

Check a machine with ``python -c "from fxquant.backends.cpu import cpu_features;
print(cpu_features())"``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from fxquant.errors import FxQuantError

__all__ = ["ActivationRange", "CpuKind", "Host", "classify", "cpu_features", "cpuinfo_flags",
           "default_activation_range", "engine_accumulates_int32", "engine_of",
           "full_range_activations_safe", "host", "host_flags", "parse_cpuinfo_flags",
           "saturation_risk", "x86_engine_uses_onednn"]

CpuKind = Literal["vnni", "avx2", "arm", "other"]

VNNI_FLAGS: frozenset[str] = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""/proc/cpuinfo (and torch.cpu.get_capabilities) names of int32-accumulating int8 dot products."""

FBGEMM_ENV = "FBGEMM_ENABLE_INSTRUCTIONS"
ONEDNN_ENVS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN reads the first one set

# fbgemm's FBGEMM_ENABLE_INSTRUCTIONS names (fbgemmEnvGetIsa) without VNNI; AVX512_E1 and
# AVX512_E1_256 are its VNNI ones, and fbgemm ignores any other value.
_FBGEMM_NO_VNNI = frozenset({"AVX2", "AVX512", "AVX512_256"})
# oneDNN ISA caps below any VNNI ISA, and the caps that allow only AVX_VNNI (not AVX512_VNNI).
_ONEDNN_NO_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})
_ONEDNN_AVX_VNNI_ONLY = frozenset({"AVX2_VNNI", "AVX2_VNNI_2"})
_ENGINES = ("fbgemm", "x86", "onednn", "qnnpack")


def parse_cpuinfo_flags(text: str) -> frozenset[str] | None:
    """The feature flags of the first processor in a /proc/cpuinfo text (x86 ``flags`` or
    ARM ``Features``), lower-cased; None when the text has no such line."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.lower().split())
    return None


def cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """Flags from /proc/cpuinfo (Linux); None where the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo_flags(f.read())
    except OSError:
        return None


def _torch_flags() -> frozenset[str] | None:
    """Flags from torch's cpuinfo (``torch.cpu.get_capabilities``; same names as /proc/cpuinfo);
    None on a torch without it."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return None
    try:
        caps = get()
    except Exception:  # noqa: BLE001 - an optional probe of a private-ish torch API
        return None
    return frozenset(k for k, v in caps.items() if v is True)


def _capability_flags() -> frozenset[str]:
    """Last resort: torch's vectorization level ("AVX512", "AVX2", "DEFAULT"). It says nothing
    about VNNI, so an AVX-512 CPU counts as AVX2 here (the safe side: 7-bit activations)."""
    level = str(torch.backends.cpu.get_cpu_capability()).upper()
    return frozenset({"avx2"}) if level in ("AVX2", "AVX512") else frozenset()


@lru_cache(maxsize=1)
def host_flags() -> frozenset[str]:
    """This CPU's feature flags: /proc/cpuinfo, else torch's cpuinfo, else torch's capability."""
    for source in (cpuinfo_flags, _torch_flags):
        flags = source()
        if flags:
            return flags
    return _capability_flags()


def _env_value(env: Mapping[str, str], names: tuple[str, ...]) -> str:
    for name in names:
        value = env.get(name, "").strip().upper()
        if value:
            return value
    return ""


def _fbgemm_int32(flags: frozenset[str], env: Mapping[str, str]) -> bool:
    isa = _env_value(env, (FBGEMM_ENV,))
    return "avx512_vnni" in flags and isa not in _FBGEMM_NO_VNNI


def _onednn_int32(flags: frozenset[str], env: Mapping[str, str]) -> bool:
    isa = _env_value(env, ONEDNN_ENVS)
    if isa in _ONEDNN_NO_VNNI:
        return False
    if isa in _ONEDNN_AVX_VNNI_ONLY:
        return "avx_vnni" in flags
    return bool(flags & VNNI_FLAGS)


def x86_engine_uses_onednn(flags: frozenset[str] | None = None, system: str | None = None) -> bool:
    """Whether torch's "x86" engine sends (some) convolutions to onednn rather than fbgemm:
    on Linux with AVX512_VNNI, as torch's ``should_use_onednn_quant`` decides from cpuinfo
    (which the ISA-capping variables do not change). torch also requires symmetric weights,
    groups <= 100 and no output_padding for that op."""
    flags = host_flags() if flags is None else flags
    system = platform.system() if system is None else system
    return system == "Linux" and "avx512_vnni" in flags


def engine_accumulates_int32(engine: str, flags: frozenset[str], env: Mapping[str, str],
                             system: str = "Linux") -> bool:
    """Whether ``engine``'s uint8 x int8 products accumulate in int32 on a CPU with ``flags``
    under the ISA caps in ``env`` (False: int16 pair sums saturate on full-range input)."""
    _check_engine(engine)
    if engine == "qnnpack":
        return True
    if engine == "fbgemm":
        return _fbgemm_int32(flags, env)
    if engine == "onednn":
        return _onednn_int32(flags, env)
    onednn_too = x86_engine_uses_onednn(flags, system)  # engine == "x86"
    return _fbgemm_int32(flags, env) and (not onednn_too or _onednn_int32(flags, env))


def classify(flags: frozenset[str], machine: str, env: Mapping[str, str]) -> CpuKind:
    """"arm" (aarch64/arm64), "vnni" (an x86 VNNI flag and no ISA cap below VNNI), "avx2" (x86
    with AVX2 whose int8 kernels saturate int16 pair sums, AVX-512 without VNNI included), or
    "other" (x86 without AVX2, or unknown)."""
    machine = machine.lower()
    if machine.startswith(("aarch64", "arm")):
        return "arm"
    if flags & VNNI_FLAGS:
        capped = _env_value(env, (FBGEMM_ENV,)) in _FBGEMM_NO_VNNI or not _onednn_int32(flags, env)
        return "avx2" if capped else "vnni"
    return "avx2" if "avx2" in flags else "other"


@dataclass(frozen=True)
class Host:
    """What the answers here are computed from: the CPU's flags, ``platform.machine()`` /
    ``platform.system()``, and the ISA-capping variables as the process started with them."""

    flags: frozenset[str]
    machine: str
    system: str
    env: Mapping[str, str]


@lru_cache(maxsize=1)
def host() -> Host:
    """This process's :class:`Host`, read once (fbgemm and oneDNN read their variables once
    too); ``host.cache_clear()`` re-reads it."""
    env = {k: os.environ[k] for k in (FBGEMM_ENV, *ONEDNN_ENVS) if k in os.environ}
    return Host(host_flags(), platform.machine(), platform.system(), env)


def cpu_features() -> CpuKind:
    """This CPU's int8 class (see :func:`classify`), honouring ``FBGEMM_ENABLE_INSTRUCTIONS`` and
    ``ONEDNN_MAX_CPU_ISA``."""
    h = host()
    return classify(h.flags, h.machine, h.env)


def full_range_activations_safe(engine: str) -> bool:
    """Whether full-range (0..255) quint8 activations are exact on ``engine`` here: qnnpack
    always; fbgemm / x86 / onednn only on a VNNI CPU where that engine's kernels accumulate in
    int32 (fbgemm needs AVX512_VNNI; an ISA cap in the environment counts). Elsewhere use
    reduce_range (0..127) activations."""
    h = host()
    return engine_accumulates_int32(engine, h.flags, h.env, h.system)


def _check_engine(engine: str) -> None:
    if engine not in _ENGINES:
        raise FxQuantError(f"unknown quantized engine {engine!r}",
                           hint=f"use one of {', '.join(_ENGINES)}")


# ---------------------------------------------------------------------------------------------
# The default activation range of a backend on this CPU (the policy qconfig.py and
# fake_quantize.py ask for; issue 11 item 5)


@dataclass(frozen=True)
class ActivationRange:
    """The activation range a backend's default qconfig uses on this CPU, and why.

    ``reduce_range`` True: 7-bit activations (0..127), which the x86 kernels without VNNI
    compute exactly; False: full 8-bit activations (0..255), one bit more resolution, exact
    where the engine accumulates in int32 (VNNI / AMX, or qnnpack)."""

    backend: str
    engine: str
    cpu: CpuKind
    reduce_range: bool
    reason: str

    @property
    def bits(self) -> int:
        return 7 if self.reduce_range else 8


def engine_of(backend: str) -> str:
    """The torch quantized engine a backend runs on (a registered backend's ``engine``; the
    built-in backends are named after theirs)."""
    from fxquant.backends.registry import get_backend

    try:
        return get_backend(backend).engine
    except FxQuantError:
        return backend


def default_activation_range(backend: str) -> ActivationRange:
    """Full 8-bit activations where ``backend``'s int8 kernels accumulate in int32 on this CPU,
    7-bit (reduce_range) where they add pairs of products into a saturating int16 (x86
    without VNNI). Decided from :func:`host` (CPU flags and the ISA caps the process started
    with), so an AVX2 run of a VNNI machine (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``) picks 7-bit.
    An engine this module does not know gets 7-bit: exact on every x86 kernel."""
    engine = engine_of(backend)
    kind = cpu_features()
    if engine not in _ENGINES:
        return ActivationRange(backend, engine, kind, True,
                               f"7-bit activations (reduce_range): engine {engine!r} is not one "
                               f"fxquant knows the int8 accumulation of")
    if full_range_activations_safe(engine):
        why = ("qnnpack accumulates in int32 on every CPU" if engine_accumulates_int32(
            engine, frozenset(), {}) else
            f"this CPU ({kind}) runs {engine}'s int8 kernels with int32 accumulation (VNNI)")
        return ActivationRange(backend, engine, kind, False,
                               f"full 8-bit activations (0..255): {why}")
    return ActivationRange(backend, engine, kind, True,
                           f"7-bit activations (reduce_range, 0..127): this CPU ({kind}) runs "
                           f"{engine}'s int8 kernels without VNNI, which add pairs of uint8 x int8 "
                           f"products into a saturating int16; full-range activations would "
                           f"come out wrong")


def saturation_risk(backend: str, quant_min: int, quant_max: int) -> str | None:
    """Why quint8 activations spanning ``quant_min..quant_max`` fed to a weighted kernel of
    ``backend`` may saturate on this CPU, or None when they cannot: more than 128 levels
    (pair sums of 255 x 128 exceed int16) on an engine that does not accumulate in int32."""
    if quant_max - quant_min <= 127:
        return None
    engine = engine_of(backend)
    if engine in _ENGINES and full_range_activations_safe(engine):
        return None
    return (f"activations use {quant_min}..{quant_max} on {engine} and this CPU "
            f"({cpu_features()}) has no int32-accumulating (VNNI) {engine} kernels: int16 pair "
            f"sums saturate on such inputs")
