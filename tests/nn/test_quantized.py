"""fxquant.nn.quantized: bit-exact against torch.ao.nn.quantized, serialization, scripting."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.backends.cpu import full_range_activations_safe
from fxquant.backends.engine import engine, supported_engines
from fxquant.nn import fused, quantized as Q, reference as R
from fxquant.nn.common import WeightQParams
from tests.util import int16_pair_saturation_bound

warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")

ENGINES = [e for e in ("fbgemm", "x86", "qnnpack") if e in supported_engines()]
IN_SCALE, IN_ZP = 0.05, 100
REDUCED_SCALE, REDUCED_ZP = 2 * IN_SCALE, IN_ZP // 2  # reduce_range inputs: 0..127
OUT_SCALE, OUT_ZP = 0.07, 60


@dataclass(frozen=True)
class Case:
    """One quantized class: how to build its float module and input, and its torch twin."""

    cls: type[nn.Module]
    make_float: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    ao_name: str  # "nnq.X" or "nniq.X"
    weighted: bool = True
    transposed: bool = False

    @property
    def id(self) -> str:
        return self.cls.__name__


def _relu(inner: Callable[[], nn.Module], kind: type[nn.Module]) -> Callable[[], nn.Module]:
    return lambda: kind(inner(), nn.ReLU())


def _bn(kind: type[nn.BatchNorm2d]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        bn = kind(4)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        return bn.eval()
    return make


_lin = lambda: nn.Linear(8, 6)  # noqa: E731
_c1 = lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2)  # noqa: E731
_c2 = lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))  # noqa: E731
_c3 = lambda: nn.Conv3d(4, 6, 3, padding=1, bias=False)  # noqa: E731
_t1 = lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1)  # noqa: E731
_t2 = lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0))  # noqa: E731
_t3 = lambda: nn.ConvTranspose3d(4, 6, 3, stride=2, output_padding=1)  # noqa: E731

CASES = [
    Case(Q.Linear, _lin, (3, 8), "nnq.Linear"),
    Case(Q.LinearReLU, _relu(_lin, fused.LinearReLU), (2, 3, 8), "nniq.LinearReLU"),
    Case(Q.Conv1d, _c1, (2, 4, 9), "nnq.Conv1d"),
    Case(Q.Conv2d, _c2, (2, 4, 7, 6), "nnq.Conv2d"),
    Case(Q.Conv3d, _c3, (1, 4, 4, 5, 4), "nnq.Conv3d"),
    Case(Q.ConvReLU1d, _relu(_c1, fused.ConvReLU1d), (2, 4, 9), "nniq.ConvReLU1d"),
    Case(Q.ConvReLU2d, _relu(_c2, fused.ConvReLU2d), (2, 4, 7, 6), "nniq.ConvReLU2d"),
    Case(Q.ConvReLU3d, _relu(_c3, fused.ConvReLU3d), (1, 4, 4, 5, 4), "nniq.ConvReLU3d"),
    Case(Q.ConvTranspose1d, _t1, (2, 4, 5), "nnq.ConvTranspose1d", transposed=True),
    Case(Q.ConvTranspose2d, _t2, (2, 4, 4, 5), "nnq.ConvTranspose2d", transposed=True),
    Case(Q.ConvTranspose3d, _t3, (1, 4, 3, 3, 3), "nnq.ConvTranspose3d", transposed=True),
    Case(Q.BatchNorm2d, _bn(nn.BatchNorm2d), (2, 4, 3, 3), "nnq.BatchNorm2d", weighted=False),
    Case(Q.BatchNorm3d, _bn(nn.BatchNorm3d), (2, 4, 2, 3, 3), "nnq.BatchNorm3d", weighted=False),
    Case(Q.BNReLU2d, _relu(_bn(nn.BatchNorm2d), fused.BNReLU2d), (2, 4, 3, 3), "nniq.BNReLU2d",
         weighted=False),
    Case(Q.BNReLU3d, _relu(_bn(nn.BatchNorm3d), fused.BNReLU3d), (2, 4, 2, 3, 3),
         "nniq.BNReLU3d", weighted=False),
]
CASE_IDS = [c.id for c in CASES]
WEIGHTED = [c for c in CASES if c.weighted]


def available(case: Case, eng: str) -> bool:
    """qnnpack's conv_transpose3d is broken; fxquant refuses it (see its own test)."""
    return not (case.cls is Q.ConvTranspose3d and eng == "qnnpack")


def engine_cases(cases: list[Case], per_channel: bool = False) -> list:
    return [pytest.param(c, e, id=f"{c.id}-{e}") for c in cases for e in ENGINES
            if available(c, e) and (not per_channel or supports_per_channel(c, e))]


def _core(mod: nn.Module) -> nn.Module:
    return mod[0] if isinstance(mod, fused.FusedModule) else mod


def weight_qparams(w: torch.Tensor, per_channel: bool, axis: int = 0) -> WeightQParams:
    """Symmetric qint8 qparams from |w|'s max (per tensor or per channel)."""
    if not per_channel:
        return WeightQParams(w.detach().abs().max() / 127, 0, torch.qint8,
                             torch.per_tensor_symmetric)
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims).clamp_min(1e-6)
    return WeightQParams(amax / 127, torch.zeros_like(amax, dtype=torch.long), torch.qint8,
                         torch.per_channel_symmetric, ch_axis=axis)


def qinput(shape: tuple[int, ...], seed: int = 1, reduced: bool = False) -> torch.Tensor:
    """randn * 2 on the full 0..255 grid (IN_SCALE, IN_ZP), or with ``reduced`` on the
    reduce_range grid 0..127 (twice the step, half the zero point; the top clamped)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    if not reduced:
        return torch.quantize_per_tensor(x, IN_SCALE, IN_ZP, torch.quint8)
    x = x.clamp(max=(127 - REDUCED_ZP) * REDUCED_SCALE)
    return torch.quantize_per_tensor(x, REDUCED_SCALE, REDUCED_ZP, torch.quint8)


def build(case: Case, per_channel: bool = False, seed: int = 0
          ) -> tuple[nn.Module, WeightQParams | None, nn.Module]:
    """(float module, weight qparams, our quantized module) under the current engine."""
    torch.manual_seed(seed)
    fmod = case.make_float()
    wq = None
    if case.weighted:
        wq = weight_qparams(_core(fmod).weight, per_channel, 1 if case.transposed else 0)
    return fmod, wq, case.cls.from_float(fmod, wq, OUT_SCALE, OUT_ZP)


def supports_per_channel(case: Case, eng: str) -> bool:
    return not case.transposed or eng == "qnnpack"


def ints(t: torch.Tensor) -> torch.Tensor:
    return t.int_repr()


# ---------------------------------------------------------------------------------------------
# the torch.ao oracle


@pytest.fixture(scope="module")
def ao():
    pytest.importorskip("torch.ao.quantization")
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.reference as nnqr
    return {"nnq": nnq, "nniq": nniq, "nnqr": nnqr}


def ao_module(ao: dict, case: Case, fmod: nn.Module, wq: WeightQParams | None) -> nn.Module:
    """torch.ao.nn.quantized twin, built through torch's reference-module path."""
    space, name = case.ao_name.split(".")
    cls = getattr(ao[space], name)
    core = _core(fmod)
    if not case.weighted:
        ref = [core] if space == "nniq" else core
        # torch's quantized BatchNorm keeps scale / zero_point as tensor buffers
        return cls.from_reference(ref, torch.tensor(OUT_SCALE), torch.tensor(OUT_ZP))
    qparams = {"qscheme": wq.affine_qscheme, "dtype": wq.dtype, "scale": wq.scale,
               "zero_point": wq.zero_point, "axis": wq.ch_axis}
    ref_cls = getattr(ao["nnqr"], type(core).__name__)
    ref = ref_cls.from_float(core, qparams)
    return cls.from_reference([ref] if space == "nniq" else ref, OUT_SCALE, OUT_ZP)


@pytest.mark.parametrize("case,eng", engine_cases(CASES))
def test_bit_exact_with_torch_ao_per_tensor(ao, case: Case, eng: str) -> None:
    with engine(eng):
        fmod, wq, ours = build(case)
        with engine(getattr(ours, "packed_engine", eng)):  # x86 ConvTranspose: fbgemm
            theirs = ao_module(ao, case, fmod, wq)
        x = qinput(case.input_shape)
        out = ours(x)
        assert out.dtype == torch.quint8
        assert (out.q_scale(), out.q_zero_point()) == (OUT_SCALE, OUT_ZP)
        assert torch.equal(ints(out), ints(theirs(x)))
        assert ints(out).float().std() > 0  # not a constant (e.g. all-zero) output


@pytest.mark.parametrize("case,eng", engine_cases(WEIGHTED, per_channel=True))
def test_bit_exact_with_torch_ao_per_channel(ao, case: Case, eng: str) -> None:
    # per-channel transposed convs off qnnpack: see the refusal test below
    with engine(eng):
        fmod, wq, ours = build(case, per_channel=True)
        assert ours.weight().qscheme() == torch.per_channel_affine
        assert ours.packed_engine == eng
        theirs = ao_module(ao, case, fmod, wq)
        x = qinput(case.input_shape)
        assert torch.equal(ints(ours(x)), ints(theirs(x)))


@pytest.mark.parametrize("eng", [e for e in ENGINES if e != "qnnpack"])
@pytest.mark.parametrize("cls", [Q.ConvTranspose1d, Q.ConvTranspose2d, Q.ConvTranspose3d])
def test_per_channel_transposed_conv_is_refused_off_qnnpack(cls, eng: str) -> None:
    case = next(c for c in CASES if c.cls is cls)
    with engine(eng):
        fmod = case.make_float()
        wq = weight_qparams(fmod.weight, per_channel=True, axis=1)
        with pytest.raises(NotImplementedError, match=f"per-channel.*transposed.*'{eng}'"):
            cls.from_float(fmod, wq, OUT_SCALE, OUT_ZP)


def test_conv_transpose3d_is_refused_on_qnnpack() -> None:
    if "qnnpack" not in ENGINES:
        pytest.skip("qnnpack engine not built")
    with engine("qnnpack"):
        fmod = _t3()
        with pytest.raises(NotImplementedError, match="ConvTranspose3d.*'qnnpack'.*fbgemm"):
            Q.ConvTranspose3d.from_float(fmod, weight_qparams(fmod.weight, False), 0.1, 0)


@pytest.mark.parametrize("eng", [e for e in ("x86", "onednn") if e in supported_engines()])
def test_transposed_conv_packs_with_fbgemm_where_onednn_deconv_would_run(eng: str) -> None:
    with engine(eng):
        conv = nn.ConvTranspose2d(4, 6, 3, stride=2)
        ours = Q.ConvTranspose2d.from_float(conv, weight_qparams(conv.weight, False), 0.1, 128)
        assert ours.packed_engine == "fbgemm"
        assert torch.backends.quantized.engine == eng  # the caller's engine is untouched
        plain = Q.Conv2d(4, 6, 3)
        assert plain.packed_engine == eng


# ---------------------------------------------------------------------------------------------
# agreement with the reference modules (float compute on fake-quantized weights)


@pytest.mark.parametrize("act_range", ["reduced", "full"])
@pytest.mark.parametrize("case,eng", engine_cases(WEIGHTED))
def test_from_reference_equals_from_float_and_tracks_reference_numerics(case: Case, eng: str,
                                                                        act_range: str) -> None:
    """Integer requantization vs float rounding: at most one output step apart. With full-range
    (0..255) activations on fbgemm / x86 / onednn that holds only where the kernels accumulate
    in int32 (VNNI): without it the int16 pair sums saturate, and each output may be off by
    at most the saturation bound of its products more (see tests.util)."""
    with engine(eng):
        fmod, wq, ours = build(case)
        ref = getattr(R, type(_core(fmod)).__name__).from_float(_core(fmod), wq)
        lowered = case.cls.from_reference(ref, OUT_SCALE, OUT_ZP)
        x = qinput(case.input_shape, reduced=act_range == "reduced")
        assert int(ints(x).max()) <= (127 if act_range == "reduced" else 255)
        assert torch.equal(ints(lowered(x)), ints(ours(x)))
        if isinstance(fmod, fused.FusedModule):  # the container form: (reference, ReLU)
            fmod[0] = ref
            from_container = case.cls.from_reference(fmod, OUT_SCALE, OUT_ZP)
            assert torch.equal(ints(from_container(x)), ints(ours(x)))
        expected = ref(x.dequantize())
        if isinstance(fmod, fused.FusedModule):
            expected = F.relu(expected)
        expected = torch.quantize_per_tensor(expected, OUT_SCALE, OUT_ZP, torch.quint8)
        diff = (ints(ours(x)).int() - ints(expected).int()).abs()
        allowed = torch.ones_like(diff, dtype=torch.float)
        if act_range == "full" and not full_range_activations_safe(
                getattr(ours, "packed_engine", eng)):
            allowed += saturation_steps(_core(fmod), wq, x)
        assert (diff <= allowed).all(), f"max diff {int(diff.max())}, allowed {allowed.max()}"


def saturation_steps(core: nn.Module, wq: WeightQParams, x: torch.Tensor) -> torch.Tensor:
    """The int16 pair-saturation bound of each output, in output steps (per-tensor weights)."""
    bound = int16_pair_saturation_bound(core, ints(x), ints(wq.quantize(core.weight)),
                                        x.q_zero_point())
    return bound * x.q_scale() * float(wq.scale) / OUT_SCALE


# ---------------------------------------------------------------------------------------------
# accessors and repr


@pytest.mark.parametrize("case", WEIGHTED, ids=[c.id for c in WEIGHTED])
def test_weight_and_bias_accessors_unpack(case: Case) -> None:
    with engine("fbgemm"):
        fmod, wq, ours = build(case, per_channel=not case.transposed)
        core = _core(fmod)
        w = ours.weight()
        assert torch.equal(ints(w), ints(wq.quantize(core.weight)))
        assert w.qscheme() == wq.affine_qscheme
        if core.bias is None:
            assert ours.bias() is None
        else:
            assert torch.equal(ours.bias(), core.bias.detach())


@pytest.mark.parametrize("eng", ENGINES)
def test_bias_false_reports_none_on_every_engine(eng: str) -> None:
    # qnnpack's unpack hands back zeros for a missing bias; the module still says None
    with engine(eng):
        lin = nn.Linear(4, 3, bias=False)
        ours = Q.Linear.from_float(lin, weight_qparams(lin.weight, False), 0.1, 0)
        assert ours.bias() is None
        assert "bias=False" in repr(ours)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_repr_names_the_shape_and_qparams(case: Case) -> None:
    with engine("fbgemm"):
        fmod, _, ours = build(case, per_channel=case.weighted and not case.transposed)
        text = repr(ours)
        assert text.startswith("Quantized" + case.cls.__name__ + "(")
        assert f"scale={OUT_SCALE}" in text and f"zero_point={OUT_ZP}" in text
        assert "_packed_params" not in text
        core = _core(fmod)
        if isinstance(core, nn.Linear):
            assert "in_features=8, out_features=6" in text
        elif case.weighted:
            assert text.startswith(f"Quantized{case.cls.__name__}(4, 6, kernel_size=")
            assert f"stride={core.stride}" in text
        if case.weighted:
            scheme = "per_tensor_affine" if case.transposed else "per_channel_affine"
            assert "dtype=torch.qint8" in text and f"qscheme=torch.{scheme}" in text


def test_conv_repr_lists_non_default_geometry() -> None:
    with engine("fbgemm"):
        conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False,
                         padding_mode="reflect")
        text = repr(Q.Conv2d.from_float(conv, weight_qparams(conv.weight, False), 0.1, 3))
        for part in ("padding=(2, 2)", "dilation=(2, 2)", "groups=2", "bias=False",
                     "padding_mode='reflect'"):
            assert part in text
        convt = nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1)
        qt = Q.ConvTranspose2d.from_float(convt, weight_qparams(convt.weight, False), 0.1, 3)
        assert "output_padding=(1, 1)" in repr(qt)


# ---------------------------------------------------------------------------------------------
# serialization


def fresh(case: Case) -> nn.Module:
    """A module of the same shape built by its constructor (default weights, qparams)."""
    core = _core(case.make_float())
    if not case.weighted:
        return case.cls(core.num_features)
    return case.cls._empty_like(core)


@pytest.mark.parametrize("case,eng", engine_cases(CASES))
def test_state_dict_round_trip(case: Case, eng: str) -> None:
    with engine(eng):
        _, _, ours = build(case, per_channel=case.weighted and supports_per_channel(case, eng))
        sd = ours.state_dict()
        assert {"scale", "zero_point"} <= set(sd)
        if case.weighted:
            assert {"weight", "bias"} <= set(sd) and sd["weight"].is_quantized
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        other = fresh(case)
        x = qinput(case.input_shape)
        assert not torch.equal(ints(other(x)), ints(ours(x)))
        other.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(ints(other(x)), ints(ours(x)))
        assert repr(other) == repr(ours)


def test_load_state_dict_reports_missing_and_wrong_shapes() -> None:
    with engine("fbgemm"):
        lin = nn.Linear(8, 6)
        ours = Q.Linear.from_float(lin, weight_qparams(lin.weight, False), 0.1, 3)
        sd = ours.state_dict()
        del sd["scale"]
        with pytest.raises(RuntimeError, match="Missing key.*scale"):
            Q.Linear(8, 6).load_state_dict(sd)
        with pytest.raises(RuntimeError, match=r"weight must have shape \[6, 7\]"):
            Q.Linear(7, 6).load_state_dict(ours.state_dict())


@pytest.mark.parametrize("case,eng", engine_cases(CASES))
def test_torch_save_load_module_and_graph_module(case: Case, eng: str) -> None:
    with engine(eng):
        _, _, ours = build(case)
        gm = graph_module(ours)
        x = qinput(case.input_shape)
        xf = x.dequantize()
        for obj, arg in ((ours, x), (gm, xf), (copy.deepcopy(ours), x)):
            loaded = roundtrip(obj)
            assert type(loaded) is type(obj) or isinstance(loaded, fx.GraphModule)
            want = obj(arg)
            got = loaded(arg)
            assert torch.equal(got.int_repr() if got.is_quantized else got,
                               want.int_repr() if want.is_quantized else want)


def roundtrip(obj: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def graph_module(qmod: nn.Module) -> fx.GraphModule:
    """float x -> quantize_per_tensor -> qmod -> dequantize, as a GraphModule."""
    root = nn.Module()
    root.qmod = qmod
    g = fx.Graph()
    x = g.placeholder("x")
    q = g.call_function(torch.quantize_per_tensor, (x, IN_SCALE, IN_ZP, torch.quint8))
    y = g.call_module("qmod", (q,))
    g.output(g.call_method("dequantize", (y,)))
    return fx.GraphModule(root, g)


def test_load_repacks_under_the_current_engine() -> None:
    case = next(c for c in CASES if c.cls is Q.ConvReLU2d)
    with engine("fbgemm"):
        _, _, ours = build(case, per_channel=True)
        assert ours.packed_engine == "fbgemm"
        blob = io.BytesIO()
        torch.save(ours, blob)
        sd = ours.state_dict()
    if "qnnpack" not in ENGINES:
        pytest.skip("qnnpack engine not built")
    with engine("qnnpack"):
        _, _, native = build(case, per_channel=True)
        blob.seek(0)
        loaded = torch.load(blob, weights_only=False)
        assert loaded.packed_engine == "qnnpack"
        other = fresh(case)
        other.load_state_dict(sd)
        assert other.packed_engine == "qnnpack"
        x = qinput(case.input_shape)
        assert torch.equal(ints(loaded(x)), ints(native(x)))
        assert torch.equal(ints(other(x)), ints(native(x)))


@pytest.mark.parametrize("case,eng", engine_cases(CASES))
def test_jit_script_module_and_graph_module(case: Case, eng: str) -> None:
    with engine(eng):
        _, _, ours = build(case)
        x = qinput(case.input_shape)
        scripted = torch.jit.script(ours)
        assert torch.equal(ints(scripted(x)), ints(ours(x)))
        gm = graph_module(ours)
        scripted_gm = torch.jit.script(gm)
        assert torch.equal(scripted_gm(x.dequantize()), gm(x.dequantize()))


def test_jit_save_load_of_scripted_graph_module() -> None:
    case = next(c for c in CASES if c.cls is Q.ConvReLU2d)
    with engine("fbgemm"):
        _, _, ours = build(case, per_channel=True)
        scripted = torch.jit.script(graph_module(ours))
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        xf = qinput(case.input_shape).dequantize()
        assert torch.equal(loaded(xf), scripted(xf))


# ---------------------------------------------------------------------------------------------
# what from_float / from_reference accept


@pytest.mark.parametrize("cls,fused_cls,plain", [
    (Q.LinearReLU, fused.LinearReLU, _lin),
    (Q.ConvReLU2d, fused.ConvReLU2d, _c2),
])
def test_relu_kinds_accept_fused_or_plain_float(cls, fused_cls, plain) -> None:
    with engine("fbgemm"):
        torch.manual_seed(0)
        inner = plain()
        wq = weight_qparams(inner.weight, False)
        a = cls.from_float(fused_cls(inner, nn.ReLU()), wq, OUT_SCALE, OUT_ZP)
        b = cls.from_float(inner, wq, OUT_SCALE, OUT_ZP)
        shape = (3, 8) if cls is Q.LinearReLU else (2, 4, 7, 6)
        x = qinput(shape)
        assert torch.equal(ints(a(x)), ints(b(x)))
        assert int(ints(a(x)).min()) >= OUT_ZP  # relu: nothing below zero


def test_from_float_rejects_what_it_cannot_lower() -> None:
    with engine("fbgemm"):
        conv, lin = _c2(), _lin()
        wq = weight_qparams(conv.weight, False)
        relu_conv = fused.ConvReLU2d(conv, nn.ReLU())
        with pytest.raises(TypeError, match="ConvReLU2d.*fused quantized class"):
            Q.Conv2d.from_float(relu_conv, wq, 0.1, 0)
        conv_bn = fused.ConvBn2d(conv, nn.BatchNorm2d(6))
        with pytest.raises(TypeError, match="fold_eval"):
            Q.ConvReLU2d.from_float(conv_bn, wq, 0.1, 0)
        with pytest.raises(TypeError, match="from_reference"):
            Q.Conv2d.from_float(R.Conv2d.from_float(conv, wq), wq, 0.1, 0)
        with pytest.raises(TypeError, match="takes Linear.*got Conv2d"):
            Q.Linear.from_float(conv, wq, 0.1, 0)
        with pytest.raises(TypeError, match="WeightQParams"):
            Q.Linear.from_float(lin, None, 0.1, 0)
        with pytest.raises(TypeError, match="from_reference takes a reference Linear"):
            Q.Linear.from_reference(lin, 0.1, 0)
        with pytest.raises(ValueError, match="output_zero_point must be in"):
            Q.Linear.from_float(lin, weight_qparams(lin.weight, False), 0.1, 300)
        with pytest.raises(ValueError, match="pass wq=None"):
            Q.BatchNorm2d.from_float(nn.BatchNorm2d(3).eval(), wq, 0.1, 0)


def test_weight_checks_name_the_fix() -> None:
    with engine("fbgemm"):
        lin = _lin()
        ours = Q.Linear(8, 6)
        wq8 = WeightQParams(0.01, 128, torch.quint8)
        with pytest.raises(ValueError, match="qint8 quantized weight.*quint8"):
            ours.set_weight_bias(wq8.quantize(lin.weight), None)
        with pytest.raises(ValueError, match=r"shape \[6, 8\]"):
            ours.set_weight_bias(WeightQParams(0.01, 0).quantize(lin.weight.t()), None)
        with pytest.raises(ValueError, match="ch_axis=0"):
            ours.set_weight_bias(weight_qparams(lin.weight, True, axis=1).quantize(lin.weight),
                                 None)


def test_quantized_input_dims_are_checked() -> None:
    with engine("fbgemm"):
        conv = Q.Conv2d(4, 6, 3)
        with pytest.raises(ValueError, match="4-D"):
            conv(qinput((4, 5, 5)))
        with pytest.raises(ValueError, match="5-D"):
            Q.BatchNorm3d(4)(qinput((1, 4, 3, 3)))


# ---------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("cls,dims", [(Q.Conv1d, 1), (Q.ConvReLU2d, 2), (Q.Conv3d, 3)])
def test_non_zero_padding_modes_pad_the_integers(cls, dims: int, mode: str) -> None:
    with engine("fbgemm"):
        float_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        conv = float_cls(3, 4, 3, padding=1, padding_mode=mode)
        wq = weight_qparams(conv.weight, True)
        ours = cls.from_float(conv, wq, OUT_SCALE, OUT_ZP)
        x = qinput((1, 3) + (5,) * dims)
        # oracle: pad the integer image ourselves, then an unpadded conv of the same kind
        padded_ints = F.pad(x.int_repr().float(), [1] * (2 * dims), mode=mode).to(torch.uint8)
        padded = torch._make_per_tensor_quantized_tensor(padded_ints, IN_SCALE, IN_ZP)
        plain = float_cls(3, 4, 3)
        plain.load_state_dict(conv.state_dict())
        want = cls.from_float(plain, wq, OUT_SCALE, OUT_ZP)(padded)
        assert torch.equal(ints(ours(x)), ints(want))


def test_padding_strings() -> None:
    with engine("fbgemm"):
        same = nn.Conv2d(3, 4, 3, padding="same")
        qsame = Q.Conv2d.from_float(same, weight_qparams(same.weight, False), 0.1, 0)
        assert qsame.padding == (1, 1)
        assert qsame(qinput((1, 3, 6, 6))).shape == (1, 4, 6, 6)
        valid = nn.Conv1d(3, 4, 3, padding="valid")
        assert Q.Conv1d.from_float(valid, weight_qparams(valid.weight, False), 0.1, 0).padding \
            == (0,)
        even = nn.Conv2d(3, 4, 2, padding="same")
        with pytest.raises(NotImplementedError, match="asymmetric padding"):
            Q.Conv2d.from_float(even, weight_qparams(even.weight, False), 0.1, 0)
        with pytest.raises(ValueError, match="only padding_mode='zeros'"):
            Q.ConvTranspose2d(3, 4, 3, padding_mode="reflect")
