"""The `fxquant` command: quantize end to end (console script, in a subprocess), report and viz
of the model file it writes, --help, and exit status 2 with the fix for what was mistyped."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from html.parser import HTMLParser

import pytest
import torch

from fxquant.cli import load_model, main, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTORY = "tests.models:TinyResNet"
MODULES = ["stem.0", "layer1.conv1", "layer1.conv2", "layer1", "layer2.conv1", "layer2.conv2",
           "layer2", "pool", "(root)", "fc"]


def _command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "fxquant")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "fxquant.cli"]


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    cmd = _command() + ["quantize", FACTORY, "--example-shape", "2,3,8,8", "--backend", "x86",
                        "--calib", "random", "--steps", "3", "--out", str(out / "model.pt"),
                        "--report", str(out / "report.html"), "--viz", str(out / "g.svg")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return out, proc


def _markdown_rows(text: str) -> list[list[str]]:
    lines = [l for l in text.splitlines() if l.startswith("| ")]
    return [[c.strip() for c in l.strip("|").split(" | ")] for l in lines[1:]]


def test_quantize_end_to_end_writes_model_report_and_picture(quantized_run):
    out, proc = quantized_run
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"calibrating \[#+\] 3/3\n", proc.stderr), proc.stderr
    assert "calibrating [" in proc.stderr and "1/3" in proc.stderr
    for name in ("model.pt", "report.html", "g.svg"):
        assert (out / name).stat().st_size > 0
    html = (out / "report.html").read_text(encoding="utf-8")
    cells = _html_rows(html)
    assert [r[1] for r in cells] == MODULES
    assert all(r[3] == "int8" for r in cells)
    assert all(20 < float(r[8]) < 60 for r in cells)  # per-layer SQNR column
    assert "<svg" in html and "http" not in html.replace("http-equiv", "")


class _Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.in_body = False

    def handle_starttag(self, tag, attrs):
        if tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows.append([])
        elif tag == "td" and self.in_body:
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None
        elif tag == "tbody":
            self.in_body = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _html_rows(html: str) -> list[list[str]]:
    parser = _Rows()
    parser.feed(html)
    return parser.rows


def test_report_and_viz_of_the_model_file(quantized_run, tmp_path, capsys, monkeypatch):
    out, proc = quantized_run
    assert proc.returncode == 0, proc.stderr
    model = str(out / "model.pt")
    monkeypatch.chdir(ROOT)
    assert main(["report", model, "--float", FACTORY, "--example-shape", "2,3,8,8",
                 "--out", str(tmp_path / "r.md")]) == 0
    rows = _markdown_rows((tmp_path / "r.md").read_text(encoding="utf-8"))
    assert [r[0] for r in rows] == MODULES
    stem = rows[0]
    assert stem[1:6] == ["ConvReLU2d", "int8", "global", "quint8->quint8",
                         "quantized::conv2d_relu"]
    assert stem[6].startswith("quint8 s=") and float(stem[7]) > 20
    assert main(["report", model]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[2].startswith("stem.0") and "ops: 10 int8" in text
    assert main(["viz", model, "--out", str(tmp_path / "g.svg"), "--collapse-depth", "1"]) == 0
    svg = (tmp_path / "g.svg").read_text(encoding="utf-8")
    assert "<title>[layer1]</title>" in svg and "quantized::conv2d_relu" in svg
    loaded = load_model(model)
    x = torch.randn(2, 3, 8, 8)
    assert loaded(x).shape == (2, 10)


@pytest.mark.parametrize("command", [[], ["quantize"], ["report"], ["viz"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: fxquant")
    if command == ["quantize"]:
        assert "--example-shape" in text and "--calib" in text and "MODULE:FACTORY" in text


@pytest.mark.parametrize("argv,message", [
    (["quantize", "no_such_pkg.models:Net", "--example-shape", "1,3,8,8"],
     "cannot import module 'no_such_pkg.models'"),
    (["quantize", "tests.models:NoSuchNet", "--example-shape", "1,3,8,8"],
     "'tests.models' has no callable 'NoSuchNet'. Fix: use one of"),
    (["quantize", "tests/no_file.py:make", "--example-shape", "1,3,8,8"],
     "cannot import 'tests/no_file.py': no such file"),
    (["quantize", "tests.models", "--example-shape", "1,3,8,8"], "is not MODULE:FACTORY"),
    (["quantize", FACTORY, "--example-shape", "1,3"],
     "the model does not accept an input of shape [1, 3]"),
    (["quantize", FACTORY, "--example-shape", "1,x,8"], "is not a shape"),
    (["quantize", FACTORY, "--example-shape", "1,3,8,8", "--calib", "missing.pt"],
     "--calib 'missing.pt': no such file"),
    (["quantize", FACTORY, "--example-shape", "1,3,8,8", "--backend", "tpu"],
     "--backend 'tpu'"),
    (["report", "missing_model.pt"], "model file 'missing_model.pt' not found"),
])
def test_usage_errors_exit_2_and_name_the_fix(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fxquant {argv[0]}: error: ") and message in err, err
    assert "Fix" in err or "fix" in err or "write one" in err


def test_factory_from_a_file_and_calibration_file(tmp_path, capsys):
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import torch.nn as nn
        def make():
            return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    """))
    torch.save(torch.randn(12, 6), tmp_path / "calib.pt")
    report = tmp_path / "r.txt"
    assert main(["quantize", f"{src}:make", "--example-shape", "4,6", "--calib",
                 str(tmp_path / "calib.pt"), "--steps", "2", "--report", str(report)]) == 0
    assert "calibrating [" in capsys.readouterr().err
    text = report.read_text(encoding="utf-8")
    assert text.splitlines()[2].startswith("0 ") and "quantized::linear_relu" in text
    torch.save(torch.randn(12, 5), tmp_path / "bad.pt")
    assert main(["quantize", f"{src}:make", "--example-shape", "4,6", "--calib",
                 str(tmp_path / "bad.pt")]) == 2
    assert "does not fit --example-shape [4, 6]" in capsys.readouterr().err


def test_a_model_saved_without_records_is_refused(tmp_path, capsys):
    from tests.test_graph import _prepared

    import fxquant

    gm = fxquant.convert_fx(_prepared())
    torch.save(gm, tmp_path / "plain.pt")
    assert main(["viz", str(tmp_path / "plain.pt"), "--out", str(tmp_path / "g.svg")]) == 2
    assert "has no fxquant decision records" in capsys.readouterr().err
    save_model(gm, str(tmp_path / "with.pt"))
    assert not hasattr(gm, "_fxquant_records")
    loaded = load_model(str(tmp_path / "with.pt"))
    assert [n.op for n in loaded.graph.nodes] == [n.op for n in gm.graph.nodes]
    from fxquant.report import rows

    assert [r.status for r in rows(loaded)] == [r.status for r in rows(gm)]
