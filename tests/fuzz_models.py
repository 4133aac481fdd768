"""Random small models and the differential check behind the fuzz test and ``make fuzz``.

The generator writes the *source code* of a small ``nn.Module`` from a seeded
``random.Random(seed)``: a model is a function of its seed (and of ``steps``, the most ops it
has), so every failure is reproduced by ``python -m tests.fuzz_models --replay SEED``. The
vocabulary covers quantized ops in their spellings (conv / linear modules and functionals,
conv-bn-relu blocks, ConvTranspose2d, every ReLU spelling, + / += / torch.add / add_, * /
torch.mul, broadcasting add and mul (with tensors and parameters), cat / concat, flatten / view
/ reshape / permute / transpose / contiguous, chunk / split / indexing, mean, pooling,
interpolate, the clamp family (relu6, hardtanh, clamp), sigmoid / tanh / softmax, hardswish,
gelu, layer_norm, dropout, MLP heads with BatchNorm1d), ops without a quantized kernel
(torch.sort, topk, einsum, a user's Python function on a leaf module, integer ops on shapes,
masks, integer indices), and the constructs of issue 9's silent-wrong list:
``ConvTranspose2d(k=2, s=2)``, upsampling an (N, C, 1, 1) tensor (interpolate, adaptive pool to
a larger size), in-place ops on views, and a cat fed through a pool into another cat. Every
tensor is 4-D NCHW (2-D in MLP heads) with a shape known while the model is written, so each
generated model runs in float.

The check (``check``), for one model and one backend, on random (not zero) data: prepare_fx →
calibrate on three batches → ``convert_fx`` (the converted model, q) and
``convert_to_reference_fx`` (fxquant's own reference graph, r: quantize / dequantize around
float ops) of the *same* prepared model → run q, r and the float model f on the first batch.
It fails on

* an exception anywhere in prepare / calibrate / convert / run (kind ``error``). The generator
  writes only models that run in float and trace, so no input is "genuinely unsupported": an
  FxQuantError counts too (its kind names the class, so it is told apart from internal errors);
* a converted output whose structure (tuple layout, shapes, dtypes) differs from float's
  (``structure``), or a ``call_*`` node without a decision (``decisions``);
* a prepared model (observers only) whose output is not float's: SQNR(f, prepared) < CAP_DB
  (``prepared``; a pass changed what the model computes);
* a reference graph whose *data flow* is wrong (``dataflow``): u is r with every quantize and
  dequantize turned into ``clone()`` (each makes a new tensor, as they do), so u computes in
  float along r's edges and only the weights stay quantized; SQNR(f, u) < DATAFLOW_DB = 20 dB
  means an op was dropped or rerouted (e.g. an in-place write that lands on a copy). Correct
  models gave >= 30.7 dB on the first 400 checks (weight rounding only), the bugs <= 19.9 dB;
  this catches what q and r share and a differential check cannot see;
* a disagreement (``disagreement``). With SQNR(s, a) = 10 log10(P / sum (s - a)^2) in dB over
  all floating outputs, P = max(sum s^2, n * FLOOR_RMS^2) (FLOOR_RMS = 1e-4: the models run on
  N(0, 1) data with O(1) weights, so an output whose RMS is below it is float rounding of an
  exact zero, e.g. the mean of a layer_norm's output, and its rounding is not a signal), each
  capped at CAP_DB = 40 dB (int8 rounding noise, half a step,
  on a Gaussian signal spanning the 8-bit range is ~43 dB, ~37 dB on x86's 7-bit reduce_range:
  two outputs both above 40 dB are both as good as int8 gets; without the cap, a reference
  that happens to be exact on a large constant offset makes a kernel that is correct to one
  step look 10 dB worse):

      gap      = SQNR(f, r) - SQNR(f, q)    converted vs float and reference vs float may be
                                            at most 10 dB apart: |gap| <= GAP_DB = 10 (the
                                            reference claims to compute what the backend
                                            does: a converted model 10 dB *better* than it
                                            means a wrong reference);
      SQNR(r, q) >= SQNR(f, r) - GAP_DB     converted vs reference may disagree at most 10 dB
                                            more than the reference disagrees with float.

  Where q and r carry independent noise of the size of r's own error, SQNR(r, q) is 3 dB below
  SQNR(f, r) and the gap is ~0; 10 dB is a noise amplitude ~3x the reference's (with r at the
  cap: q below 30 dB, an error of 1.3 steps RMS on every element of an 8-bit Gaussian-range
  signal, 0.7 with reduce_range), i.e. a wrong kernel or a dropped op, not rounding (a correct
  kernel differs from the reference by a rounding step on a few elements, not on all). The
  second condition also catches a wrong kernel whose error happens to cancel against float.
  Over ``make fuzz``'s 4000 checks the passing ones stayed within |gap| <= 8 dB.

Quantization bugs shared by q and r (a wrong observer or shared qparams) show in none of
these; ``low_float_sqnr`` lists models whose reference is below LOW_DB = 10 dB vs float, as
information (a random model can be legitimately sensitive: x**4, a mask or topk that flips on
one quantization step), for a person to look at.

The tests (tests/test_fuzz_models.py) run CI_MODELS seeds; ``make fuzz`` runs 2000 on x86 and
qnnpack and exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

N = 2  # batch size of every generated model
MAX_C, MAX_HW = 8, 8
STEPS = 6  # ops per model, at most (the head comes on top)
BACKENDS = ("x86", "qnnpack")
CAP_DB = 40.0
GAP_DB = 10.0
DATAFLOW_DB = 20.0
FLOOR_RMS = 1e-4
LOW_DB = 10.0
CI_MODELS = 200
FUSE_SUMS = [False]  # --fuse-sums: convert with fuse_sums=True (conv + residual add fused)
# --fuse-activations: convert with fuse_activations=True (conv + SiLU / hardswish fused)
FUSE_ACTS = [False]


class UserLeaf(nn.Module):
    """A user's Python function, kept as one opaque call (a leaf module): data-dependent
    control flow that torch.fx cannot trace."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if float(t.mean()) > 0:
            return t.flip(-1) * 0.5
        return torch.nan_to_num(t) + 0.25


# ------------------------------------------------------------------------------ the writer
@dataclass
class Var:
    name: str
    c: int
    h: int
    w: int
    contig: bool = True  # known to be contiguous in float (``.view`` is valid on it)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.c, self.h, self.w


@dataclass
class Writer:
    """Accumulates the source of ``__init__`` and ``forward`` while tracking every tensor's
    shape, so that each op is only written where it is valid. All choices come from ``rng``."""

    rng: random.Random
    init: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    vars: list[Var] = field(default_factory=list)
    used: list[str] = field(default_factory=list)  # "family:spelling" of every op written
    convs: list[tuple[str, int, int]] = field(default_factory=list)  # (attr, in, out) to reuse
    n_attr: int = 0

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def one(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]

    def coin(self) -> bool:
        return self.rng.random() < 0.5

    choose = one

    def pick(self, ok: Callable[[Var], bool] = lambda v: True) -> Optional[Var]:
        cands = [v for v in self.vars if ok(v)]
        if not cands:
            return None
        last = cands[-1]
        if len(cands) == 1 or self.int(0, 3) > 0:
            return last  # mostly a chain, sometimes a branch from an earlier tensor
        return self.one(cands)

    def attr(self, expr: str, prefix: str = "m") -> str:
        self.n_attr += 1
        name = f"{prefix}{self.n_attr}"
        self.init.append(f"self.{name} = {expr}")
        return f"self.{name}"

    def new(self, expr: str, c: int, h: int, w: int, contig: bool = False) -> Var:
        """A new tensor; ``contig``: known contiguous (conservative: False unless sure)."""
        v = Var(f"v{len(self.vars)}", c, h, w, contig)
        assert 1 <= c <= 2 * MAX_C and 1 <= h <= 2 * MAX_HW and 1 <= w <= 2 * MAX_HW, \
            (expr, c, h, w)
        self.body.append(f"{v.name} = {expr}")
        self.vars.append(v)
        return v

    def line(self, code: str) -> None:
        self.body.append(code)

    def source(self, outputs: str) -> str:
        init = "\n".join(f"        {ln}" for ln in self.init) or "        pass"
        body = "\n".join(f"        {ln}" for ln in self.body)
        return ("class Generated(nn.Module):\n    def __init__(self):\n"
                f"        super().__init__()\n"
                f"{init}\n\n    def forward(self, x):\n        v0 = x\n{body}\n"
                f"        return {outputs}\n")


# ------------------------------------------------------------------------------ vocabulary
# Each entry writes one op (in one of its spellings) on tensors picked by the writer, or
# returns False when no tensor suits it; it appends "family:spelling" to ``used``.

# returns False when no tensor suits it. Names are the vocabulary reported by ``event``.

def op_conv(g: Writer) -> bool:
    v = g.pick()
    co, k = g.int(2, 6), g.one([1, 3])
    bias = g.coin()
    spelling = g.choose(["module", "functional_kw", "functional_pos"])
    if spelling == "module":
        m = g.attr(f"nn.Conv2d({v.c}, {co}, {k}, padding={k // 2}, bias={bias})")
        g.convs.append((m, v.c, co))
        g.new(f"{m}({v.name})", co, v.h, v.w, v.contig)
    else:
        wname = g.attr(f"nn.Parameter(torch.randn({co}, {v.c}, {k}, {k}) * 0.3)", "p")
        b = g.attr(f"nn.Parameter(torch.randn({co}) * 0.1)", "p") if bias else "None"
        if spelling == "functional_kw":
            g.new(f"F.conv2d({v.name}, {wname}, {b}, padding={k // 2})", co, v.h, v.w, v.contig)
        else:
            g.new(f"F.conv2d({v.name}, {wname}, {b}, 1, {k // 2}, 1, 1)", co, v.h, v.w, v.contig)
    g.used.append(f"conv:{spelling}")
    return True


def op_conv_block(g: Writer) -> bool:
    """Fusion material: conv (strided / grouped / transposed) → BatchNorm2d → a ReLU
    spelling."""
    v = g.pick()
    kind = g.choose(["conv_bn", "conv_bn_relu", "conv_relu", "strided", "grouped", "transposed"])
    co = g.int(2, 6)
    h, w = v.h, v.w
    if kind == "strided" and v.h >= 2 and v.w >= 2:
        conv = f"nn.Conv2d({v.c}, {co}, 3, stride=2, padding=1)"
        h, w = (v.h + 1) // 2, (v.w + 1) // 2
    elif kind == "grouped" and v.c % 2 == 0:
        co = 2 * g.int(1, 3)
        conv = f"nn.Conv2d({v.c}, {co}, 3, padding=1, groups=2)"
    elif kind == "transposed" and 2 * v.h <= MAX_HW and 2 * v.w <= MAX_HW:
        conv = f"nn.ConvTranspose2d({v.c}, {co}, 2, stride=2)"
        h, w = 2 * v.h, 2 * v.w
    else:
        conv = f"nn.Conv2d({v.c}, {co}, 3, padding=1, bias=False)"
        kind = kind if kind.startswith("conv_") else "conv_bn"
    expr = f"{g.attr(conv)}({v.name})"
    if "bn" in kind:
        expr = f"{g.attr(f'nn.BatchNorm2d({co})')}({expr})"
    if "relu" in kind:
        s = g.choose(RELU_SPELLINGS)
        expr = f"{g.attr(s)}({expr})" if s.startswith("nn.") else s.format(x=expr)
    g.new(expr, co, h, w, v.contig)
    g.used.append(f"conv_block:{kind}")
    return True


def op_reuse(g: Writer) -> bool:
    """One conv module object called a second time (weight sharing)."""
    v = g.pick()
    mods = [m for m in g.convs if m[1] == v.c]
    if mods:
        attr, _, co = g.one(mods)
        g.new(f"{attr}({v.name})", co, v.h, v.w, v.contig)
    else:
        attr = g.attr(f"nn.Conv2d({v.c}, {v.c}, 1)")
        g.convs.append((attr, v.c, v.c))
        g.new(f"{attr}({attr}({v.name}))", v.c, v.h, v.w, v.contig)
    g.used.append("reuse")
    return True


def op_linear(g: Writer) -> bool:
    """nn.Linear / F.linear on the last dimension of a 4-D tensor."""
    v = g.pick()
    wo = g.int(2, 6)
    if g.coin():
        m = g.attr(f"nn.Linear({v.w}, {wo})")
        g.new(f"{m}({v.name})", v.c, v.h, wo, v.contig)
        g.used.append("linear:module")
    else:
        wname = g.attr(f"nn.Parameter(torch.randn({wo}, {v.w}) * 0.3)", "p")
        b = g.attr(f"nn.Parameter(torch.randn({wo}) * 0.1)", "p") if g.coin() \
            else "None"
        g.new(f"F.linear({v.name}, {wname}, {b})", v.c, v.h, wo, v.contig)
        g.used.append("linear:functional")
    return True


RELU_SPELLINGS = ["nn.ReLU()", "nn.ReLU(inplace=True)", "F.relu({x})", "F.relu({x}, inplace=True)",
                  "torch.relu({x})", "torch.relu_({x})", "{x}.relu()", "{x}.relu_()",
                  "F.relu_({x})"]


def op_relu(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(RELU_SPELLINGS)
    expr = f"{g.attr(s)}({v.name})" if s.startswith("nn.") else s.format(x=v.name)
    g.new(expr, *v.shape, v.contig)
    g.used.append(f"relu:{s}")
    return True


def _partner(g: Writer, v: Var) -> Var:
    same = [u for u in g.vars if u.shape == v.shape and u is not v]
    return g.one(same) if same and g.coin() else v


def op_add(g: Writer) -> bool:
    v = g.pick()
    u = _partner(g, v)
    s = g.choose(["{a} + {b}", "torch.add({a}, {b})", "{a}.add({b})", "{a}.add_({b})",
                  "iadd", "{a} + 1.5", "0.5 + {a}", "torch.add({a}, 2)"])
    if s == "iadd":
        g.line(f"{v.name} += {u.name}")
        g.new(v.name, *v.shape, v.contig)
    else:
        g.new(s.format(a=v.name, b=u.name), *v.shape, v.contig and u.contig)
    g.used.append(f"add:{s}")
    return True


def op_mul(g: Writer) -> bool:
    v = g.pick()
    u = _partner(g, v)
    s = g.choose(["{a} * {b}", "torch.mul({a}, {b})", "{a}.mul({b})", "{a}.mul_({b})",
                  "imul", "{a} * 0.5", "torch.mul({a}, 3.0)"])
    if s == "imul":
        g.line(f"{v.name} *= {u.name}")
        g.new(v.name, *v.shape, v.contig)
    else:
        g.new(s.format(a=v.name, b=u.name), *v.shape, v.contig and u.contig)
    g.used.append(f"mul:{s}")
    return True


def op_broadcast(g: Writer) -> bool:
    """Binary ops whose operands broadcast (squeeze-excite style)."""
    v = g.pick()
    s = g.choose(["torch.add({x}, {x}[:, :1])", "{x} * {x}.mean((2, 3), keepdim=True)",
                  "{x} * torch.sigmoid({x}.mean((2, 3), keepdim=True))",
                  "{x} + {x}.mean(1, keepdim=True)", "{x} * {x}[:, :, :1, :1]",
                  "{x} + {x}.mean(2, keepdim=True)", "{x} + {p}", "{x} * {p}",
                  "torch.mul({p}, {x})"])
    p = g.attr(f"nn.Parameter(torch.randn(1, {v.c}, 1, 1))", "p") if "{p}" in s else ""
    g.new(s.format(x=v.name, p=p), *v.shape, v.contig)
    g.used.append(f"broadcast:{s}")
    return True


def op_stack(g: Writer) -> bool:
    v = g.pick(lambda v: 2 * v.c <= MAX_C)
    if v is None:
        return False
    u = _partner(g, v)
    s = g.choose(["torch.stack([{a}, {b}], 1).flatten(1, 2)",
                  "torch.stack(({a}, {b}), dim=2).reshape({n}, {c2}, {h}, {w})",
                  "{a}.unsqueeze(1).squeeze(1)"])
    c = v.c if "unsqueeze" in s else 2 * v.c
    g.new(s.format(a=v.name, b=u.name, n=N, c2=2 * v.c, h=v.h, w=v.w), c, v.h, v.w)
    g.used.append(f"stack:{s}")
    return True


def op_cat(g: Writer) -> bool:
    v = g.pick(lambda v: v.c < MAX_C)
    if v is None:
        return False
    cands = [u for u in g.vars if (u.h, u.w) == (v.h, v.w) and u.c + v.c <= MAX_C]
    if not cands:
        return False
    u = g.one(cands)
    s = g.choose(["torch.cat([{a}, {b}], 1)", "torch.cat(({a}, {b}), dim=1)",
                  "torch.concat([{a}, {b}], dim=1)", "torch.cat([{a}, {b}], dim=-3)"])
    g.new(s.format(a=v.name, b=u.name), v.c + u.c, v.h, v.w, v.contig and u.contig)
    g.used.append(f"cat:{s}")
    return True


def op_flatten_roundtrip(g: Writer) -> bool:
    """A flatten spelling, then back to 4-D through a view/reshape whose sizes come from
    ``x.shape`` / ``x.size()`` (integer ops on shapes) or constants."""
    v = g.pick()
    options = ["torch.flatten({x}, 1)", "{x}.flatten(1)", "module", "torch.reshape({x}, ({n}, -1))",
               "{x}.reshape({n}, -1)"]
    s = g.choose(options + (["{x}.view({x}.size(0), -1)"] if v.contig else []))
    if s == "module":
        flat = f"{g.attr('nn.Flatten()')}({v.name})"
    else:
        flat = s.format(x=v.name, n=N)
    back = g.choose(["shape", "size", "const"])
    if back == "shape":
        g.line(f"n_, c_, h_, w_ = {v.name}.shape")
        sizes = "n_, c_, h_, w_"
    elif back == "size":
        sizes = f"{v.name}.size(0), {v.name}.size(1), {v.name}.size(2), {v.name}.size(-1)"
    else:
        sizes = f"{N}, {v.c}, {v.h}, {v.w}"
    method = g.choose(["view", "reshape", "torch.reshape"])
    if method == "torch.reshape":
        g.new(f"torch.reshape({flat}, ({sizes}))", *v.shape, True)
    else:
        g.new(f"{flat}.{method}({sizes})", *v.shape, True)
    g.used.append(f"flatten_roundtrip:{s}->{method}:{back}")
    return True


def op_permute(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(["permute", "transpose", "torch.transpose", "contiguous", "permute_contiguous"])
    if s == "permute":
        g.new(f"{v.name}.permute(0, 1, 3, 2)", v.c, v.w, v.h)
    elif s == "transpose":
        g.new(f"{v.name}.transpose(2, 3)", v.c, v.w, v.h)
    elif s == "torch.transpose":
        g.new(f"torch.transpose({v.name}, 1, 2)", v.h, v.c, v.w)
    elif s == "contiguous":
        g.new(f"{v.name}.contiguous()", *v.shape, True)
    else:
        g.new(f"{v.name}.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)", *v.shape)
    g.used.append(f"permute:{s}")
    return True


def op_split(g: Writer) -> bool:
    v = g.pick(lambda v: v.c >= 2)
    if v is None:
        return False
    s = g.choose(["chunk", "torch.chunk", "split", "torch.split", "unpack_cat"])
    half = v.c // 2
    if s == "chunk":
        g.new(f"{v.name}.chunk(2, dim=1)[1]", v.c - (v.c + 1) // 2, v.h, v.w)
    elif s == "torch.chunk":
        g.new(f"torch.chunk({v.name}, 2, 1)[0]", (v.c + 1) // 2, v.h, v.w)
    elif s == "split":
        g.new(f"{v.name}.split({half}, dim=1)[0]", half, v.h, v.w)
    elif s == "torch.split":
        g.new(f"torch.split({v.name}, [{half}, {v.c - half}], 1)[1]", v.c - half, v.h, v.w)
    else:
        g.line(f"a_, b_ = {v.name}.split([{half}, {v.c - half}], dim=1)")
        g.new("torch.cat([b_, a_], 1)", *v.shape)
    g.used.append(f"split:{s}")
    return True


def op_index(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(["channels", "rows", "stride", "ellipsis", "tensor_index", "size_slice"])
    if s == "channels" and v.c >= 2:
        k = g.int(1, v.c - 1)
        g.new(f"{v.name}[:, :{k}]", k, v.h, v.w)
    elif s == "rows" and v.h >= 2:
        g.new(f"{v.name}[:, :, 1:]", v.c, v.h - 1, v.w)
    elif s == "stride":
        g.new(f"{v.name}[..., ::2]", v.c, v.h, (v.w + 1) // 2)
    elif s == "tensor_index":  # an integer tensor as index
        g.line(f"idx_ = torch.arange({v.name}.size(1) - 1, -1, -1)")
        g.new(f"{v.name}[:, idx_]", *v.shape)
    elif s == "size_slice" and v.c >= 2:  # slice bound computed from the shape
        g.new(f"{v.name}[:, : {v.name}.size(1) // 2]", v.c // 2, v.h, v.w)
    else:
        g.new(f"{v.name}[:, :, :, :]", *v.shape, v.contig)
        s = "full"
    g.used.append(f"index:{s}")
    return True


MEANS = {"{x}.mean((2, 3), keepdim=True)": {2, 3},
         "torch.mean({x}, dim=[2, 3], keepdim=True)": {2, 3},
         "{x}.mean(1, keepdim=True)": {1}, "{x}.mean(-1, keepdim=True)": {3}}


def op_mean(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(sorted(MEANS))
    dims = MEANS[s]
    shape = tuple(1 if d in dims else n for d, n in zip((1, 2, 3), v.shape))
    g.new(s.format(x=v.name), *shape, v.contig)
    g.used.append(f"mean:{s}")
    return True


def op_pool(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(["nn.MaxPool2d(2)", "F.max_pool2d({x}, 2)", "nn.AvgPool2d(2)",
                  "F.avg_pool2d({x}, 2)", "nn.MaxPool2d(3, 1, 1)", "nn.AdaptiveAvgPool2d(1)",
                  "F.adaptive_avg_pool2d({x}, (2, 2))", "nn.AdaptiveAvgPool2d((2, 1))"])
    halves = "2)" in s and "Adaptive" not in s and "adaptive" not in s and "(3, 1, 1)" not in s
    if halves and (v.h < 2 or v.w < 2):
        s = "nn.MaxPool2d(3, 1, 1)"
        halves = False
    expr = f"{g.attr(s)}({v.name})" if s.startswith("nn.") else s.format(x=v.name)
    if halves:
        shape = (v.c, v.h // 2, v.w // 2)
    elif "AdaptiveAvgPool2d(1)" in s:
        shape = (v.c, 1, 1)
    elif "(2, 2)" in s:
        shape = (v.c, 2, 2)
    elif "(2, 1)" in s:
        shape = (v.c, 2, 1)
    else:
        shape = v.shape
    g.new(expr, *shape, v.contig)
    g.used.append(f"pool:{s}")
    if (v.h, v.w) == (1, 1) and shape[1:] != (1, 1):
        g.used.append("upsample_1x1:adaptive_avg_pool2d")
    return True


def _unary(options: list[str], family: str) -> Callable[[Writer], bool]:
    def op(g: Writer) -> bool:
        v = g.pick()
        s = g.choose(options)
        expr = f"{g.attr(s)}({v.name})" if s.startswith("nn.") else s.format(x=v.name, w=v.w,
                                                                          h=v.h, c=v.c)
        g.new(expr, *v.shape, v.contig)
        g.used.append(f"{family}:{s}")
        return True
    op.__name__ = f"op_{family}"
    return op


CLAMP_SPELLINGS = ["nn.ReLU6()", "F.relu6({x})", "F.hardtanh({x}, -1.0, 1.0)",
                   "nn.Hardtanh(0.0, 6.0)", "torch.clamp({x}, -0.5, 0.5)", "{x}.clamp(min=0.0)",
                   "{x}.clamp(0.0, 1.0)", "torch.clip({x}, -1.0, 1.0)"]


def op_clamp(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(CLAMP_SPELLINGS)
    g.new(f"{g.attr(s)}({v.name})" if s.startswith("nn.") else s.format(x=v.name), *v.shape,
          v.contig)
    g.used.append(f"clamp:{s}")
    return True


op_fixed = _unary(["torch.sigmoid({x})", "{x}.sigmoid()", "nn.Sigmoid()", "torch.tanh({x})",
                   "nn.Tanh()", "F.softmax({x}, dim=1)", "{x}.softmax(-1)", "nn.Softmax(dim=1)",
                   "F.hardsigmoid({x})"], "fixed")
op_act = _unary(["F.hardswish({x})", "nn.Hardswish()", "F.gelu({x})", "nn.GELU()",
                 "F.leaky_relu({x}, 0.1)", "nn.ELU()", "F.silu({x})"], "activation")
op_dropout = _unary(["nn.Dropout(0.3)", "F.dropout({x}, 0.2, training=False)",
                     "nn.Dropout2d(0.1)", "nn.Identity()"], "dropout")


def _fmt_module(s: str, v: Var) -> str:
    return s.format(x=v.name, w=v.w, h=v.h, c=v.c)


def op_norm(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(["F.layer_norm({x}, ({w},))", "F.layer_norm({x}, ({h}, {w}))",
                  "nn.LayerNorm({w})", "nn.LayerNorm([{h}, {w}])", "nn.BatchNorm2d({c})",
                  "nn.GroupNorm(1, {c})", "F.instance_norm({x})"])
    if "instance" in s and v.h * v.w < 2:
        s = "nn.GroupNorm(1, {c})"  # instance norm needs more than one spatial element
    text = _fmt_module(s, v)
    g.new(f"{g.attr(text)}({v.name})" if s.startswith("nn.") else text, *v.shape, v.contig)
    g.used.append(f"norm:{s}")
    return True


def op_interpolate(g: Writer) -> bool:
    v = g.pick()
    if v.h * 2 <= MAX_HW and v.w * 2 <= MAX_HW:
        s = g.choose(["F.interpolate({x}, scale_factor=2, mode='nearest')",
                      "nn.Upsample(scale_factor=2)",
                      "F.interpolate({x}, scale_factor=2.0, mode='bilinear', align_corners=False)"])
        shape = (v.c, v.h * 2, v.w * 2)
    else:
        s = "F.interpolate({x}, size=({h}, {w}), mode='nearest')"
        shape = v.shape
    expr = f"{g.attr(s)}({v.name})" if s.startswith("nn.") else _fmt_module(s, v)
    g.new(expr, *shape, v.contig)
    g.used.append(f"interpolate:{s}")
    if (v.h, v.w) == (1, 1) and shape != v.shape:
        g.used.append("upsample_1x1:interpolate")
    return True


def op_pad(g: Writer) -> bool:
    v = g.pick(lambda v: v.h + 2 <= MAX_HW and v.w + 2 <= MAX_HW)
    if v is None:
        return False
    g.new(f"F.pad({v.name}, (1, 1, 1, 1))", v.c, v.h + 2, v.w + 2, v.contig)
    g.used.append("pad")
    return True


def op_matmul(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(["torch.matmul({x}, {x}.transpose(2, 3))", "{x} @ {x}.transpose(-1, -2)"])
    g.new(s.format(x=v.name), v.c, v.h, v.h, v.contig)
    g.used.append(f"matmul:{s}")
    return True


# --- no quantized kernel: stay float, with a reason
def op_sort(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(["torch.sort({x}, dim=1)[0]", "{x}.sort(dim=-1).values", "gather"])
    if s == "gather":
        g.line(f"vals_, idx_ = torch.sort({v.name}, dim=1)")
        g.new(f"torch.gather({v.name}, 1, idx_) + vals_", *v.shape, v.contig)
    else:
        g.new(s.format(x=v.name), *v.shape, v.contig)
    g.used.append(f"sort:{s}")
    return True


def op_topk(g: Writer) -> bool:
    v = g.pick()
    k = g.int(1, v.c)
    if g.coin():
        g.new(f"torch.topk({v.name}, {k}, dim=1).values", k, v.h, v.w, v.contig)
    else:
        g.new(f"{v.name}.topk({k}, 1)[0]", k, v.h, v.w, v.contig)
    g.used.append("topk")
    return True


def op_einsum(g: Writer) -> bool:
    v = g.pick()
    u = _partner(g, v)
    s = g.choose(["torch.einsum('nchw,nchw->nchw', {a}, {b})", "torch.einsum('nchw->nchw', {a})"])
    g.new(s.format(a=v.name, b=u.name), *v.shape, v.contig and u.contig)
    g.used.append(f"einsum:{s}")
    return True


def op_user_leaf(g: Writer) -> bool:
    v = g.pick()
    g.new(f"{g.attr('UserLeaf()')}({v.name})", *v.shape, v.contig)
    g.used.append("user_leaf")
    return True


def op_mask(g: Writer) -> bool:
    v = g.pick()
    s = g.choose(["torch.where({x} > 0, {x}, {x} * 0.1)", "{x}.masked_fill({x} < 0, 0.0)",
                  "({x} > 0).float() * {x}", "argmax"])
    if s == "argmax":  # integer indices next to the float tensor
        g.line(f"am_ = torch.argmax({v.name}, dim=1, keepdim=True)")
        g.new(f"torch.gather({v.name}, 1, am_).expand({N}, {v.c}, {v.h}, {v.w}) + {v.name}",
              *v.shape)
    else:
        g.new(s.format(x=v.name), *v.shape, v.contig)
    g.used.append(f"mask:{s}")
    return True


def op_shape_arith(g: Writer) -> bool:
    """Integer ops on shapes feeding a float op."""
    v = g.pick()
    s = g.choose(["scale", "reshape", "numel"])
    if s == "scale":
        g.new(f"{v.name} * ({v.name}.size(1) / {v.name}.shape[2])", *v.shape, v.contig)
    elif s == "reshape":
        g.line(f"n_, c_, h_, w_ = {v.name}.size()")
        g.new(f"{v.name}.reshape(n_, c_ * h_, w_).reshape(n_, c_, h_, w_)", *v.shape, True)
    else:
        g.new(f"{v.name} / ({v.name}.numel() // {v.name}.size(0))", *v.shape, v.contig)
    g.used.append(f"shape_arith:{s}")
    return True




# --- issue 9's silent-wrong constructs, and more of the same kind
def op_convtranspose(g: Writer) -> bool:
    """nn.ConvTranspose2d: k=2 s=2 (the U-Net upsampler), k=3 s=2 p=1 op=1, k=3 s=1 p=1,
    k=1; a third of them wide (8-16 channels in and out, after a 1x1 conv that widens: x86's
    k=2 s=2 kernel went wrong only from 8 in and 8 out); sometimes followed by BatchNorm2d
    and / or a ReLU spelling."""
    v = g.pick()
    wide = g.int(0, 2) == 0
    if wide and v.c < 8:
        ci = g.one([8, 12, 16])
        v = g.new(f"{g.attr(f'nn.Conv2d({v.c}, {ci}, 1)')}({v.name})", ci, v.h, v.w, v.contig)
    co, bias = g.one([8, 12, 16]) if wide else g.int(2, 6), g.coin()
    kind = g.one(["k2s2", "k3s2", "k3s1", "k1s1"])
    if kind in ("k2s2", "k3s2") and (2 * v.h > 2 * MAX_HW or 2 * v.w > 2 * MAX_HW):
        kind = "k3s1"
    args = {"k2s2": "2, stride=2", "k3s2": "3, stride=2, padding=1, output_padding=1",
            "k3s1": "3, padding=1", "k1s1": "1"}[kind]
    h, w = (2 * v.h, 2 * v.w) if kind in ("k2s2", "k3s2") else (v.h, v.w)
    expr = f"{g.attr(f'nn.ConvTranspose2d({v.c}, {co}, {args}, bias={bias})')}({v.name})"
    tail = g.one(["", "bn", "relu", "bn_relu"])
    if "bn" in tail:
        expr = f"{g.attr(f'nn.BatchNorm2d({co})')}({expr})"
    if "relu" in tail:
        s = g.one(RELU_SPELLINGS)
        expr = f"{g.attr(s)}({expr})" if s.startswith("nn.") else s.format(x=expr)
    g.new(expr, co, h, w, v.contig)
    g.used.append(f"convtranspose:{kind}" + (f"_{tail}" if tail else "")
                  + ("_wide" if wide else ""))
    return True


def op_upsample_1x1(g: Writer) -> bool:
    """Pool to (N, C, 1, 1) (sometimes a 1x1 conv + ReLU on it, ASPP's image pooling), upsample
    back to (H, W) (interpolate nearest / bilinear, nn.Upsample, adaptive_avg_pool2d to a larger
    size) and sometimes combine with the tensor it came from."""
    v = g.pick()
    pool = g.one(["F.adaptive_avg_pool2d({x}, 1)", "{x}.mean((2, 3), keepdim=True)",
                  "nn.AdaptiveAvgPool2d(1)", "F.adaptive_max_pool2d({x}, 1)"])
    p = g.new(f"{g.attr(pool)}({v.name})" if pool.startswith("nn.") else pool.format(x=v.name),
              v.c, 1, 1)
    if g.coin():
        conv = g.attr(f"nn.Conv2d({v.c}, {v.c}, 1)")
        p = g.new(f"F.relu({conv}({p.name}))", v.c, 1, 1)
    up = g.one(["F.interpolate({x}, size=({h}, {w}), mode='nearest')",
                "F.interpolate({x}, size=({h}, {w}), mode='bilinear', align_corners=False)",
                "F.interpolate({x}, scale_factor=2, mode='nearest')",
                "nn.Upsample(size=({h}, {w}), mode='nearest')",
                "F.adaptive_avg_pool2d({x}, ({h}, {w}))"])
    h, w = (2, 2) if "scale_factor" in up else (v.h, v.w)
    text = up.format(x=p.name, h=v.h, w=v.w)
    u = g.new(f"{g.attr(text)}({p.name})" if up.startswith("nn.") else text, v.c, h, w)
    combine = g.one(["none", "add", "mul", "cat"]) if (h, w) == (v.h, v.w) else "none"
    if combine == "add":
        g.new(f"{v.name} + {u.name}", *v.shape)
    elif combine == "mul":
        g.new(f"{v.name} * {u.name}", *v.shape)
    elif combine == "cat" and 2 * v.c <= MAX_C:
        g.new(f"torch.cat([{v.name}, {u.name}], 1)", 2 * v.c, v.h, v.w)
    g.used.append(f"upsample_1x1:{up.split('(')[0]}:{combine}")
    return True


INPLACE_VIEWS = ["slice_relu", "view_add", "narrow_mul", "transpose_relu", "unsqueeze_clamp",
                 "slice_mul_base"]


def op_inplace_view(g: Writer) -> bool:
    """An in-place op on a view of a tensor (often a conv output), then the view or its base
    is read: the mutation must be visible exactly as in float."""
    v = g.pick()
    s = g.one(INPLACE_VIEWS)
    if s == "slice_relu":  # y = conv(x)[:, :]; y.relu_(); read y
        g.line(f"y_ = {v.name}[:, :]")
        g.line("y_.relu_()")
        g.new("y_", *v.shape)
    elif s == "view_add":  # y = t.view(...); y.add_(1); read the base
        flat = f"{v.name}.view({N}, -1)" if v.contig else f"{v.name}.reshape({N}, -1)"
        g.line(f"{flat}.add_(1.0)")
        g.new(v.name, *v.shape, v.contig)
    elif s == "narrow_mul" and v.c >= 2:  # t[:, :2].mul_(2) on a conv output; read the base
        g.line(f"{v.name}[:, :{g.int(1, v.c - 1)}].mul_(2.0)")
        g.new(v.name, *v.shape, v.contig)
    elif s == "transpose_relu":  # a transposed view, mutated; read the view or the base
        g.line(f"t_ = {v.name}.transpose(2, 3)")
        g.line("t_.relu_()")
        if g.coin():
            g.new("t_", v.c, v.w, v.h)
        else:
            g.new(v.name, *v.shape, v.contig)
    elif s == "unsqueeze_clamp":
        g.line(f"u_ = {v.name}.unsqueeze(1)")
        g.line("u_.clamp_(-1.0, 1.0)")
        g.new("u_.squeeze(1)", *v.shape)
    else:
        s = "slice_mul_base"
        g.line(f"{v.name}[:, :, :1].mul_(0.5)")
        g.new(f"{v.name} + 0.0", *v.shape, v.contig)
    g.used.append(f"inplace_view:{s}")
    return True


def op_cat_pool_cat(g: Writer) -> bool:
    """cat1 = cat([conv_a(t), conv_b(t)]); p = pool(cat1); cat2 = cat([p, conv_c(p)])
    (Inception-like: a cat fed through a pool into another cat; sometimes one tensor feeds
    both cats)."""
    v = g.pick()
    ca, cb = g.int(1, 3), g.int(1, 3)
    a = g.new(f"{g.attr(f'nn.Conv2d({v.c}, {ca}, 1)')}({v.name})", ca, v.h, v.w)
    b = g.new(f"F.relu({g.attr(f'nn.Conv2d({v.c}, {cb}, 3, padding=1)')}({v.name}))",
              cb, v.h, v.w)
    c1 = g.new(f"torch.cat([{a.name}, {b.name}], 1)", ca + cb, v.h, v.w)
    halve = v.h >= 2 and v.w >= 2 and g.coin()
    pool = g.one(["max", "avg"])
    if halve:
        p = g.new(f"F.{pool}_pool2d({c1.name}, 2)", c1.c, v.h // 2, v.w // 2)
    else:
        p = g.new(f"F.{pool}_pool2d({c1.name}, 3, 1, 1)", c1.c, v.h, v.w)
    cc = g.int(1, 2)
    conv_c = g.new(f"{g.attr(f'nn.Conv2d({p.c}, {cc}, 1)')}({p.name})", cc, p.h, p.w)
    third = f", {b.name}" if not halve and c1.c + cc + cb <= MAX_C and g.coin() else ""
    first = g.coin()  # the pooled cat first or second in cat2
    pair = f"{p.name}, {conv_c.name}" if first else f"{conv_c.name}, {p.name}"
    g.new(f"torch.cat([{pair}{third}], 1)", c1.c + cc + (cb if third else 0), p.h, p.w)
    g.used.append(f"cat_pool_cat:{pool}{'_halve' if halve else ''}{'' if first else '_second'}"
                  f"{'_shared' if third else ''}")
    return True


VOCABULARY: dict[str, Callable[[Writer], bool]] = {
    f.__name__[3:]: f for f in (
        op_conv, op_conv_block, op_reuse, op_linear, op_relu, op_broadcast, op_stack, op_add,
        op_mul, op_cat, op_flatten_roundtrip, op_permute, op_split, op_index, op_mean, op_pool,
        op_clamp, op_fixed, op_act, op_norm, op_dropout, op_interpolate, op_pad, op_matmul,
        op_sort, op_topk, op_einsum, op_user_leaf, op_mask, op_shape_arith, op_convtranspose,
        op_upsample_1x1, op_inplace_view, op_cat_pool_cat)
}
NAMES = sorted(VOCABULARY)


def op_residual(g: Writer) -> bool:
    """conv (-> BatchNorm) + the conv's own input (-> ReLU): a residual add of the conv's
    output, in its spellings (only with --fuse-sums: the default vocabulary, and so every
    seed's model, stays as it was)."""
    v = g.pick()
    k = g.one([1, 3])
    y = f"{g.attr(f'nn.Conv2d({v.c}, {v.c}, {k}, padding={k // 2}, bias={g.coin()})')}({v.name})"
    if g.coin():
        y = f"{g.attr(f'nn.BatchNorm2d({v.c})')}({y})"
    s = g.choose(["{y} + {v}", "{v} + {y}", "torch.add({y}, {v})", "F.relu({y} + {v})",
                  "torch.relu({v} + {y})", "({y} + {v}).relu_()"])
    g.new(s.format(y=y, v=v.name), v.c, v.h, v.w, v.contig)
    g.used.append(f"residual:{s}")
    return True

CONV_ACTS = ["F.silu({y})", "nn.SiLU()", "nn.SiLU(inplace=True)", "F.hardswish({y})",
             "nn.Hardswish()", "F.silu({y}, inplace=True)"]


def op_conv_act(g: Writer) -> bool:
    """conv (-> BatchNorm) -> SiLU / hardswish in their spellings, the conv strided or
    grouped sometimes (only with --fuse-activations: the default vocabulary stays as it was)."""
    v = g.pick()
    k, stride = g.one([1, 3]), g.one([1, 1, 2])
    groups = v.c if g.int(0, 3) == 0 else 1
    y = f"{g.attr(f'nn.Conv2d({v.c}, {v.c}, {k}, stride={stride}, padding={k // 2}, groups={groups}, bias={g.coin()})')}({v.name})"
    if g.coin():
        y = f"{g.attr(f'nn.BatchNorm2d({v.c})')}({y})"
    s = g.choose(CONV_ACTS)
    expr = f"{g.attr(s)}({y})" if s.startswith("nn.") else s.format(y=y)
    h, w = (v.h + 2 * (k // 2) - k) // stride + 1, (v.w + 2 * (k // 2) - k) // stride + 1
    g.new(expr, v.c, h, w, True)
    g.used.append(f"conv_act:{s}")
    return True


MLP_ACTS = ["", "nn.ReLU()", "F.relu({x})", "{x}.relu()", "F.relu6({x})", "F.hardtanh({x})",
            "torch.sigmoid({x})", "torch.tanh({x})", "nn.Dropout(0.1)", "F.hardswish({x})"]


def _mlp(g: Writer, last: Var) -> str:
    """flatten → 1-3 (Linear → BatchNorm1d? → activation?, residual add when sizes allow) →
    Linear(·, 3) → softmax sometimes: linear / linear-bn / linear-relu fusions on 2-D tensors."""
    g.line(f"z_ = torch.flatten({last.name}, 1)")
    fin = last.c * last.h * last.w
    for i in range(g.int(1, 3)):
        fout = g.int(2, 12)
        g.line(f"y_ = {g.attr(f'nn.Linear({fin}, {fout})')}(z_)")
        if g.int(0, 2) == 0:
            g.line(f"y_ = {g.attr(f'nn.BatchNorm1d({fout})')}(y_)")
        act = g.one(MLP_ACTS)
        if act:
            g.line(f"y_ = {g.attr(act)}(y_)" if act.startswith("nn.")
                   else f"y_ = {act.format(x='y_')}")
        res = fin == fout and g.coin()
        g.line("z_ = z_ + y_" if res else "z_ = y_")
        g.used.append(f"mlp:{act.split('(')[0] or 'linear'}{'_res' if res else ''}")
        fin = fout
    out = f"{g.attr(f'nn.Linear({fin}, 3)')}(z_)"
    return f"F.softmax({out}, dim=1)" if g.int(0, 3) == 0 else out


def _head(g: Writer) -> str:
    """The model's outputs: the last tensor, a pool + flatten + linear classifier, an MLP, a
    tuple, or a mean."""
    last = g.vars[-1]
    s = g.one(["last", "classifier", "tuple", "mean", "mlp"])
    if s == "classifier":
        pooled = g.new(f"F.adaptive_avg_pool2d({last.name}, 1)", last.c, 1, 1, last.contig)
        fc = g.attr(f"nn.Linear({last.c}, 3)")
        flat = g.one(["torch.flatten({x}, 1)", "{x}.flatten(1)"]
                     + (["{x}.view({x}.size(0), -1)"] if pooled.contig else []))
        return f"{fc}({flat.format(x=pooled.name)})"
    if s == "mlp":
        return _mlp(g, last)
    if s == "tuple" and len(g.vars) > 1:
        other = g.one(g.vars[:-1])
        return f"({last.name}, {other.name})"
    if s == "mean":
        return f"{last.name}.mean((2, 3))"
    return last.name


# ------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class Model:
    """A generated model: its seed, its source (the reproducer) and the ops it uses."""

    seed: int
    source: str
    used: tuple[str, ...]
    input_shape: tuple[int, ...]

    @property
    def families(self) -> frozenset[str]:
        return frozenset(u.split(":")[0] for u in self.used)


def generate(seed: int, steps: int = STEPS, limit: Optional[int] = None) -> Model:
    """The model of ``seed``; ``limit`` keeps only its first ops (a prefix of the same model,
    then a head), which is how ``shrink`` finds a small reproducer."""
    g = Writer(random.Random(seed))
    c, h, w = g.int(1, 4), g.int(1, 5), g.int(1, 5)
    g.vars.append(Var("v0", c, h, w, True))
    n = g.int(1, steps)
    extra = {"residual": op_residual} if FUSE_SUMS[0] else {}
    if FUSE_ACTS[0]:
        extra["conv_act"] = op_conv_act
    # the conv + activation block four times over: one family among ~45, it would reach only
    # 1 model in 20
    names = NAMES + list(extra) + (["conv_act"] * 3 if FUSE_ACTS[0] else [])
    for _ in range(n if limit is None else min(n, limit)):
        name = g.one(names)
        if not extra.get(name, VOCABULARY.get(name))(g):
            op_relu(g)
    outputs = _head(g)
    return Model(seed, g.source(outputs), tuple(g.used), (N, c, h, w))


def build(source: str) -> nn.Module:
    """The float model of a generated source (weights from torch.manual_seed(0))."""
    namespace: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "UserLeaf": UserLeaf}
    exec(compile(source, "<generated model>", "exec"), namespace)  # noqa: S102 - test code
    torch.manual_seed(0)
    return namespace["Generated"]().eval()


# ------------------------------------------------------------------------------ the check
def structure(out: Any) -> Any:
    """Tuple layout, shapes and dtypes of a model's output."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape), out.dtype, out.is_quantized)
    if isinstance(out, (tuple, list)):
        return tuple(structure(o) for o in out)
    return type(out).__name__


def _floats(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().double().flatten() if out.is_floating_point() else torch.zeros(0)
    if isinstance(out, (tuple, list)):
        return torch.cat([_floats(o) for o in out] + [torch.zeros(0, dtype=torch.float64)])
    return torch.zeros(0, dtype=torch.float64)


def sqnr(signal: Any, approx: Any) -> float:
    """SQNR in dB of ``approx`` against ``signal`` over all their floating tensors, with the
    signal's RMS taken as at least FLOOR_RMS and the result capped at CAP_DB; -inf where
    ``approx`` is not finite where ``signal`` is."""
    s, a = _floats(signal), _floats(approx)
    finite = torch.isfinite(s)
    if not bool(torch.isfinite(a[finite]).all()):
        return -math.inf
    s, a = s[finite], a[finite]
    noise = float((s - a).pow(2).sum())
    power = max(float(s.pow(2).sum()), s.numel() * FLOOR_RMS ** 2)
    if noise == 0.0:
        return CAP_DB
    if power == 0.0:
        return -math.inf
    return min(CAP_DB, 10.0 * math.log10(power / noise))


def unquantized(reference: fx.GraphModule) -> fx.GraphModule:
    """``reference`` with its activation quantization turned into copies, in place: each
    quantize and dequantize becomes ``clone()``. The data flow is the reference's (every q /
    dq makes a new tensor, and so does a clone), the values float: only the weights'
    quantization is left. A graph bug that drops or reroutes an op shows here, apart from
    rounding."""
    from fxquant.backends.reference_ops import DEQUANTIZE, QUANTIZE

    graph = reference.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is QUANTIZE:
            with graph.inserting_before(node):
                copy_ = graph.call_method("clone", (node.args[0],))
            node.replace_all_uses_with(copy_)
            graph.erase_node(node)
        elif node.op == "call_method" and node.target == DEQUANTIZE:
            node.target = "clone"
    reference.recompile()
    return reference


def missing_decisions(gm: fx.GraphModule) -> list[str]:
    """``call_*`` nodes of ``gm`` without an fxquant decision."""
    from fxquant.meta import qinfo_or_none

    out = []
    for node in gm.graph.nodes:
        if node.op.startswith("call_"):
            info = qinfo_or_none(node)
            if info is None or not info.decisions:
                out.append(f"{node.op} {node.target} ({node.name})")
    return out


@dataclass
class Outcome:
    """What ``check`` found for one model on one backend. ``kind`` is "ok", "error:<stage>:<
    exception class>", "structure", "decisions", "prepared", "dataflow", "disagreement" or
    "generator"."""

    seed: int
    backend: str
    kind: str = "ok"
    message: str = ""
    sqnr_rf: float = math.nan  # reference vs float
    sqnr_qf: float = math.nan  # converted vs float
    sqnr_qr: float = math.nan  # converted vs reference
    sqnr_pf: float = math.nan  # prepared vs float
    sqnr_uf: float = math.nan  # unquantized reference vs float
    used: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.kind != "ok"

    @property
    def gap(self) -> float:
        return self.sqnr_rf - self.sqnr_qf

    def figures(self) -> str:
        return (f"SQNR ref/float {self.sqnr_rf:.1f} dB, conv/float {self.sqnr_qf:.1f} dB, "
                f"conv/ref {self.sqnr_qr:.1f} dB, gap {self.gap:.1f} dB; prepared/float "
                f"{self.sqnr_pf:.1f} dB, unquantized ref/float {self.sqnr_uf:.1f} dB")

    def summary(self) -> str:
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return f"seed {self.seed} [{self.backend}] {self.kind}: {first[:160]}"


def _batches(shape: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(3)]


@dataclass
class Runs:
    """The outputs on the first batch: prepared (while calibrating), converted, reference,
    and the reference with its activation quantization turned into copies."""

    p: Any
    q: Any
    r: Any
    u: Any


def _convert(model: Model, backend: str, batches: list[torch.Tensor], o: Outcome
             ) -> Optional[Runs]:
    """prepare → calibrate on ``batches`` → convert_fx and convert_to_reference_fx → run them
    on ``batches[0]`` (a calibration batch: SQNR vs float then measures quantization, not
    clipping on a range four samples did not reach); records an exception in ``o`` (and
    returns None)."""
    import fxquant

    stage = "build"
    try:
        torch.backends.quantized.engine = backend
        stage = "prepare"
        prepared = fxquant.prepare_fx(build(model.source),
                                      fxquant.get_default_qconfig_mapping(backend),
                                      (batches[0].clone(),), backend=backend,
                                      leaf_modules=[UserLeaf])
        stage = "calibrate"
        with torch.no_grad():
            p = [prepared(b.clone()) for b in batches][0]
        stage = "convert"
        fusions = dict(fuse_sums=FUSE_SUMS[0], fuse_activations=FUSE_ACTS[0])
        converted = fxquant.convert_fx(prepared, **fusions)
        stage = "reference"
        reference = fxquant.convert_to_reference_fx(prepared, **fusions)
        stage = "decisions"
        gone = missing_decisions(prepared) + missing_decisions(converted)
        if gone:
            o.kind, o.message = "decisions", "no decision on " + ", ".join(gone)
            return None
        with torch.no_grad():
            stage = "run"
            q = converted(batches[0].clone())
            stage = "run_reference"
            r = reference(batches[0].clone())
            stage = "run_unquantized"
            u = unquantized(reference)(batches[0].clone())
        return Runs(p, q, r, u)
    except Exception as e:  # every exception is a finding: the model runs in float
        o.kind, o.message = f"error:{stage}:{type(e).__name__}", f"{type(e).__name__}: {e}"
        return None


def _judge(o: Outcome, f: Any, runs: Runs) -> None:
    """Sets ``o``'s figures, and its kind where they fail (the order: structure, prepared,
    dataflow, disagreement)."""
    q, r = runs.q, runs.r
    if structure(q) != structure(f) or structure(r) != structure(f):
        o.kind = "structure"
        o.message = f"converted {structure(q)}, reference {structure(r)}, float {structure(f)}"
        return
    o.sqnr_pf, o.sqnr_uf = sqnr(f, runs.p), sqnr(f, runs.u)
    o.sqnr_rf, o.sqnr_qf, o.sqnr_qr = sqnr(f, r), sqnr(f, q), sqnr(r, q)
    if o.sqnr_pf < CAP_DB:
        o.kind = "prepared"
    elif o.sqnr_uf < DATAFLOW_DB:
        o.kind = "dataflow"
    elif abs(o.gap) > GAP_DB or o.sqnr_qr < o.sqnr_rf - GAP_DB:
        o.kind = "disagreement"
    o.message = "" if o.kind == "ok" else o.figures()


def check(model: Model, backend: str) -> Outcome:
    """The differential check of one model on one backend (see the module docstring)."""
    o = Outcome(model.seed, backend, used=model.used)
    batches = _batches(model.input_shape)
    try:
        with torch.no_grad():
            f = build(model.source)(batches[0].clone())
    except Exception as e:
        o.kind, o.message = "generator", f"the float model raised {type(e).__name__}: {e}"
        return o
    runs = _convert(model, backend, batches, o)
    if runs is not None:
        _judge(o, f, runs)
    return o


def check_all(model: Model, backends: Sequence[str]) -> list[Outcome]:
    return [check(model, b) for b in backends]


def shrink(seed: int, backend: str, steps: int = STEPS) -> Model:
    """The shortest prefix of model ``seed`` that still fails the same way on ``backend``."""
    full = check(generate(seed, steps), backend)
    for limit in range(0, steps + 1):
        m = generate(seed, steps, limit)
        if check(m, backend).kind == full.kind:
            return m
    return generate(seed, steps)


# ------------------------------------------------------------------------------ make fuzz
def _replay_line(o: Outcome, steps: int) -> str:
    extra = f" --steps {steps}" if steps != STEPS else ""
    return f"python -m tests.fuzz_models --replay {o.seed} --backends {o.backend}{extra} --shrink"


def _figures(outcomes: Sequence[Outcome]) -> list[str]:
    measured = [o for o in outcomes if not math.isnan(o.sqnr_rf)]
    if not measured:
        return []
    gap = max(measured, key=lambda o: abs(o.gap))
    agree = min(measured, key=lambda o: o.sqnr_qr - o.sqnr_rf)
    ok = [o for o in measured if not o.failed]
    median = sorted(o.sqnr_qf for o in measured)[len(measured) // 2]
    lines = [f"  worst |gap| (ref/float - conv/float): {gap.gap:.1f} dB (seed {gap.seed}, "
             f"{gap.backend}); among passing checks: "
             f"{min((o.gap for o in ok), default=math.nan):.1f} .. "
             f"{max((o.gap for o in ok), default=math.nan):.1f} dB",
             f"  worst conv/ref - ref/float: {agree.sqnr_qr - agree.sqnr_rf:.1f} dB "
             f"(seed {agree.seed}, {agree.backend})",
             f"  median conv/float SQNR: {median:.1f} dB (capped at {CAP_DB:.0f})"]
    low = [o for o in measured if o.sqnr_rf < LOW_DB]
    lines.append(f"  low_float_sqnr (reference < {LOW_DB:.0f} dB vs float, information): "
                 f"{len(low)}" + (": " + ", ".join(f"{o.seed}/{o.backend} {o.sqnr_rf:.1f}"
                                                    for o in low[:16]) if low else ""))
    return lines


def summarize(outcomes: Sequence[Outcome], n_models: int, elapsed: float, steps: int = STEPS,
              culprits: Optional[dict[tuple[int, str], str]] = None) -> str:
    """Counts by backend and kind, the worst figures, and each failure with its replay line
    (and, from ``culprits``, the last op of its shortest failing prefix)."""
    backends = sorted({o.backend for o in outcomes})
    lines = [f"fuzz: {n_models} models x {len(backends)} backends ({', '.join(backends)}) = "
             f"{len(outcomes)} checks in {elapsed:.0f} s"]
    for b in backends:
        kinds = Counter(o.kind for o in outcomes if o.backend == b)
        lines.append(f"  {b}: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    lines += _figures(outcomes)
    failed = [o for o in outcomes if o.failed]
    lines.append(f"failures: {len(failed)}")
    if culprits:
        by = Counter(culprits.values())
        lines.append("  by the last op of the shortest failing prefix: "
                     + ", ".join(f"{k} {v}" for k, v in by.most_common()))
    for o in failed:
        culprit = f" <- {culprits[(o.seed, o.backend)]}" if culprits else ""
        lines.append(f"  {o.summary()}{culprit}")
        lines.append(f"    ops: {', '.join(o.used)}")
        lines.append(f"    replay: {_replay_line(o, steps)}")
    return "\n".join(lines)


def culprit(o: Outcome, steps: int) -> str:
    """The family of the last op of the shortest prefix of ``o``'s model that fails the same
    way (the op whose addition breaks it), or "head"."""
    small = shrink(o.seed, o.backend, steps)
    return small.used[-1].split(":")[0] if small.used else "head"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz_models",
                                description="Differential fuzz: converted vs reference graph.")
    p.add_argument("--n", type=int, default=CI_MODELS, help="models to generate")
    p.add_argument("--seed", type=int, default=0, help="first seed (models: seed, seed+1, ...)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    p.add_argument("--steps", type=int, default=STEPS, help="most ops per model")
    p.add_argument("--every", type=int, default=100, help="progress line every N models")
    p.add_argument("--replay", type=int, default=None, metavar="SEED",
                   help="run the model of SEED only: print its source and figures")
    p.add_argument("--fuse-sums", action="store_true",
                   help="convert with fuse_sums=True (conv + residual add rounded once)")
    p.add_argument("--fuse-activations", action="store_true",
                   help="convert with fuse_activations=True (conv + SiLU / hardswish rounded "
                        "once; conv + activation blocks join the vocabulary)")
    p.add_argument("--shrink", action="store_true",
                   help="shrink each failure to its shortest failing prefix (with --replay: "
                        "print it; else: group the failures by its last op)")
    return p


def replay(seed: int, backends: Sequence[str], steps: int, do_shrink: bool) -> int:
    """Print model ``seed``, its figures on each backend and (``do_shrink``) its shortest
    failing prefix; 1 if it fails anywhere."""
    model = generate(seed, steps)
    print(model.source + f"INPUT_SHAPE = {model.input_shape}\n# ops: {', '.join(model.used)}")
    rc = 0
    for o in check_all(model, backends):
        print(f"[{o.backend}] {o.kind}: {o.figures()}")
        if o.failed:
            rc = 1
            print(f"  {o.message}")
            if do_shrink:
                small = shrink(seed, o.backend, steps)
                print(f"--- shortest failing prefix on {o.backend} "
                      f"(ops: {', '.join(small.used)}) ---\n{small.source}"
                      f"INPUT_SHAPE = {small.input_shape}")
    return rc


def fuzz(first: int, n: int, backends: Sequence[str], steps: int, every: int
         ) -> list[Outcome]:
    """Check models ``first`` .. ``first + n - 1`` on ``backends``, printing progress."""
    start, outcomes = time.time(), []
    for i in range(n):
        outcomes += check_all(generate(first + i, steps), backends)
        if (i + 1) % every == 0 or i + 1 == n:
            bad = sum(o.failed for o in outcomes)
            print(f"[{i + 1:5d}/{n}] {time.time() - start:6.0f} s  failures {bad}", flush=True)
    return outcomes


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``make fuzz``: exit status 1 on any failure."""
    import warnings

    warnings.filterwarnings("ignore")
    args = _parser().parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    FUSE_SUMS[0] = bool(args.fuse_sums)
    FUSE_ACTS[0] = bool(args.fuse_activations)
    torch.set_num_threads(1)  # tiny tensors: threads only add latency on a shared machine
    if args.replay is not None:
        return replay(args.replay, backends, args.steps, args.shrink)
    start = time.time()
    outcomes = fuzz(args.seed, args.n, backends, args.steps, max(1, args.every))
    elapsed = time.time() - start
    culprits = {(o.seed, o.backend): culprit(o, args.steps) for o in outcomes
                if o.failed} if args.shrink else None
    print(summarize(outcomes, args.n, elapsed, args.steps, culprits))
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
