"""The README's supported-op table is generated from the backend, fusion and spelling tables
(fxquant/optable.py): it must equal a fresh generation, and the generator must show whatever
the tables hold."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant import optable
from fxquant.backends.base import FIXED, SHARED, Rule
from fxquant.backends.registry import get_backend, registered_backends
from fxquant.fusion import default_group_fusions, default_module_fusions
from fxquant.ops import SPELLINGS
from fxquant.patterns import Op

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_table_is_up_to_date():
    text = README.read_text()
    assert text.count(optable.START) == 1 and text.count(optable.END) == 1
    assert "## Supported ops" in text[:text.index(optable.START)]
    current = optable.current_section(text)
    fresh = optable.generate()
    assert current == fresh, ("README.md's supported-op table is out of date with the backend / "
                              "fusion / spelling tables: run `make optable` and commit README.md")


def test_builtin_backends_are_every_backend_file():
    names = [b.name for b in optable.builtin_backends()]
    assert names == sorted(names)
    assert set(names) == set(registered_backends()) >= {"fbgemm", "x86", "qnnpack", "onednn"}


def _table_rows(section: str, heading: str) -> list[list[str]]:
    block = section.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln[2:-2].split(" | ")] for ln in lines[2:]]


def test_every_rule_of_every_backend_has_a_row_with_its_kernel():
    backends = optable.builtin_backends()
    rows = {r[0].strip("`"): r for r in _table_rows(optable.generate(), "Quantized ops")}
    for i, backend in enumerate(backends):
        for rule in backend.rules:
            row = rows[rule.name]
            kernel_cell = row[2 + i]
            assert kernel_cell.startswith(rule.kernel.replace("|", "\\|")), (rule.name, kernel_cell)
    assert len(rows) == len({r.name for b in backends for r in b.rules})


def test_every_spelling_appears():
    section = optable.generate()
    for s in SPELLINGS:
        for label in optable.spelling_labels(s.target):
            assert f"`{label}`" in section, label


def test_spellings_and_policies_render():
    rows = {r[0].strip("`"): r for r in _table_rows(optable.generate(), "Quantized ops")}
    add = rows["add"][1]
    for spelling in ("`torch.add`", "`a + b`", "`a += b` (in place)", "`x.add()`",
                     "`x.add_()` (in place)"):
        assert spelling in add
    relu = rows["shared_function"][1]
    for spelling in ("`F.relu`", "`nn.ReLU`", "`torch.relu`", "`x.relu()`", "`x.relu_()` (in place)",
                     "`F.relu_` (in place)", "`torch.relu_` (in place)"):
        assert spelling in relu
    assert relu.count("`F.relu_`") == 1  # F.relu_ is torch.relu_: listed once
    for name, row in rows.items():
        rule = next(r for b in optable.builtin_backends() for r in b.rules if r.name == name)
        assert row[-2].startswith(rule.qparams), (name, row[-2])
    assert rows["linear"][-2] == "weighted: quantized weight, own output qparams"
    assert rows["shared_function"][-2] == "shared: output shares the input's qparams"
    assert "`nn.MaxPool2d`" in rows["shared_function"][1]  # normalize: F.max_pool2d


def test_a_new_rule_shows_up_with_its_policy_kernel_and_notes():
    base = get_backend("x86")
    extra = base.extended(
        Rule("test_sigmoid", Op(torch.sigmoid), FIXED, "quantized::sigmoid",
             fixed=(1.0 / 256, 0), notes="output in [0, 1]"),
        Rule("test_pool", Op(nn.MaxPool2d), SHARED, "quantized::max_pool2d | fast"),
        name="x86-test")
    section = optable.generate(backends=[base, extra])
    rows = {r[0].strip("`"): r for r in _table_rows(section, "Quantized ops")}
    row = rows["test_sigmoid"]
    # the canonical op, then every spelling normalize rewrites into it
    assert row[1] == ("`torch.sigmoid`, `F.sigmoid`, `torch.special_expit`, `x.sigmoid()`, "
                      "`torch.sigmoid_` (in place), `x.sigmoid_()` (in place), `nn.Sigmoid`")
    assert row[2:4] == ["—", "quantized::sigmoid"]  # only the second backend has it
    assert row[4] == "fixed: scale 1/256, zero_point 0" and row[5] == "output in [0, 1]"
    assert "quantized::max_pool2d \\| fast" in section  # a '|' does not break the table
    head = section.split("### Quantized ops\n\n", 1)[1].splitlines()[0]
    assert "x86 kernel" in head and "x86-test kernel" in head


def test_fusions_table_lists_every_fusion():
    rows = _table_rows(optable.generate(), "Fusions")
    names = [r[0].strip("`") for r in rows]
    expected = [f.pattern.name for f in default_module_fusions()] + \
               [g.pattern.name for g in default_group_fusions()]
    assert names == expected
    by_name = dict(zip(names, rows))
    assert by_name["conv2d_bn_relu"][1] == "`nn.Conv2d` → `nn.BatchNorm2d` → `F.relu`"
    assert "add_relu" in by_name["add_relu"][2]


def test_spelling_labels():
    import operator

    assert optable.spelling_labels(operator.iadd) == ["a += b"]
    assert optable.spelling_labels("relu_") == ["x.relu_()"]
    assert optable.spelling_labels(nn.ReLU) == ["nn.ReLU"]
    assert optable.spelling_labels(F.relu_) == ["F.relu_", "torch.relu_"]
    assert optable.spelling_labels(torch.Tensor.add) == ["torch.Tensor.add"]


def test_replace_section_is_idempotent_and_keeps_the_rest():
    text = f"# t\n\nbefore\n{optable.START}\nold table\n{optable.END}\nafter\n"
    new = optable.replace_section(text, "NEW\n")
    assert new == f"# t\n\nbefore\n{optable.START}\nNEW\n{optable.END}\nafter\n"
    assert optable.replace_section(new, "NEW\n") == new
    assert optable.current_section(new) == "NEW\n"
    with pytest.raises(ValueError, match="markers"):
        optable.replace_section("no markers here", "x")


def test_main_check_and_write(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{optable.START}\nstale\n{optable.END}\noutro\n")
    assert optable.main(["--check", str(stale)]) == 1
    assert "make optable" in capsys.readouterr().err
    assert optable.main(["--write", str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{optable.END}\noutro\n")
    assert optable.current_section(text) == optable.generate()
    assert optable.main(["--check", str(stale)]) == 0
    assert optable.main([]) == 0
    assert capsys.readouterr().out.endswith(optable.generate())


def test_module_entry_point_checks_the_readme():
    """`python -m fxquant.optable` (what `make optable` runs) works from the repository root."""
    run = subprocess.run([sys.executable, "-m", "fxquant.optable", "--check", "README.md"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr + "\nrun `make optable`"


def test_makefile_has_the_optable_target():
    makefile = (ROOT / "Makefile").read_text()
    assert "\noptable:" in makefile and "-m fxquant.optable --write README.md" in makefile
