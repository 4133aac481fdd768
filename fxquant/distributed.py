"""Observers across processes: calibrate (PTQ) or train (QAT) on shards of the data and give
every process the qparams of the whole.

:func:`sync_observers` all-reduces the statistics of every observer and fake-quant module of a
prepared model over ``torch.distributed``; call it on every process of the group (it is a
collective), at the same point, on models of the same structure.

=====================================  ==============================  ============================
statistics                             combined with                   equal to one process on all
                                                                       the data?
=====================================  ==============================  ============================
MinMax / PerChannelMinMax              all-reduce MIN (min_val),       yes, bit for bit: min and
                                       MAX (max_val)                   max are associative
MovingAverage(PerChannel)MinMax        all-reduce MIN / MAX            yes, bit for bit, when synced
                                                                       after every step (see below)
HistogramObserver                      union range (MIN / MAX), each   approximately: see below
                                       histogram re-binned onto it,
                                       then SUM
FixedQParams / Placeholder / Noop      nothing (no statistics)         —
=====================================  ==============================  ============================

**Moving averages.** An exponential moving average depends on the order of the batches, so
"the same as one process on all the data" needs a definition. fxquant's is the one of
synchronous data parallelism: at step t the N processes together see one global batch (the
union of their local batches), and the reference is one process that sees that global batch at
step t. The update ``v <- v + c * (batch_min - v)`` (0 < c <= 1) is monotone in ``batch_min`` —
also in float32 rounding — so when every process starts the step from the same ``v``,
``min over processes of their updated v`` *is* the update with the global batch minimum. Hence:
call ``sync_observers`` after every calibration step and the moving averages are bit-identical
to the single-process ones. (Under DDP with ``broadcast_buffers=True`` the processes start each
forward from rank 0's statistics, which are the synced ones.) Synced only once, at the end, the
result is the MIN / MAX of per-process averages: the tightest bound the processes can form —
``min_val`` is never below the single-process one, ``max_val`` never above — but not equal.

**Histograms.** One process builds its histogram incrementally: whenever a batch widens the
range, the old counts are re-binned onto the new range (each bin split into ``upsample_rate``
pieces assigned by their mid-points). Sharded, each process re-bins its own histogram once
onto the union of all ranges and the counts are summed. The total mass and the range are the
same; how the mass falls into the bins differs by the re-binning history (at most about one
bin's width of displacement per re-binning), so the L2 range search can land on a slightly
different clipping range. tests/test_distributed.py states the tolerance it checks.

Fake-quant modules: their observer is synced as above, then ``scale`` / ``zero_point`` are
refreshed from it (Python ``calculate_qparams``; a fused fake quant recomputes them with its
kernel at its next observing forward).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxquant import qmath
from fxquant.fake_quantize import FakeQuantize, FixedQParamsFakeQuantize
from fxquant.observers import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

__all__ = ["sync_observers"]


def _reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def _assign(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite a statistics buffer in place (it may change size), keeping the tensor object
    that the module — and DDP's buffer list — hold."""
    with torch.no_grad():
        buffer.resize_(value.shape)
        buffer.copy_(value)


def _sync_min_max(obs: nn.Module, group: Any) -> None:
    obs.min_val.copy_(_reduce(obs.min_val, dist.ReduceOp.MIN, group))
    obs.max_val.copy_(_reduce(obs.max_val, dist.ReduceOp.MAX, group))


def _sync_per_channel(obs: PerChannelMinMaxObserver, group: Any) -> None:
    # A process that saw no data has empty buffers: size them to the others' channel count.
    n = int(_reduce(torch.tensor([obs.min_val.numel()]), dist.ReduceOp.MAX, group)[0])
    if n == 0:
        return
    if obs.min_val.numel() == 0:
        fk = {"dtype": obs.min_val.dtype, "device": obs.min_val.device}
        lo, hi = torch.full((n,), float("inf"), **fk), torch.full((n,), float("-inf"), **fk)
    else:
        lo, hi = obs.min_val, obs.max_val
    _assign(obs.min_val, _reduce(lo, dist.ReduceOp.MIN, group))
    _assign(obs.max_val, _reduce(hi, dist.ReduceOp.MAX, group))


def _sync_histogram(obs: HistogramObserver, group: Any) -> None:
    lo = _reduce(obs.min_val, dist.ReduceOp.MIN, group)
    hi = _reduce(obs.max_val, dist.ReduceOp.MAX, group)
    if lo == float("inf") and hi == float("-inf"):
        return  # no process saw data
    if obs.min_val == float("inf"):
        local = torch.zeros_like(obs.histogram)
    else:
        local = qmath.combine_histograms(obs.histogram, obs.min_val, obs.max_val,
                                         torch.zeros_like(obs.histogram), lo, hi, obs.upsample_rate)
    total = _reduce(local.to(obs.histogram.dtype), dist.ReduceOp.SUM, group)
    _assign(obs.histogram, total)
    _assign(obs.min_val, lo)
    _assign(obs.max_val, hi)


def _sync_observer(obs: nn.Module, group: Any) -> str | None:
    """Sync one observer's statistics; returns what kind it was (None: nothing to sync)."""
    if isinstance(obs, HistogramObserver):
        _sync_histogram(obs, group)
        return "histogram"
    if isinstance(obs, PerChannelMinMaxObserver):
        _sync_per_channel(obs, group)
        return "per_channel_min_max"
    if isinstance(obs, MinMaxObserver):
        _sync_min_max(obs, group)
        return "min_max"
    return None


def _has_data(obs: nn.Module) -> bool:
    min_val = getattr(obs, "min_val", None)
    if not isinstance(min_val, torch.Tensor) or min_val.numel() == 0:
        return False
    return not bool(torch.isinf(min_val).all())


def sync_observers(prepared: nn.Module, group: Any = None) -> dict[str, int]:
    """All-reduce the statistics of every observer and fake-quant module of ``prepared`` over
    ``group`` (default: the default process group), in place; see the module docstring for
    what each kind of statistics combines to. A collective: every process of the group must
    call it with a model of the same structure. Returns how many observers of each kind were
    synced, e.g. ``{"min_max": 3, "histogram": 1, "fake_quant_refreshed": 2}``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sync_observers needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) on every process first"
        )
    stats: Counter[str] = Counter()
    modules = list(prepared.named_modules())  # same order on every process
    for _, module in modules:
        kind = _sync_observer(module, group)
        if kind is not None:
            stats[kind] += 1
    for _, module in modules:
        if isinstance(module, FakeQuantize) and not isinstance(module, FixedQParamsFakeQuantize):
            if _has_data(module.activation_post_process):
                module._refresh_qparams()
                stats["fake_quant_refreshed"] += 1
    return dict(stats)
