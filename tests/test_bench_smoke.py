"""Smoke test of the `make bench` harness (benchmarks/run.py) on one tiny model, one round.

It checks the harness's shape, not speed: the JSON and table structure, SQNR and ratios for the
paths that run, and that a path that is missing or breaks is reported as ``n/a (reason)``
instead of stopping the bench (the bench must keep working while engines land one by one).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn as nn

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCH)

import models as bench_models  # noqa: E402
import run as bench  # noqa: E402

import fxquant  # noqa: E402


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean([2, 3]))


@pytest.fixture
def tiny_registered(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = bench_models.BenchModel("tiny", Tiny, "static", bench_models._image)
    monkeypatch.setitem(bench_models.MODELS, "tiny", spec)
    return "tiny"


def test_harness_reports_timings_and_na(tiny_registered: str, tmp_path, monkeypatch) -> None:
    monkeypatch.delattr(fxquant, "freeze", raising=False)  # as in a checkout without freeze

    def broken(ctx, example):
        raise RuntimeError("engine exploded")
    monkeypatch.setitem(bench.BUILDERS, "ov.nncf", broken)
    lines: list[str] = []
    out = tmp_path / "bench.json"
    data = bench.run([tiny_registered], ["fp32", "fxq.native", "fxq.frozen", "ov.nncf"], [1, 2],
                     16, 1, str(out), log=lines.append)

    written = json.loads(out.read_text())
    assert set(written) >= {"machine", "config", "models", "acceptance_batch1", "int8_end_to_end"}
    res = written["models"]["tiny"]
    assert res["kind"] == "static" and res["float_ops"] == len(res["float_op_list"])
    assert res["size_bytes"]["fp32"] > 0 and res["size_bytes"]["fxq.native"] > 0
    assert res["na"]["fxq.frozen"] == "fxquant.freeze not in this checkout"
    assert res["na"]["ov.nncf"] == "failed: RuntimeError: engine exploded"
    for batch in ("1", "2"):
        rows = res["batches"][batch]
        assert set(rows) == {"fp32", "fxq.native"}  # n/a paths are not timed
        assert rows["fp32"]["wall_vs_fp32"] == 1.0 and rows["fp32"]["sqnr_db"] == float("inf")
        native = rows["fxq.native"]
        assert native["wall_ms"] > 0 and native["cpu_ms"] >= 0 and native["wall_vs_fp32"] > 0
        assert 10 < native["sqnr_db"] < 80, native  # int8, but close to float
        assert native["vs_native_db"] == float("inf")
    text = "\n".join(lines)
    assert "fxq.frozen    n/a (fxquant.freeze not in this checkout)" in text
    assert "ov.nncf       n/a (failed: RuntimeError: engine exploded)" in text
    assert "wall/fp32" in text and "fxq fastest" in text

    acc = data["acceptance_batch1"][0]
    assert acc["model"] == "tiny" and acc["fxq_best"] == "fxq.native" and acc["peer_best"] is None
    assert "fxq.native" in acc["fxq_vs_fp32"]
    md = bench.markdown(written).splitlines()
    row = next(line for line in md if line.startswith("| tiny | fp32"[:7]) and "(1.00)" in line)
    assert row.count("n/a") == 2, row  # fxq.frozen and ov.nncf columns


def test_batch_failure_is_na_not_crash(tiny_registered: str, monkeypatch) -> None:
    """A path that runs at batch 1 but cannot run (nor be rebuilt) at batch 2 is n/a there."""
    def batch1_only(ctx, example):
        if example.shape[0] != 1:
            raise bench.NotAvailable("fixed batch")

        def fn(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != 1:
                raise ValueError("expected batch 1")
            return ctx.model(x)
        return fn
    monkeypatch.setitem(bench.BUILDERS, "fxq.openvino", batch1_only)
    data = bench.run([tiny_registered], ["fp32", "fxq.openvino"], [1, 2], 16, 1, None,
                     log=lambda s: None)
    rows = data["models"]["tiny"]["batches"]
    assert "wall_ms" in rows["1"]["fxq.openvino"]
    assert rows["2"]["fxq.openvino"]["na"] == "batch 2: expected batch 1; rebuild: fixed batch"


def test_cli_rejects_unknown_names(capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--models", "nope", "--json", ""])
    assert "unknown model 'nope'" in capsys.readouterr().err


class FloatIsland(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cumsum(self.a(x), 1))  # no quantized cumsum: a float island


def test_float_op_count_sees_islands() -> None:
    x = torch.randn(2, 3, 8, 8)
    ctx = bench.ModelCtx("island", "static", FloatIsland().eval(), [x], "")
    ops = bench.float_ops(bench.fxq_native(ctx), x[:1])
    assert len(ops) == 1 and ops[0].startswith("torch.cumsum"), ops
    ctx = bench.ModelCtx("tiny", "static", Tiny().eval(), [torch.randn(2, 3, 8, 8)], "")
    assert bench.float_ops(bench.fxq_native(ctx), x[:1]) == []
