"""What each accuracy technique buys on real (trained) weights: a table per model.

The models are trained here in seconds (examples/accuracy_models.py: a depthwise-separable
ReLU6 CNN on scikit-learn's digits, a 2-layer BERT-style encoder with an additive padding
mask). For the CNN: top-1 agreement of int8 with float and the mean KL(float || int8) of their
softmax outputs on the 500 held-out images (and int8 top-1 accuracy against the labels). For the
encoder: the mean cosine of the int8 sentence embedding with the float one on 500 held-out
sequences (and how often the trained head's answer is the float model's).

    python examples/accuracy.py            # full table (about a minute on a free core)
    python examples/accuracy.py --fast     # fewer training steps and rows (the test runs it)
    python examples/accuracy.py --markdown # tables as markdown (README / docs/accuracy.md)

On an x86 CPU without VNNI (AVX2 only) the default is 7-bit activations: fbgemm's kernels
saturate int16 sums on full 8-bit ones. The 8-bit rows therefore run on qnnpack (int32
accumulation) or as the reference graph (q/dq around float ops: the numerics an int32-accurate
kernel gives), never on fbgemm here.
"""
from __future__ import annotations

import argparse
import copy
import operator
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy_models as am  # noqa: E402

import fxquant  # noqa: E402
from fxquant.qconfig import (QConfigMapping, default_dynamic_qconfig,  # noqa: E402
                             get_default_qconfig, per_channel_dynamic_qconfig)


@dataclass
class Row:
    technique: str
    values: dict[str, Optional[float]]  # metric name -> value (None: n/a)
    note: str = ""


# ------------------------------------------------------------------------------- helpers
def calibrate(prepared: nn.Module, batches: list[tuple[Any, ...]]) -> nn.Module:
    with torch.no_grad():
        for args in batches:
            prepared(*args)
    return prepared


def static(model: nn.Module, mapping: Any, batches: list[tuple[Any, ...]], backend: str, *,
           reference: bool = False, correct_bias: bool = False, **convert: Any) -> nn.Module:
    """Prepare, calibrate, convert (or reference graph), optionally bias-correct.
    ``convert``: options of convert_fx (``range_check="off"``)."""
    prepared = calibrate(fxquant.prepare_fx(model, mapping, batches[0], backend=backend), batches)
    q = (fxquant.convert_to_reference_fx(prepared) if reference
         else fxquant.convert_fx(prepared, **convert))
    if correct_bias:
        q = fxquant.bias_correction(q, batches, reference=prepared)
    return q


def kl_and_agreement(f_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(softmax(f) || softmax(q)), top-1 agreement)."""
    lf, lq = F.log_softmax(f_logits, 1), F.log_softmax(q_logits, 1)
    kl = float((lf.exp() * (lf - lq)).sum(1).mean())
    return kl, float((f_logits.argmax(1) == q_logits.argmax(1)).float().mean())


def run(model: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with fxquant's warnings silenced (the rows that force a setting on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# ------------------------------------------------------------------------------- the CNN
def cnn_rows(fast: bool, progress: Callable[[str], None]) -> list[Row]:
    model = am.digits_cnn(steps=60 if fast else 200)
    _, calib, test = am.digits_data()
    batches = [(calib.x[i:i + 50],) for i in range(0, len(calib.y), 50)]
    f_logits = run(model, test.x)
    rows = [Row("float", {"agreement": 1.0, "KL": 0.0, "top-1": am.accuracy(model, test)})]

    def add(name: str, q: nn.Module, note: str = "") -> None:
        q_logits = run(q, test.x)
        kl, agree = kl_and_agreement(f_logits, q_logits)
        top1 = float((q_logits.argmax(1) == test.y).float().mean())
        rows.append(Row(name, {"agreement": agree, "KL": kl, "top-1": top1}, note))
        progress(f"  {name}: agreement {agree:.3f}, KL {kl:.4f}")

    x86 = fxquant.get_default_qconfig_mapping("x86")
    bits = "7-bit" if x86.activation_range.reduce_range else "8-bit"
    default = static(model, x86, batches, "x86")
    add(f"x86 default ({bits} activations, histogram)", default,
        f"ReLU6 folded into {_clamps_folded(default)} conv outputs")
    add("+ bias correction", static(model, x86, batches, "x86", correct_bias=True))
    methods = ("minmax", "percentile", "mse", "entropy") if not fast else ("percentile",)
    for method in methods:
        try:
            mapping = fxquant.get_default_qconfig_mapping("x86", calibration=method)
        except Exception as e:  # noqa: BLE001 - a method this version lacks
            rows.append(Row(f"calibration: {method}", {}, f"n/a: {e}"))
            continue
        add(f"calibration: {method}", static(model, mapping, batches, "x86"))
    full = fxquant.get_default_qconfig_mapping("x86", reduce_range=False)
    add("8-bit activations, reference numerics",
        _quiet(lambda: static(model, full, batches, "x86", reference=True)),
        "q/dq graph: what an int32-accumulating kernel computes")
    if not fast:
        add("8-bit + bias correction, reference numerics",
            _quiet(lambda: static(model, full, batches, "x86", reference=True,
                                  correct_bias=True)))
    qnn = fxquant.get_default_qconfig_mapping("qnnpack")
    add("qnnpack (8-bit, per-tensor weights)", static(model, qnn, batches, "qnnpack"))
    add("qnnpack + bias correction",
        static(model, qnn, batches, "qnnpack", correct_bias=True))
    add(*budget_row(model, batches, calib.x, progress))
    return rows


def budget_row(model: nn.Module, batches: list[tuple[Any, ...]], calib_x: torch.Tensor,
               progress: Callable[[str], None]) -> tuple[str, nn.Module, str]:
    """quantize_with_budget on the x86 default, judged by -KL(float || int8) on the
    calibration images (smooth: top-1 agreement on 200 images moves in steps of 0.5%)."""
    calib_logits = run(model, calib_x)
    max_drop = 0.0005

    def neg_kl(m: nn.Module) -> float:
        return -kl_and_agreement(calib_logits, run(m, calib_x))[0]

    q, report = fxquant.quantize_with_budget(
        model, fxquant.get_default_qconfig_mapping("x86"), batches[0], batches, neg_kl,
        max_drop=max_drop, backend="x86", progress=lambda s: progress(f"    budget {s}"))
    return (f"quantize_with_budget (x86, KL on calib <= {max_drop:g})", q,
            f"float: {', '.join(report.float_layers) or 'none'}; {len(report.steps)} tries"
            + ("" if report.met else "; budget NOT met"))


def _clamps_folded(q: nn.Module) -> int:
    """Conv modules of the converted model whose ReLU6 was fused (its decisions say so)."""
    from fxquant.meta import qinfo_or_none

    n = 0
    for node in q.graph.nodes:
        info = qinfo_or_none(node)
        if info is not None and node.op == "call_module" and any(
                d.action == "fuse" and "6" in str(d.detail) + d.reason for d in info.decisions):
            n += 1
    return n


# ------------------------------------------------------------------------------- the encoder
def mask_path_quantized(mapping: QConfigMapping) -> QConfigMapping:
    """The mapping with explicit rules quantizing softmax and the ops that build / apply the
    additive mask (what a default without attention awareness does)."""
    mapping = copy.deepcopy(mapping)
    qc = mapping.global_qconfig
    for op in (F.softmax, torch.softmax, torch.add, torch.mul, operator.sub):
        mapping.set_object_type(op, qc)
    return mapping


def encoder_rows(fast: bool, progress: Callable[[str], None]) -> list[Row]:
    enc, head = am.masked_encoder(steps=60 if fast else 150)
    tokens, mask, _ = am.sequence_data(500, seed=123)
    batches = [am.sequence_data(64, seed=s)[:2] for s in range(4)]
    f_emb = run(enc, tokens, mask)
    f_ans = run(head, f_emb).argmax(1)
    rows = [Row("float", {"cosine": 1.0, "answers": 1.0})]

    def add(name: str, q: nn.Module, note: str = "") -> None:
        q_emb = run(q, tokens, mask)
        cos = float(F.cosine_similarity(q_emb, f_emb, dim=1).mean())
        ans = float((run(head, q_emb).argmax(1) == f_ans).float().mean())
        rows.append(Row(name, {"cosine": cos, "answers": ans}, note))
        progress(f"  {name}: cosine {cos:.4f}")

    x86 = fxquant.get_default_qconfig_mapping("x86")
    add("static x86 default (attention-aware)", static(enc, x86, batches, "x86"),
        "softmax and mask path float by default")
    add("static, mask path + softmax quantized",
        _quiet(lambda: static(enc, mask_path_quantized(x86), batches, "x86")),
        "explicit object_type rules; convert's range check repairs the mask's range")
    add("  the same, range_check='off'",
        _quiet(lambda: static(enc, mask_path_quantized(x86), batches, "x86", range_check="off")),
        "what an unchecked convert gives")
    linear_only = QConfigMapping().set_object_type(nn.Linear, get_default_qconfig("x86"))
    add("static, nn.Linear only", static(enc, linear_only, batches, "x86"))
    if not fast:
        add("static, nn.Linear only + bias correction",
            static(enc, linear_only, batches, "x86", correct_bias=True))
    for engine in ("x86", "qnnpack") if not fast else ("x86",):
        for label, qc in (("per-tensor", default_dynamic_qconfig),
                          ("per-channel", per_channel_dynamic_qconfig)):
            q = fxquant.quantize_dynamic_fx(enc, {nn.Linear: qc}, example_inputs=batches[0],
                                            backend=engine)
            add(f"dynamic int8 {label} ({engine})", q)
    return rows


# ------------------------------------------------------------------------------- tables
def table(rows: list[Row], metrics: list[str], markdown: bool) -> str:
    fmt = {"KL": "{:.4f}", "cosine": "{:.4f}"}

    def cell(row: Row, m: str) -> str:
        v = row.values.get(m)
        return "n/a" if v is None else fmt.get(m, "{:.3f}").format(v)

    if markdown:
        lines = ["| technique | " + " | ".join(metrics) + " | note |",
                 "|---|" + "---:|" * len(metrics) + "---|"]
        lines += [f"| {r.technique} | " + " | ".join(cell(r, m) for m in metrics)
                  + f" | {r.note} |" for r in rows]
        return "\n".join(lines)
    w = max(len(r.technique) for r in rows) + 2
    lines = [f"{'technique':<{w}}" + "".join(f"{m:>11}" for m in metrics) + "  note"]
    lines += [f"{r.technique:<{w}}" + "".join(f"{cell(r, m):>11}" for m in metrics)
              + f"  {r.note}" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, list[Row]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps and rows")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    progress = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    torch.manual_seed(0)
    progress("digits CNN (depthwise-separable, BN, ReLU6), 500 held-out images:")
    cnn = cnn_rows(args.fast, progress)
    progress("masked encoder (2 layers, additive mask), 500 held-out sequences:")
    enc = encoder_rows(args.fast, progress)
    print("\nDigits CNN: int8 vs float")
    print(table(cnn, ["agreement", "KL", "top-1"], args.markdown))
    print("\nMasked encoder: int8 vs float sentence embeddings")
    print(table(enc, ["cosine", "answers"], args.markdown))
    return {"cnn": cnn, "encoder": enc}


if __name__ == "__main__":
    main()
