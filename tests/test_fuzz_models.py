"""Random small models: the converted model agrees with fxquant's own reference graph.

The generator and the differential check live in tests/fuzz_models.py (shared with ``make
fuzz``, which runs 2000 models; its docstring defines "disagreement"). Here CI runs the first
CI_MODELS (200) seeds on x86 and qnnpack: prepare → calibrate → convert_fx and
convert_to_reference_fx of the same prepared model → run; a model fails on any exception, an
output structure that differs from float's, a ``call_*`` node without a decision, or a
prepared model that no longer computes float, a reference graph whose data flow is wrong
(quantization turned into copies, still far from float), or a disagreement (SQNRs capped at
40 dB: converted vs float more than 10 dB below reference vs float, or converted vs reference
more than 10 dB below reference vs float). A failing seed is reproduced, and shrunk to its
shortest failing prefix, by ``python -m tests.fuzz_models --replay SEED --backends BACKEND
--shrink``.

Open bugs (KNOWN_OPEN) make a failing model an xfail (strict=False) only for the failure kinds
and backends the bug causes and only in models that use its construct. The minimal reproducers
of what the fuzz found are at the end of this file: an open one xfails (strict=False) with its
reason while it fails; a fixed one is a plain regression test.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.meta import record
from tests import fuzz_models as fz
from tests.fuzz_models import Model, Outcome, check, generate

BACKENDS = tuple(b for b in fz.BACKENDS if b in torch.backends.quantized.supported_engines)

def _uses(*prefixes: str) -> Callable[[tuple[str, ...]], bool]:
    return lambda used: any(u.startswith(prefixes) for u in used)


def _inplace_on_einsum(used: tuple[str, ...]) -> bool:
    """An in-place op of any spelling (x.relu_(), F.relu(x, inplace=True), add_, +=, ...) in a
    model with an einsum (whose output can be a view of its input)."""
    inplace = any("_(" in u or "inplace=True" in u or u in ("add:iadd", "mul:imul")
                  for u in used)
    return inplace and _uses("einsum")(used)


def _fixed_qparams(used: tuple[str, ...]) -> bool:
    """sigmoid / tanh / softmax / hardsigmoid (not hardtanh): fixed full-range qparams."""
    return any(re.search(r"sigmoid|(?<!hard)tanh|softmax", u.lower()) for u in used)


def _scalar_op(used: tuple[str, ...]) -> bool:
    """x + c / x * c in any spelling (a tensor and a Python number)."""
    return any(u.startswith(("add:", "mul:")) and "{b}" not in u
               and u not in ("add:iadd", "mul:imul") for u in used)


@dataclass(frozen=True)
class Known:
    """An open bug: which models have its construct, which failure kinds and backends it
    explains, and the reason."""

    has: Callable[[tuple[str, ...]], bool]
    kinds: frozenset[str]
    reason: str
    backends: frozenset[str] = frozenset(fz.BACKENDS)


# Fixed since the fuzz found them (regression tests at the end): upsampling a (N,C,1,1) tensor
# and x86 ConvTranspose2d k=2 s=2 (1dde5b4, C's kernel self-check); in-place writes through
# views and to the graph input, cat sets through pools, scalar ops into cat (f31a05d, D);
# sigmoid / tanh / hardsigmoid (full 0..255 range) into fbgemm on AVX2 (the kernel check sees
# the producer's range, cbbe064); an in-place write on an einsum view (aliasing.view_source);
# the reference graph's qparams after x + c / x * c (the kernel's derived ones, convert).
# A new open bug goes here with its construct, failure kinds and backends.
KNOWN_OPEN: dict[str, Known] = {}


def known_bug(o: Outcome) -> Optional[str]:
    """The open bug that explains a failing outcome, or None: only the failure kinds the bug
    causes, on its backends, in models that use its construct."""
    return next((k.reason for k in KNOWN_OPEN.values()
                 if o.kind in k.kinds and o.backend in k.backends and k.has(o.used)), None)


def _report(failed: list[Outcome], model: Model) -> str:
    lines = [f"{o.summary()}\n  replay: python -m tests.fuzz_models --replay {o.seed} "
             f"--backends {o.backend} --shrink" for o in failed]
    return "\n".join(lines) + f"\n--- model (ops: {', '.join(model.used)}) ---\n{model.source}"


# ------------------------------------------------------------------------------ the fuzz
@pytest.mark.parametrize("seed", range(fz.CI_MODELS))
def test_converted_agrees_with_reference(seed: int) -> None:
    model = generate(seed)
    failed = [o for o in (check(model, b) for b in BACKENDS) if o.failed]
    if not failed:
        return
    reasons = {known_bug(o) for o in failed}
    if None not in reasons:
        pytest.xfail("; ".join(sorted(r for r in reasons if r)))
    raise AssertionError(_report(failed, model))


FUSE_SUMS_MODELS = 40  # seeds checked with convert_fx(..., fuse_sums=True) on x86


@pytest.mark.parametrize("seed", range(FUSE_SUMS_MODELS))
def test_fuse_sums_converted_agrees_with_reference(seed: int, monkeypatch) -> None:
    """The fuse_sums convert (conv + residual add rounded once) on the generated models, the
    vocabulary widened by residual blocks (``--fuse-sums``): native vs its reference graph.
    (``python -m tests.fuzz_models --fuse-sums --n 400 --backends x86``: 400 models, 0
    failures, VNNI and AVX2 kernels, when it was added.)"""
    monkeypatch.setattr(fz, "FUSE_SUMS", [True])
    model = generate(seed)
    failed = [o for o in (check(model, "x86"),) if o.failed]
    assert not failed, _report(failed, model)


def _converted_x86(model: fz.Model, **convert_options: bool) -> torch.nn.Module:
    """A generated model prepared for x86, calibrated on one random batch, converted."""
    x = torch.randn(*model.input_shape)
    prepared = fxquant.prepare_fx(fz.build(model.source),
                                  fxquant.get_default_qconfig_mapping("x86"), (x,),
                                  backend="x86", leaf_modules=[fz.UserLeaf])
    prepared(x)
    return fxquant.convert_fx(prepared, **convert_options)


def test_fuse_sums_fuzz_models_do_fuse(monkeypatch) -> None:
    """The residual blocks of the --fuse-sums vocabulary reach the fused kernel."""
    from fxquant.nn.conv_add import ConvAdd2d

    monkeypatch.setattr(fz, "FUSE_SUMS", [True])
    fused = 0
    for seed in range(FUSE_SUMS_MODELS):
        model = generate(seed)
        if not any(u.startswith("residual") for u in model.used):
            continue
        converted = _converted_x86(model, fuse_sums=True)
        fused += any(isinstance(m, ConvAdd2d) for m in converted.modules())
    assert fused >= 2, fused


FUSE_ACTS_MODELS = 40  # seeds checked with both fusions (fuse_sums, fuse_activations) on x86


@pytest.mark.parametrize("seed", range(FUSE_ACTS_MODELS))
def test_fused_activations_converted_agrees_with_reference(seed: int, monkeypatch) -> None:
    """The convert with both fusions (conv + residual add, conv + SiLU / hardswish rounded
    once) on the generated models, the vocabulary widened by residual and conv + activation
    blocks (``--fuse-sums --fuse-activations``): native vs its reference graph.
    (``python -m tests.fuzz_models --fuse-sums --fuse-activations --n 400 --backends x86``:
    400 models, 0 failures, VNNI and AVX2 kernels, when it was added.)"""
    monkeypatch.setattr(fz, "FUSE_SUMS", [True])
    monkeypatch.setattr(fz, "FUSE_ACTS", [True])
    model = generate(seed)
    failed = [o for o in (check(model, "x86"),) if o.failed]
    assert not failed, _report(failed, model)


def test_fuse_activations_fuzz_models_do_fuse(monkeypatch) -> None:
    """The conv + activation blocks of the --fuse-activations vocabulary reach the fused
    kernel, SiLU and hardswish both."""
    from fxquant.nn.conv_add import ConvAct2d

    monkeypatch.setattr(fz, "FUSE_SUMS", [True])
    monkeypatch.setattr(fz, "FUSE_ACTS", [True])
    seen: set[str] = set()
    for seed in range(200):  # both within the first 50 seeds (SiLU first at 7, hardswish at 44)
        model = generate(seed)
        if seen == {"silu", "hardswish"}:
            break
        if not any(u.startswith("conv_act") for u in model.used):
            continue
        converted = _converted_x86(model, fuse_sums=True, fuse_activations=True)
        seen |= {m.activation for m in converted.modules() if isinstance(m, ConvAct2d)}
    assert seen == {"silu", "hardswish"}, seen


def test_vocabulary_is_wide_enough() -> None:
    """At least 30 op families with their spellings, supported and unsupported ones, issue 9's
    silent-wrong constructs among them, and every family is written by the CI seeds."""
    assert len(fz.VOCABULARY) >= 30
    assert len(fz.RELU_SPELLINGS) >= 9 and len(fz.CLAMP_SPELLINGS) >= 8
    assert {"sort", "topk", "einsum", "user_leaf", "shape_arith", "mask"} <= set(fz.VOCABULARY)
    used = [u for s in range(fz.CI_MODELS) for u in generate(s).used]
    families = {u.split(":")[0] for u in used}
    assert set(fz.VOCABULARY) <= families, f"never generated: {set(fz.VOCABULARY) - families}"
    for construct in ("convtranspose:k2s2", "upsample_1x1:F.interpolate",
                      "upsample_1x1:F.adaptive_avg_pool2d", "inplace_view:slice_relu",
                      "inplace_view:view_add", "cat_pool_cat:max", "cat_pool_cat:avg", "mlp:",
                      "broadcast:{x} + {p}"):
        assert any(u.startswith(construct) for u in used), f"never generated: {construct}"
    assert any(u.startswith("convtranspose:k2s2") and u.endswith("_wide") for u in used)


def test_generator_writes_valid_models() -> None:
    """Generated models run in float and trace with torch.fx (leaf modules kept opaque) to the
    same output structure; a seed always gives the same model, and ``limit`` a prefix of it."""
    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, fz.UserLeaf) or super().is_leaf_module(m, name)

    for seed in range(30):
        model = generate(seed)
        assert model.used and model == generate(seed)
        m = fz.build(model.source)
        gm = fx.GraphModule(m, Tracer().trace(m))
        x = torch.randn(*model.input_shape)
        with torch.no_grad():
            assert fz.structure(gm(x.clone())) == fz.structure(m(x.clone())), model.source
        prefix = generate(seed, limit=1)  # the first op, then a head
        assert prefix.used[0] == model.used[0]
        first = model.source.split("v0 = x\n")[1].splitlines()[0]
        assert prefix.source.split("v0 = x\n")[1].splitlines()[0] == first


def test_sqnr() -> None:
    """SQNR over every floating tensor of the outputs, in dB, capped; -inf where the
    approximation is not finite; a constant offset is noise."""
    s = torch.ones(100)
    assert fz.sqnr(s, s * 1.1) == pytest.approx(20.0)
    assert fz.sqnr((s, s), (s * 1.1, s * 1.01)) == pytest.approx(10 * math.log10(200 / 1.01))
    assert fz.sqnr(s, s) == fz.CAP_DB and fz.sqnr(s, s * (1 + 1e-4)) == fz.CAP_DB
    assert fz.sqnr(s, torch.full((100,), math.nan)) == -math.inf
    assert fz.sqnr(torch.zeros(3), torch.ones(3)) == pytest.approx(-80.0)  # RMS floor 1e-4
    tiny = torch.randn(100) * 1e-8  # float rounding of an exact zero: not a signal
    assert fz.sqnr(tiny, torch.randn(100) * 1e-8) == fz.CAP_DB
    assert fz.sqnr(tiny, tiny + 1e-3) == pytest.approx(-20.0)
    assert fz.sqnr((s, torch.arange(3)), (s * 1.1, torch.arange(3) + 1)) == pytest.approx(20.0)


CONV = """class Generated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))
"""


def _sabotaged(convert: Any, damage: Any) -> Any:
    """A convert_fx whose model's output goes through ``damage`` (a node with a decision, so
    only the numbers change): a stand-in for a wrong kernel."""
    def wrapped(prepared: fx.GraphModule, **kw: Any) -> fx.GraphModule:
        gm = convert(prepared, **kw)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            hurt = gm.graph.call_function(damage, (out.args[0],))
        record(hurt, "test", "sabotage", "a wrong kernel's stand-in")
        out.args = (hurt,)
        gm.recompile()
        return gm
    return wrapped


@pytest.mark.parametrize("damage,kind", [
    (lambda y: y.flip(1), "disagreement"),                      # channels scrambled
    (lambda y: y + 0.5 * y.abs().mean(), "disagreement"),       # an offset of many steps
    (lambda y: y.float().mean(1), "structure"),
    (lambda y: y[:, :, :, :], "ok"),                            # a view: not a change
], ids=["scrambled", "offset", "shape", "unchanged"])
def test_check_flags_a_wrong_converted_model(monkeypatch, damage, kind) -> None:
    """The check is not blind: a converted model whose output is scrambled or offset is a
    disagreement (reference ~40 dB vs float, damaged one < 10 dB), a changed shape a structure
    failure, an unchanged one passes."""
    model = Model(-1, CONV, ("conv",), (2, 3, 5, 5))
    assert check(model, "x86").kind == "ok"
    monkeypatch.setattr(fxquant, "convert_fx", _sabotaged(fxquant.convert_fx, damage))
    o = check(model, "x86")
    assert o.kind == kind, o.figures()
    if kind == "disagreement":
        assert o.sqnr_rf >= 30 and o.gap > fz.GAP_DB, o.figures()


def _noisy(f: torch.Tensor, db: float, seed: int) -> torch.Tensor:
    """``f`` plus independent noise at ``db`` SQNR."""
    noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(seed))
    return f + noise * f.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() * 10 ** (-db / 20)


@pytest.mark.parametrize("q_db,r_db,u_db,p_db,kind", [
    (38, 36, 40, 99, "ok"),                  # rounding on both sides
    (24, 36, 40, 99, "disagreement"),        # the converted model 12 dB worse
    (40, 25, 40, 99, "disagreement"),        # the reference 15 dB worse: a wrong reference
    (8, 12, 40, 99, "ok"),                   # both poor alike (a sensitive model)
    (36, 36, 15, 99, "dataflow"),            # quantization off, still far from float
    (36, 36, 40, 30, "prepared"),            # observers changed what the model computes
])
def test_judging_rules(q_db, r_db, u_db, p_db, kind) -> None:
    """The rules of the module docstring on synthetic outputs at given SQNRs vs float."""
    f = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    runs = fz.Runs(p=_noisy(f, p_db, 3), q=_noisy(f, q_db, 4), r=_noisy(f, r_db, 5),
                   u=_noisy(f, u_db, 6))
    o = Outcome(0, "x86")
    fz._judge(o, f, runs)
    assert o.kind == kind, o.figures()


def test_check_flags_a_prepared_model_that_is_not_float(monkeypatch) -> None:
    """Observers only: the prepared model computes float, or the check says ``prepared``."""
    prepare = fxquant.prepare_fx

    def negated_forward(*args: Any, **kw: Any) -> fx.GraphModule:
        gm = prepare(*args, **kw)
        forward = gm.forward
        gm.forward = lambda x: -forward(x)  # what a caller sees; convert reads the graph
        return gm

    monkeypatch.setattr(fxquant, "prepare_fx", negated_forward)
    o = check(Model(-1, CONV, ("conv",), (2, 3, 5, 5)), "x86")
    assert o.kind == "prepared" and o.sqnr_pf < 0, o.figures()


def test_check_flags_a_reference_graph_whose_data_flow_is_wrong(monkeypatch) -> None:
    """A reference graph that computes something else than float even with its quantization
    turned into copies is a ``dataflow`` failure (an op dropped or rerouted), told apart from
    rounding: the same graph, correct, is within 20 dB (weights' rounding only)."""
    model = Model(-1, CONV, ("conv",), (2, 3, 5, 5))
    assert check(model, "x86").sqnr_uf >= fz.DATAFLOW_DB
    monkeypatch.setattr(fxquant, "convert_to_reference_fx",
                        _sabotaged(fxquant.convert_to_reference_fx, torch.neg))
    o = check(model, "x86")
    assert o.kind == "dataflow" and o.sqnr_uf < 0, o.figures()


def test_unquantized_keeps_the_reference_data_flow() -> None:
    """Quantize and dequantize become clones: no quantized tensor is left, the values are float
    up to the weights' rounding, and an in-place write on a dequantized copy stays on a copy."""
    torch.backends.quantized.engine = "x86"
    model = fz.build(CONV)
    x = torch.randn(2, 3, 5, 5)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    reference = fxquant.convert_to_reference_fx(prepared)
    u = fz.unquantized(reference)
    targets = {n.target for n in u.graph.nodes}
    assert "dequantize" not in targets and torch.quantize_per_tensor not in targets
    assert sum(t == "clone" for t in targets) == 1  # a set: one name, several nodes
    assert sum(n.target == "clone" for n in u.graph.nodes) >= 3
    with torch.no_grad():
        assert fz.sqnr(model(x), u(x)) >= 30.0


def test_check_reports_exceptions_with_their_stage(monkeypatch) -> None:
    """Any exception is a failure whose kind names the stage and the exception class; a
    generated model that does not run in float is the generator's failure."""
    def boom(prepared: fx.GraphModule, **kw: Any) -> Any:
        raise KeyError("internal")

    model = Model(-1, CONV, ("conv",), (2, 3, 5, 5))
    monkeypatch.setattr(fxquant, "convert_to_reference_fx", boom)
    o = check(model, "x86")
    assert o.kind == "error:reference:KeyError" and "internal" in o.message
    bad = Model(-2, CONV, ("conv",), (2, 4, 5, 5))  # 4 channels into a 3-channel conv
    assert check(bad, "x86").kind == "generator"


def test_known_bugs_excuse_only_their_failure_kinds_backends_and_constructs(monkeypatch) -> None:
    """The excuse mechanism, on the three bugs this file knew (all fixed now, see KNOWN_OPEN's
    comment) as if they were still open."""
    opened = {
        "einsum": Known(_inplace_on_einsum, frozenset({"prepared", "dataflow"}), "einsum"),
        "avx2": Known(_fixed_qparams, frozenset({"disagreement"}), "avx2", frozenset({"x86"})),
        "scalar": Known(_scalar_op, frozenset({"disagreement"}), "scalar"),
    }
    monkeypatch.setattr(sys.modules[__name__], "KNOWN_OPEN", opened)

    def bug(kind: str, *used: str, backend: str = "x86") -> Optional[str]:
        return known_bug(Outcome(1, backend, kind=kind, used=used))

    assert bug("prepared", "einsum:torch.einsum('nchw->nchw', {a})", "relu:{x}.relu_()") == "einsum"
    assert bug("dataflow", "einsum:x", "add:iadd") == "einsum"
    assert bug("disagreement", "einsum:x", "relu:{x}.relu_()") is None
    assert bug("prepared", "einsum:x", "relu:F.relu({x})") is None
    assert bug("prepared", "relu:{x}.relu_()") is None
    assert bug("disagreement", "fixed:torch.sigmoid({x})") == "avx2"
    assert bug("disagreement", "mlp:torch.tanh") == "avx2"
    assert bug("disagreement", "fixed:torch.sigmoid({x})", backend="qnnpack") is None
    assert bug("error:run:RuntimeError", "fixed:torch.sigmoid({x})") is None
    assert bug("disagreement", "relu:F.relu({x})") is None
    assert bug("disagreement", "clamp:F.hardtanh({x}, -1.0, 1.0)") is None
    assert bug("disagreement", "add:{a} + 1.5") == "scalar"
    assert bug("disagreement", "mul:torch.mul({a}, 3.0)", backend="qnnpack") == "scalar"
    assert bug("disagreement", "add:{a} + {b}") is None and bug("disagreement", "add:iadd") is None
    assert bug("dataflow", "add:{a} + 1.5") is None


def _negated(out: Any) -> Any:
    return tuple(_negated(o) for o in out) if isinstance(out, tuple) else -out


def test_make_fuzz_summary_and_exit_status(monkeypatch, capsys) -> None:
    """``python -m tests.fuzz_models``: progress, a summary with counts and figures, exit 0;
    on a failure: exit 1 and a replay line for each failing seed."""
    assert fz.main(["--n", "2", "--seed", "0", "--backends", "x86", "--every", "1"]) == 0
    out = capsys.readouterr().out
    assert "[    1/2]" in out and "fuzz: 2 models x 1 backends (x86) = 2 checks" in out
    assert "x86: ok 2" in out and "failures: 0" in out and "worst |gap|" in out
    monkeypatch.setattr(fxquant, "convert_fx", _sabotaged(fxquant.convert_fx, _negated))
    assert fz.main(["--n", "1", "--seed", "0", "--backends", "x86"]) == 1
    out = capsys.readouterr().out
    assert "failures: 1" in out and "seed 0 [x86] disagreement" in out
    assert "replay: python -m tests.fuzz_models --replay 0 --backends x86 --shrink" in out
    assert fz.main(["--replay", "0", "--backends", "x86"]) == 1
    out = capsys.readouterr().out
    assert "class Generated(nn.Module)" in out and "[x86] disagreement" in out


# ------------------------------------------------------------------------------ what it found
# Minimal reproducers (shortest failing prefixes, then hand-shrunk) of each distinct bug the
# differential fuzz found in issue 9, as generated sources checked by the same ``check``. An
# open one names its bug and xfails (strict=False) while it fails; the figures in the comments
# were measured before the fixes (at 2658970).

def _source(init: str, body: str) -> str:
    init = "\n".join(f"        {ln}" for ln in init.splitlines()) or "        pass"
    body = "\n".join(f"        {ln}" for ln in body.splitlines())
    return (f"class Generated(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            f"{init}\n\n    def forward(self, x):\n{body}\n")


REPRODUCERS: dict[str, tuple[str, tuple[int, ...], str]] = {
    # seeds 169, 573: x86 and qnnpack, 36-38 dB reference vs 0.7 dB converted
    "interpolate_1x1": (_source("", "p = F.adaptive_avg_pool2d(x, 1)\n"
                                    "return F.interpolate(p, scale_factor=2, mode='nearest')"),
                        (2, 3, 5, 5), ""),  # fixed in 1dde5b4 (C)
    # seed 573: qnnpack's bilinear too: 40 dB vs 17 dB
    "interpolate_1x1_bilinear": (_source("", "p = F.adaptive_max_pool2d(x, 1)\n"
                                             "return F.interpolate(p, size=(5, 5), "
                                             "mode='bilinear', align_corners=False)"),
                                 (2, 3, 5, 5), ""),  # fixed in 1dde5b4 (C)
    # seeds 85, 109, 175: adaptive_avg_pool2d of a 1x1 tensor to (2, 1): 37 dB vs 2 dB
    "adaptive_pool_1x1_up": (_source("", "p = x.mean((2, 3), keepdim=True)\n"
                                         "return F.adaptive_avg_pool2d(p, (2, 1))"),
                             (2, 4, 2, 1), ""),  # fixed in 1dde5b4 (C)
    # C's report: ConvTranspose2d(8, 8, 2, stride=2) on x86: 33 dB vs -11 dB (qnnpack right)
    "convtranspose_k2s2": (_source("self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)",
                                   "return self.up(x)"),
                           (2, 8, 4, 4), ""),  # fixed in 1dde5b4 (C)
    # seeds 16, 205, 224, 273, ...: conv → [:, :] → relu_ → conv: the relu_ is dropped by
    # convert_fx (it writes a dequantized copy; the next conv reads the int8 tensor), the
    # reference keeps it: 32 dB vs 0.1 dB
    "inplace_on_view": (_source("self.c1 = nn.Conv2d(3, 3, 1)\nself.c2 = nn.Conv2d(3, 3, 1)",
                                "y = self.c1(x)[:, :]\ny.relu_()\nreturn self.c2(y)"),
                        (2, 3, 4, 4), ""),  # fixed in f31a05d (D)
    # seed 145: quantized::add_scalar derives its own zero point; stack / cat lowered as a
    # plain copy of inputs assumed to share qparams reads it with the other input's: 40 dB vs
    # 14 dB (max error 1.3 = 27 steps); D's ScalarOpIntoCat case
    "scalar_op_into_stack": (_source("", "return torch.stack([x + 1.5, x], 1).flatten(1, 2)"),
                             (2, 4, 5, 1), ""),  # fixed in f31a05d (D)
    "scalar_op_into_cat": (_source("", "return torch.cat([x + 1.5, x], 1)"),
                           (2, 4, 5, 1), ""),  # fixed in f31a05d (D)
    # seeds 51, 178 (dataflow, x86 and qnnpack): a transposed view written in place, read
    # through its base; r and q both lose the write: -4.7 dB, unquantized reference -4.7 dB
    "inplace_on_transposed_view": (_source("", "y = F.interpolate(x, size=(5, 5))\n"
                                               "t = y.transpose(2, 3)\nt.relu_()\n"
                                               "return y.mean((2, 3))"),
                                   (2, 2, 5, 5), ""),  # fixed in f31a05d (D)
    # seed 64 (dataflow): an in-place write to the graph input, read again afterwards:
    # 6.0 dB, unquantized reference 6.0 dB
    "inplace_on_input": (_source("", "y = x.add_(x)\nz = y.masked_fill(y < 0, 0.0)\n"
                                     "return torch.reshape(x, (2, -1))"),
                         (2, 4, 1, 5), ""),  # fixed in f31a05d (D)
    # seed 91 (prepared): torch.einsum('nchw->nchw') returns a view of its input; an in-place
    # relu on it changes the input, which prepare_fx does not keep: prepared vs float 0.0 dB
    "inplace_on_einsum_view": (_source("self.pool = nn.AdaptiveAvgPool2d((2, 1))",
                                       "v = torch.einsum('nchw->nchw', x)\nv.relu_()\n"
                                       "return self.pool(x).mean((2, 3))"),
                               (2, 1, 5, 2), ""),  # fixed: aliasing.view_source
    # seeds 1538, 1926 (make fuzz; both backends): the reference is the wrong one: it keeps
    # sigmoid's [0, 1) qparams for sigmoid(x) + 2 and clips (4.4 dB vs float), the converted
    # model is right (40 dB): |gap| 35.6 dB
    "scalar_add_after_sigmoid": (_source("", "return torch.add(torch.sigmoid(x), 2)"),
                                 (2, 3, 4, 5), ""),  # fixed: convert derives the kernel's qparams
    "scalar_mul_after_sigmoid": (_source("", "return torch.sigmoid(x) * 3.0"),
                                 (2, 3, 4, 5), ""),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(REPRODUCERS))
def test_fuzz_found(name: str, backend: str) -> None:
    source, shape, open_reason = REPRODUCERS[name]
    o = check(Model(-1, source, (name,), shape), backend)
    if o.failed and open_reason:
        pytest.xfail(f"{open_reason}: {o.kind}, {o.figures()}")
    assert not o.failed, f"{o.kind}: {o.message}\n{source}"
    assert o.sqnr_qf >= 20.0, o.figures()


# Found with fbgemm / onednn limited to AVX2 (FBGEMM_ENABLE_INSTRUCTIONS=AVX2
# ONEDNN_MAX_CPU_ISA=AVX2, as on an AMD AVX2-only CI machine), seeds 99 and 140 of the CI
# range: sigmoid / tanh / hardsigmoid have fixed qparams over the full 0..255 range, and the
# fbgemm linear / conv after them saturates its int16 sums (x86 backend; qnnpack is right).
AVX2_ENV = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_FC = "self.fc1 = nn.Linear(6, 8)\nself.fc2 = nn.Linear(8, 3)"
AVX2_REPRODUCERS: dict[str, tuple[str, tuple[int, ...]]] = {
    # 40 dB reference vs 23.8 dB converted
    "sigmoid_into_linear": (_source(_FC, "return self.fc2(torch.sigmoid(self.fc1(x)))"), (2, 6)),
    # 40 dB vs 10.1 dB
    "tanh_into_linear": (_source(_FC, "return self.fc2(torch.tanh(self.fc1(x)))"), (2, 6)),
    # 40 dB vs 28.9 dB
    "hardsigmoid_into_conv": (_source("self.conv = nn.Conv2d(4, 4, 3, padding=1)",
                                      "return self.conv(F.hardsigmoid(x))"), (2, 4, 6, 6)),
    # make fuzz seed 1654 (30.4 dB reference vs -2.4 dB): a 2-feature Linear after tanh and
    # ops sharing its qparams; uniform random check inputs rarely put both values of a pair
    # high, so the check also runs top-heavy inputs for full-range inputs
    "tanh_pool_into_small_linear": (_source(
        "self.m1 = nn.Tanh()\nself.m2 = nn.Linear(2, 3)",
        "v = self.m1(x.mean((2, 3), keepdim=True))\n"
        "return self.m2(F.adaptive_avg_pool2d(v, 1).flatten(1))"), (2, 2, 1, 1)),
    # make fuzz seed 845 (36.1 dB vs 13.1 dB): tanh -> split -> max_pool -> flatten -> Linear
    # (the check's walk to the producer's range went through split)
    "tanh_split_into_linear": (_source(
        "self.m1 = nn.Tanh()\nself.m2 = nn.MaxPool2d(3, 1, 1)\nself.m3 = nn.Linear(3, 9)",
        "v = self.m1(torch.cat([x, x], dim=-3)).split(1, dim=1)[0]\n"
        "return self.m3(torch.flatten(self.m2(v), 1))"), (2, 1, 3, 1)),
}


@pytest.mark.parametrize("name", sorted(AVX2_REPRODUCERS))
def test_fuzz_found_on_avx2(name: str) -> None:
    """In a fresh process with fbgemm and onednn limited to AVX2 (they read it at start)."""
    source, shape = AVX2_REPRODUCERS[name]
    code = ("import sys, warnings, torch; warnings.filterwarnings('ignore'); "
            "torch.set_num_threads(1); from tests.fuzz_models import Model, check; "
            f"o = check(Model(-1, sys.stdin.read(), (), {shape!r}), 'x86'); "
            "print(o.kind); print(o.figures())")
    res = subprocess.run([sys.executable, "-c", code], input=source, text=True,
                         capture_output=True, env={**os.environ, **AVX2_ENV}, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    kind, figures = res.stdout.strip().splitlines()[-2:]
    assert kind == "ok", f"{kind}: {figures}\n{source}"


# ------------------------------------------------------------------------------ issue 3's finds
# Found by issue 3's hypothesis fuzz (the generator this file's now lives in fuzz_models.py)
# and fixed in bd21993 (the qnnpack add probe after it): regression tests.

def assert_decisions_cover(gm: fx.GraphModule, stage: str, source: str) -> None:
    missing = fz.missing_decisions(gm)
    assert not missing, f"{stage}: no decision on {', '.join(missing)}\n{source}"


def _convert_and_run(model: nn.Module, x: torch.Tensor, backend: str = "x86"
                     ) -> tuple[fx.GraphModule, Any]:
    torch.backends.quantized.engine = backend
    prepared = fxquant.prepare_fx(model.eval(), fxquant.get_default_qconfig_mapping(backend),
                                  (x,), backend=backend)
    with torch.no_grad():
        prepared(x)
        converted = fxquant.convert_fx(prepared)
        return converted, converted(x)


class ReshapeInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.size(0), -1)


def test_fuzz_found_reshape_method_on_float_input():
    """Was: x.reshape on a tensor that is not int8 (the model input, a float op's output) made
    convert_fx raise 'ReuseInputObserver has no qparams of its own' (the reuse-input qconfig
    of 'reshape' with no observer upstream to reuse)."""
    x = torch.randn(2, 3, 4, 4)
    _, out = _convert_and_run(ReshapeInput(), x)
    assert out.shape == (2, 48)


class ReLU6Only(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x)


def test_fuzz_found_qnnpack_clamp_contiguous_has_no_decision():
    """Was: on qnnpack, the .contiguous() that lowering inserts before relu6 / hardtanh /
    clamp had no fxquant record, so a call_* node had no decision."""
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("qnnpack engine not built")
    converted, _ = _convert_and_run(ReLU6Only(), torch.randn(2, 3, 4, 4), "qnnpack")
    assert_decisions_cover(converted, "converted", "F.relu6(x) on qnnpack")


class ConvMean1x1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class BNMeanOneChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x).mean((2, 3))


@pytest.mark.parametrize("model,shape", [(ConvMean1x1, (2, 3, 1, 1)),
                                         (BNMeanOneChannel, (2, 1, 2, 4))],
                         ids=["conv-1x1", "bn-one-channel"])
def test_fuzz_found_mean_over_1x1_channels_last(model, shape):
    """Was: an int8 conv / BatchNorm2d / cat output with 1x1 spatial size or one channel →
    x.mean((2, 3)) raised 'required rank 4 tensor to use channels_last format' at run time on
    x86 (torch's quantized mean on strides that are both contiguous and channels-last;
    lowering probed on contiguous zeros)."""
    torch.manual_seed(0)
    m, x = model().eval(), torch.randn(*shape)
    _, out = _convert_and_run(m, x, "x86")
    assert out.shape == m(x).shape


class ModuleCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x))


def test_fuzz_found_module_called_twice():
    """Was: a module called twice made convert_fx raise 'reference Conv2d.from_float takes a
    float Conv2d, got Conv2d'."""
    torch.manual_seed(0)
    _, out = _convert_and_run(ModuleCalledTwice(), torch.randn(2, 4, 4, 4))
    assert out.shape == (2, 4, 4, 4)


class ConvReLU6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.conv(x))


def test_fuzz_found_unfolded_clamp_leaves_conv_without_decision():
    """Was: conv → relu6 on x86 with an output range past 6 lowered to the quantized conv +
    torch.clamp, and the new conv node had no fxquant record."""
    torch.manual_seed(0)
    converted, out = _convert_and_run(ConvReLU6(), torch.randn(2, 3, 4, 4) * 10, "x86")
    assert out.shape == (2, 4, 4, 4)
    assert_decisions_cover(converted, "converted", "conv → F.relu6 on x86, inputs * 10")


class AddToZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * -1.0


def test_fuzz_found_qnnpack_add_with_constant_output_raises():
    """Was: on qnnpack an add whose output is constant (x + x * -1.0, or a mean over the dims
    a layer_norm just normalized added to itself) raised at run time 'scale ratio must be in
    [2**-14, 2**8)': quantized::add was emitted without a probe with the real qparams."""
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("qnnpack engine not built")
    _, out = _convert_and_run(AddToZero(), torch.randn(2, 3, 4, 4), "qnnpack")
    assert out.shape == (2, 3, 4, 4)
