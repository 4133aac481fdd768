"""Two processes over gloo on the loopback interface (127.0.0.1, GLOO_SOCKET_IFNAME=lo), started
with torch.multiprocessing and bounded in time:

* sharded PTQ calibration + sync_observers gives the qparams of one process calibrating on all
  the data: bit-identical for min/max observers (also when one process saw no data) and for
  moving-average observers synced after every step (the synchronous data-parallel meaning of
  "all the data", see fxquant.distributed); histogram observers within the tolerance below;
* a prepared QAT model trains under DistributedDataParallel; the processes keep identical
  weights, sync_observers makes their fake-quant statistics identical, and they convert to the
  same quantized model.

Histogram tolerance (HIST_*): sharded, each process re-bins its histogram once onto the union
range; one process re-bins incrementally as the range grows. Same range, same total mass,
different bin placement. Tolerance: scales within 1%, zero points within 1 step (measured on
this data: 0.39% and 0 steps).
"""
from __future__ import annotations

import functools
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxquant
from fxquant import fake_quantize as fq
from fxquant.distributed import sync_observers
from fxquant.observers import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                               PerChannelMinMaxObserver)
from fxquant.qconfig import QConfig, QConfigMapping, default_per_channel_weight_observer

WORLD = 2
TIME_LIMIT_S = 120
HIST_SCALE_RTOL = 0.01
HIST_ZP_ATOL = 1

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def _global_batches(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Global batches of 8 with different ranges (so the statistics keep moving)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 6, 6, generator=g) * (1 + 0.5 * i) + 0.2 * i for i in range(n)]


def _mapping(observer) -> QConfigMapping:
    return QConfigMapping().set_global(QConfig(activation=observer,
                                               weight=default_per_channel_weight_observer))


MAPPINGS = {
    "min_max": _mapping(MinMaxObserver.with_args(reduce_range=True)),
    "moving_average": _mapping(MovingAverageMinMaxObserver.with_args(averaging_constant=0.1)),
    "histogram": _mapping(HistogramObserver.with_args(reduce_range=True, bins=256)),
}


def _prepared(kind: str):
    return fxquant.prepare_fx(_model().eval(), MAPPINGS[kind], (torch.randn(2, 3, 6, 6),), backend="x86")


def _observer_state(gm) -> dict[str, tuple]:
    out = {}
    for name, m in gm.named_modules():
        if hasattr(m, "calculate_qparams") and hasattr(m, "min_val"):
            scale, zp = m.calculate_qparams()
            out[name] = (scale.clone(), zp.clone(), m.min_val.clone(), m.max_val.clone())
    return out


def _shard(batch: torch.Tensor, rank: int) -> torch.Tensor:
    n = batch.shape[0] // WORLD
    return batch[rank * n:(rank + 1) * n]


# ---------------------------------------------------------------- what each process runs

def _calibrate(rank: int) -> dict:
    out = {}
    batches = _global_batches()
    for kind in ("min_max", "histogram"):  # each process calibrates on its share of the batches
        gm = _prepared(kind)
        with torch.no_grad():
            for batch in batches[rank::WORLD]:
                gm(batch)
        out[kind + "_synced"] = sync_observers(gm)
        out[kind] = _observer_state(gm)
    gm, once = _prepared("moving_average"), _prepared("moving_average")
    with torch.no_grad():
        for batch in batches:  # synchronous data parallel: each step half of a global batch
            gm(_shard(batch, rank))
            sync_observers(gm)
            once(_shard(batch, rank))
    sync_observers(once)
    out["moving_average"], out["moving_average_once"] = _observer_state(gm), _observer_state(once)
    # observers where rank 1 sees nothing: its empty / infinite statistics must not matter
    lone = nn.ModuleDict({"t": MinMaxObserver(), "c": PerChannelMinMaxObserver(ch_axis=1)})
    if rank == 0:
        lone["t"](batches[0])
        lone["c"](batches[0])
    sync_observers(lone)
    out["lone"] = {k: (m.min_val.clone(), m.max_val.clone()) for k, m in lone.items()}
    return out


def _train_ddp(rank: int) -> dict:
    torch.manual_seed(0)
    prepared = fxquant.prepare_qat_fx(_model().train(), fxquant.get_default_qat_qconfig_mapping("x86"),
                                      (torch.randn(2, 3, 6, 6),), backend="x86")
    ddp = nn.parallel.DistributedDataParallel(prepared)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    before = {k: v.detach().clone() for k, v in prepared.named_parameters()}
    losses = []
    for _ in range(4):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        loss = nn.functional.cross_entropy(ddp(_shard(x, rank)), _shard(y, rank))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    unsynced = {k: v.clone() for k, v in prepared.state_dict().items() if "activation_post_process" in k}
    sync_observers(prepared)
    for name, buf in prepared.named_buffers():  # BatchNorm statistics: rank 0's, as DDP's
        if ".bn." in name:                         # broadcast_buffers does at each forward
            dist.broadcast(buf, 0)
    fq.disable_observer(prepared)
    prepared.eval()
    x = torch.randn(4, 3, 6, 6, generator=g)
    with torch.no_grad():
        converted_out = fxquant.convert_fx(prepared)(x)
    return {"params": {k: v.detach().clone() for k, v in prepared.named_parameters()},
            "before": before, "losses": losses, "unsynced": unsynced,
            "state": {k: v.clone() for k, v in prepared.state_dict().items()},
            "converted_out": converted_out}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {"calibration": _calibrate(rank), "ddp": _train_ddp(rank)}
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(outdir: str) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIME_LIMIT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} processes did not finish within {TIME_LIMIT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs the processes once per test session, also when pytest-xdist spreads these tests
    over several workers (they share the session's base temp directory; a file lock elects
    the one that runs them)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    outdir = root / "fxquant_test_distributed"
    with FileLock(str(root / "fxquant_test_distributed.lock")):
        if not (outdir / "done").exists():
            outdir.mkdir(exist_ok=True)
            _spawn(str(outdir))
            (outdir / "done").write_text("ok")
    return [torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)]


@functools.lru_cache(maxsize=None)
def _single_process() -> dict:
    torch.set_num_threads(1)
    out = {}
    batches = _global_batches()
    for kind in ("min_max", "histogram"):
        gm = _prepared(kind)
        with torch.no_grad():
            for batch in batches:
                gm(batch)
        out[kind] = _observer_state(gm)
    gm = _prepared("moving_average")
    with torch.no_grad():
        for batch in batches:
            gm(batch)
    out["moving_average"] = _observer_state(gm)
    return out


# ---------------------------------------------------------------- the tests

def _assert_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), f"{what}: {name}: {x} != {y}"


def test_min_max_and_moving_average_equal_single_process_calibration(results):
    single = _single_process()
    for rank in range(WORLD):
        cal = results[rank]["calibration"]
        _assert_identical(cal["min_max"], single["min_max"], f"min_max rank {rank}")
        _assert_identical(cal["moving_average"], single["moving_average"], f"moving average rank {rank}")
    assert results[0]["calibration"]["min_max_synced"]["min_max"] == 4


def test_moving_average_synced_once_is_the_tightest_bound(results):
    single = _single_process()["moving_average"]
    once = results[0]["calibration"]["moving_average_once"]
    assert any(not torch.equal(once[k][2], single[k][2]) for k in once), "expected a difference"
    for name, (_, _, lo, hi) in once.items():
        assert bool((lo >= single[name][2]).all()) and bool((hi <= single[name][3]).all()), name


def test_observer_that_saw_no_data_does_not_disturb_the_others(results):
    x = _global_batches()[0]
    lo_c, hi_c = torch.aminmax(x.transpose(0, 1).flatten(1), dim=1)
    for rank in range(WORLD):
        lone = results[rank]["calibration"]["lone"]
        assert float(lone["t"][0]) == float(x.min()) and float(lone["t"][1]) == float(x.max())
        assert torch.equal(lone["c"][0], lo_c) and torch.equal(lone["c"][1], hi_c)


def test_histogram_within_documented_tolerance(results):
    single = _single_process()["histogram"]
    synced = results[0]["calibration"]["histogram"]
    _assert_identical(synced, results[1]["calibration"]["histogram"], "histogram ranks agree")
    worst = (0.0, 0)
    for name, (scale, zp, lo, hi) in synced.items():
        s_scale, s_zp, s_lo, s_hi = single[name]
        worst = (max(worst[0], abs(float(scale) / float(s_scale) - 1)), max(worst[1], abs(int(zp) - int(s_zp))))
        assert torch.equal(lo, s_lo) and torch.equal(hi, s_hi), "same union range"
        assert abs(float(scale) / float(s_scale) - 1) <= HIST_SCALE_RTOL, (name, scale, s_scale)
        assert abs(int(zp) - int(s_zp)) <= HIST_ZP_ATOL, (name, zp, s_zp)
    print(f"histogram: worst scale ratio - 1 = {worst[0]:.4f}, worst zero-point difference = {worst[1]}")


def test_ddp_training_of_a_qat_model(results):
    r0, r1 = results[0]["ddp"], results[1]["ddp"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"DDP keeps weights identical: {name}"
    assert any(not torch.equal(p, r0["before"][name]) for name, p in r0["params"].items())
    differed = [k for k, v in r0["unsynced"].items() if not torch.equal(v, r1["unsynced"][k])]
    assert differed, "each process observed its own shard before sync_observers"
    for name, v in r0["state"].items():
        assert torch.equal(v, r1["state"][name]), f"after sync_observers: {name}"
    assert torch.equal(r0["converted_out"], r1["converted_out"])
