"""fxquant.report: rows, statuses per stage, MACs, sizes, per-layer numerics, text / Markdown /
a self-contained HTML file."""
from __future__ import annotations

import copy
import functools
from html.parser import HTMLParser

import pytest
import torch

import fxquant
from fxquant import report
from fxquant.meta import qinfo
from fxquant.report import Report, build, graph_stage, rows, status_of, text_report
from tests.models import TinyResNet, WithFloatHead, build as build_model, calibration_batches

SHAPE = (2, 3, 8, 8)


@functools.lru_cache(maxsize=None)
def _models(factory):
    torch.manual_seed(0)
    model = build_model(factory)
    mapping = fxquant.get_default_qconfig_mapping("x86")
    mapping.set_module_name("head", None)
    prepared = fxquant.prepare_fx(model, mapping, (torch.randn(*SHAPE),), backend="x86")
    for batch in calibration_batches(SHAPE, n=2):
        prepared(batch)
    return model, prepared, fxquant.convert_fx(prepared)


def _row(rs, module_path, op=None):
    return next(r for r in rs if r.module_path == module_path and (op is None or r.op == op))


def test_stage_and_status_of_prepared_reference_converted():
    _, prepared, quantized = _models(WithFloatHead)
    reference = fxquant.convert_to_reference_fx(prepared)
    assert [graph_stage(g) for g in (prepared, reference, quantized)] == \
        ["prepared", "reference", "converted"]
    assert graph_stage(fxquant.fuse_fx(build_model(TinyResNet))) == "float"
    expected = {"prepared": "to_quantize", "reference": "reference", "converted": "int8"}
    for gm in (prepared, reference, quantized):
        stage = graph_stage(gm)
        by_path = {r.module_path: r for r in rows(gm) if r.op.startswith(("Conv", "quantized"))}
        assert by_path["block.conv2"].status == expected[stage], stage
        assert _row(rows(gm), "head.1").status == "float"
    # without the stage, a reference op is told from the convert pass's decision
    node = next(n for n in reference.graph.nodes if n.target == "block.conv2")
    assert status_of(qinfo(node)) == "reference"


def test_rows_of_a_converted_model():
    _, _, quantized = _models(WithFloatHead)
    rs = rows(quantized)
    stem = _row(rs, "stem")
    assert (stem.op, stem.status, stem.qconfig_rule, stem.kernel) == \
        ("ConvReLU2d", "int8", "global", "quantized::conv2d_relu")
    assert (stem.in_dtype, stem.out_dtype) == ("quint8", "quint8")
    assert stem.qparams.startswith("quint8 s=") and stem.debug_handle is not None
    assert stem.macs == 2 * 8 * 8 * 8 * 3 * 9  # N*C_out*H*W * C_in*k*k
    head = _row(rs, "head.1")
    assert (head.status, head.in_dtype, head.out_dtype) == ("float", "float32", "float32")
    assert head.qconfig_rule.startswith("module_name 'head'")
    assert "qconfig is None (module_name 'head'" in head.reason
    assert head.macs == 2 * 10 * 512
    assert all(r.status not in ("quantize", "dequantize") for r in rs)
    assert len(rows(quantized, include_qdq=True)) == len(rs) + 2


def test_summary_counts_reasons_and_int8_macs():
    _, _, quantized = _models(WithFloatHead)
    s = report.summary(quantized)
    assert s["stage"] == "converted"
    assert s["counts"] == {"int8": 4, "float": 2, "quantize": 1, "dequantize": 1}
    assert sum(s["float_reasons"].values()) == 2
    conv_macs = 2 * 8 * 8 * 8 * (3 * 9 + 8 * 9 + 8 * 9)
    assert s["macs_int8"] == conv_macs and s["macs_total"] == conv_macs + 2 * 10 * 512
    assert s["macs_int8_share"] == pytest.approx(conv_macs / (conv_macs + 10240))


def test_report_with_numerics_text_and_markdown():
    model, _, quantized = _models(TinyResNet)
    inputs = calibration_batches(SHAPE, n=2, seed=7)
    rep = fxquant.report(quantized, float_model=model, inputs=inputs)  # the callable module
    assert isinstance(rep, Report) and rep.has_numerics
    ops = rep.op_rows()
    assert [r.module_path for r in ops][:3] == ["stem.0", "layer1.conv1", "layer1.conv2"]
    assert all(r.sqnr_db is not None and 20 < r.sqnr_db < 60 for r in ops)
    assert all(r.max_abs_err is not None and r.max_abs_err > 0 for r in ops)
    text = rep.to_text()
    lines = text.splitlines()
    assert lines[0].split() == ["module", "op", "status", "qconfig", "rule", "dtypes", "kernel",
                                "/", "reason", "output", "qparams", "SQNR", "dB", "max", "err"]
    stem_line = next(l for l in lines if l.startswith("stem.0"))
    assert "quantized::conv2d_relu" in stem_line and f"{ops[0].sqnr_db:.1f}" in stem_line
    assert "conv/linear MACs int8: 100.0%" in text
    assert "model size: fp32" in text and "output SQNR:" in text
    worst = rep.comparison.worst(5)
    assert f"  {worst[0].name}" in text.split("worst layers")[1]
    md = rep.to_markdown().splitlines()
    table = [l for l in md if l.startswith("| ")]
    assert len(table) == 1 + len(ops) and table[1].startswith("| stem.0 | ConvReLU2d | int8 |")


def test_text_report_without_numerics_names_float_reasons():
    _, _, quantized = _models(WithFloatHead)
    text = text_report(quantized)
    assert "SQNR" not in text.splitlines()[0]
    float_lines = [l for l in text.splitlines() if l.startswith("  float x")]
    assert sum(int(l.split()[1][1:].rstrip(":")) for l in float_lines) == 2
    assert all("qconfig is None (module_name 'head'" in l for l in float_lines)
    assert "ops: 4 int8, 2 float, 1 quantize, 1 dequantize" in text
    prepared_text = build(_models(WithFloatHead)[1]).to_text()
    assert "stage: prepared" in prepared_text and "to_quantize" in prepared_text
    assert "observer" not in prepared_text.split("stage:")[0]  # observers are not op rows


class _Checker(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr", "path", "polygon", "ellipse", "polyline"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "xlink:href", "action") or (v and "url(" in v):
                self.external.append(f"{tag} {k}={v}")
        if tag in ("script", "link", "iframe", "img", "object", "embed"):
            self.external.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_one_valid_self_contained_file(tmp_path):
    model, _, quantized = _models(WithFloatHead)
    rep = build(quantized, model, calibration_batches(SHAPE, n=1, seed=3))
    path = tmp_path / "report.html"
    text = rep.to_html(path)
    assert path.read_text(encoding="utf-8") == text
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert checker.external == [], checker.external
    assert "@import" not in text and "http://" not in text and "https://" not in text
    assert checker.tags.count("svg") == 1 and checker.tags.count("table") == 1
    assert checker.tags.count("tr") == 1 + len(rep.op_rows())
    body = "".join(checker.text)
    for path_ in ("stem", "block.conv1", "head.1"):
        assert path_ in body
    assert "quantized::conv2d_relu" in body and "kept float" in body


def test_save_by_suffix(tmp_path):
    _, _, quantized = _models(TinyResNet)
    rep = build(quantized)
    for name, start in (("r.md", "# fxquant report"), ("r.txt", "module"),
                        ("r.html", "<!DOCTYPE html>")):
        rep.save(tmp_path / name)
        assert (tmp_path / name).read_text(encoding="utf-8").startswith(start)


def test_report_only_reads_the_records():
    model, _, quantized = _models(TinyResNet)
    before = [copy.deepcopy(qinfo(n).decisions) for n in quantized.graph.nodes]
    build(quantized, model, torch.randn(*SHAPE)).to_html(None)
    assert [qinfo(n).decisions for n in quantized.graph.nodes] == before
