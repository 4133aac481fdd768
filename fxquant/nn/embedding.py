"""Weight-only quantized ``Embedding`` and ``EmbeddingBag`` (float out).

Rows are quantized one by one with float qparams (qscheme ``per_channel_affine_float_qparams``,
``ch_axis=0``): 8-bit (``torch.quint8``) on ``quantized::embedding_byte`` /
``quantized::embedding_bag_byte``, 4-bit (``torch.quint4x2``, even ``embedding_dim``) on
``quantized::embedding_4bit`` / ``quantized::embedding_bag_4bit``. ``from_float`` gives exactly
the weights PyTorch's eager ``quantize_dynamic`` gives (same observer math, same packing).

Bag modes. The bag kernels only sum (they ignore their ``mode`` argument; torch.ao passes
``mode=0`` and so returns sums for ``mode="mean"`` too). Here:

* ``"sum"``: the kernel, bit-identical to torch.ao (``per_sample_weights`` allowed);
* ``"mean"``: the kernel's sum divided by the bag size (empty bags give zeros, as in float);
* ``"max"``: rows looked up with the embedding kernel, then a per-bag ``amax`` (empty bags give
  zeros, as in float).

2-D ``indices`` (each row a bag) give one bag per row whatever ``include_last_offset`` says, as
in float (torch.ao's kernel call drops the last row's bag when ``include_last_offset=True``).

``padding_idx``: kept as in the float module. ``Embedding`` returns the (quantized) padding row
like the float module and torch.ao. ``EmbeddingBag`` drops padding entries from the bags before
reducing, as the float module does (torch.ao ignores ``padding_idx``; for a zero padding row both
give the same sums bit for bit, and only the float semantics give the right means).

Serialization follows ``fxquant.nn.dynamic``: ``state_dict()`` holds the unpacked quantized
``weight``; loading and unpickling re-pack it under the current quantized engine; ``repack()``
re-packs in place.
"""

import warnings
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from fxquant.nn.dynamic import (ObserverFactory, _check_dtype, _new_observer,
                                _PackedWeightsModule, _quantize_weight)

__all__ = ["Embedding", "EmbeddingBag"]

_EMBEDDING_DTYPES = (torch.quint8, torch.quint4x2)
_FLOAT_QPARAMS = torch.per_channel_affine_float_qparams
_MODES = ("sum", "mean", "max")


def _check_sizes(num_embeddings: int, embedding_dim: int, dtype: torch.dtype, owner: str) -> None:
    if num_embeddings < 1 or embedding_dim < 1:
        raise ValueError(f"{owner}: num_embeddings and embedding_dim must be >= 1")
    if dtype == torch.quint4x2 and embedding_dim % 2:
        raise ValueError(f"{owner}: 4-bit (torch.quint4x2) rows pack two values per byte, so "
                         f"embedding_dim must be even, got {embedding_dim}; use torch.quint8")


def _normalize_padding_idx(padding_idx: Optional[int], num_embeddings: int,
                           owner: str) -> Optional[int]:
    """As nn.Embedding: a negative index counts from the end."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"{owner}: padding_idx must be within num_embeddings={num_embeddings}, "
                         f"got {padding_idx}")
    return padding_idx % num_embeddings


def _placeholder_weight(num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> Tensor:
    return torch.quantize_per_channel(torch.zeros(num_embeddings, embedding_dim),
                                      torch.ones(num_embeddings), torch.zeros(num_embeddings),
                                      0, dtype)


def _embedding_weight(weight: Tensor, dtype: torch.dtype, factory: Optional[ObserverFactory],
                      owner: str) -> Tensor:
    """Observe and quantize a float embedding table row by row with float qparams."""
    obs = _new_observer(factory, dtype, owner)
    if obs.qscheme != _FLOAT_QPARAMS or getattr(obs, "ch_axis", None) != 0:
        raise ValueError(f"{owner}: embedding weights need a per_channel_affine_float_qparams "
                         f"observer with ch_axis=0, got qscheme {obs.qscheme}")
    return _quantize_weight(weight, obs)


def _owned_copy(unpacked: Tensor) -> Tensor:
    """``embedding_bag_unpack`` returns scales and zero points that borrow the packed object's
    memory (they dangle once it is freed); rebuild the table with qparams of its own.

    4-bit tables are re-quantized from their dequantized values with the same qparams, which
    gives back the same integers: (q - zp) * s / s + zp is within float rounding of q.
    """
    scales = unpacked.q_per_channel_scales().clone()
    zero_points = unpacked.q_per_channel_zero_points().clone()
    if unpacked.dtype == torch.quint8:
        return torch._make_per_channel_quantized_tensor(unpacked.int_repr(), scales, zero_points, 0)
    return torch.quantize_per_channel(unpacked.dequantize(), scales, zero_points, 0,
                                      unpacked.dtype)


def _warn_max_norm(mod: nn.Module, owner: str) -> None:
    if getattr(mod, "max_norm", None) is not None:
        warnings.warn(f"{owner}.from_float: max_norm={mod.max_norm} is ignored (quantized rows "
                      "are never renormalized; torch.ao does the same)", stacklevel=3)


class Embedding(_PackedWeightsModule):
    """Weight-only quantized ``nn.Embedding``: ``indices`` (int64 or int32) → float rows."""

    padding_idx: Optional[int]
    _owner = "fxquant.nn.embedding.Embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, dtype: torch.dtype = torch.quint8) -> None:
        super().__init__()
        self.dtype = _check_dtype(dtype, _EMBEDDING_DTYPES, self._owner)
        _check_sizes(num_embeddings, embedding_dim, dtype, self._owner)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = _normalize_padding_idx(padding_idx, num_embeddings, self._owner)
        self.engine = ""
        self.set_weight(_placeholder_weight(num_embeddings, embedding_dim, dtype))

    def forward(self, indices: Tensor) -> Tensor:
        return self._rows(indices)

    def _rows(self, indices: Tensor) -> Tensor:
        if self.dtype == torch.quint4x2:
            return torch.ops.quantized.embedding_4bit(self._packed, indices)
        return torch.ops.quantized.embedding_byte(self._packed, indices)

    def set_weight(self, weight: Tensor) -> None:
        """Pack a row-wise quantized table (``per_channel_affine_float_qparams``, axis 0)."""
        shape = (self.num_embeddings, self.embedding_dim)
        if tuple(weight.shape) != shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {shape}; build "
                             "the module with the table's sizes")
        if weight.dtype != self.dtype:
            raise ValueError(f"weight has dtype {weight.dtype} but the module was built with "
                             f"dtype={self.dtype}; build it with the weight's dtype")
        if weight.qscheme() != _FLOAT_QPARAMS or weight.q_per_channel_axis() != 0:
            raise ValueError("weight must be quantized row-wise with float qparams "
                             "(torch.per_channel_affine_float_qparams, axis 0)")
        self._packed = torch.ops.quantized.embedding_bag_prepack(weight)
        self._record_engine()

    def weight(self) -> Tensor:
        """The quantized table (a copy that owns its data and qparams)."""
        return _owned_copy(torch.ops.quantized.embedding_bag_unpack(self._packed))

    def _state_keys(self) -> List[str]:
        return ["weight"]

    def _unpacked_state(self) -> Dict[str, Tensor]:
        return {"weight": self.weight()}

    def _set_unpacked_state(self, state: Mapping[str, Tensor]) -> None:
        self.set_weight(state["weight"])

    def _packed_attrs(self) -> Tuple[str, ...]:
        return ("_packed",)

    def _get_name(self) -> str:
        return "Quantized" + type(self).__name__

    def extra_repr(self) -> str:
        s = f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + f", dtype={self.dtype}, qscheme={_FLOAT_QPARAMS}"

    @classmethod
    def from_float(cls, mod: nn.Module, weight_observer_factory: Optional[ObserverFactory] = None,
                   dtype: torch.dtype = torch.quint8) -> "Embedding":
        """Quantize a float ``nn.Embedding`` row-wise (``weight_observer_factory`` or torch's
        default float-qparams observer for ``dtype``)."""
        if not isinstance(mod, nn.Embedding):
            raise TypeError(f"{cls._owner}.from_float expects nn.Embedding, "
                            f"got {type(mod).__name__}")
        _check_dtype(dtype, _EMBEDDING_DTYPES, cls._owner)
        _warn_max_norm(mod, cls._owner)
        qmod = cls(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, dtype)
        qmod.set_weight(_embedding_weight(mod.weight, dtype, weight_observer_factory, cls._owner))
        return qmod


def _bag_sizes(indices: Tensor, offsets: Optional[Tensor],
               include_last_offset: bool) -> Tuple[Tensor, Tensor]:
    """(1-D indices, size of each bag) for 2-D indices (rows are bags) or 1-D indices + offsets."""
    if indices.dim() == 2:
        if offsets is not None:
            raise RuntimeError("EmbeddingBag: offsets must be None when indices is 2-D "
                               "(each row is a bag)")
        return indices.reshape(-1), torch.full([indices.size(0)], indices.size(1),
                                                dtype=torch.long, device=indices.device)
    if indices.dim() != 1 or offsets is None or offsets.dim() != 1:
        raise RuntimeError("EmbeddingBag: pass 2-D indices (each row a bag), or 1-D indices "
                           "with 1-D offsets (the start of each bag)")
    off = offsets.long()
    if include_last_offset:
        return indices, off[1:] - off[:-1]
    end = torch.full([1], indices.numel(), dtype=torch.long, device=indices.device)
    return indices, torch.cat([off[1:], end]) - off


def _drop_padding(indices: Tensor, sizes: Tensor, weights: Optional[Tensor],
                  padding_idx: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Remove ``padding_idx`` entries from the bags (and their per-sample weights)."""
    keep = indices != padding_idx
    bag = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes)
    sizes = torch.bincount(bag[keep], minlength=sizes.numel())
    if weights is not None:
        weights = weights[keep]
    return indices[keep], sizes, weights


def _starts(sizes: Tensor) -> Tensor:
    return torch.cumsum(sizes, 0) - sizes


class EmbeddingBag(Embedding):
    """Weight-only quantized ``nn.EmbeddingBag`` (see the module docstring for modes)."""

    _owner = "fxquant.nn.embedding.EmbeddingBag"

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "sum",
                 include_last_offset: bool = False, padding_idx: Optional[int] = None,
                 dtype: torch.dtype = torch.quint8) -> None:
        if mode not in _MODES:
            raise ValueError(f"{self._owner}: mode must be one of {_MODES}, got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, padding_idx, dtype)
        self.mode = mode
        self.include_last_offset = include_last_offset

    def forward(self, indices: Tensor, offsets: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> Tensor:
        if per_sample_weights is not None and self.mode != "sum":
            raise RuntimeError(f"EmbeddingBag: per_sample_weights need mode='sum', this bag "
                               f"has mode='{self.mode}'")
        if self.mode == "sum" and self.padding_idx is None:
            # 2-D indices have no offsets: include_last_offset must not drop the last bag
            return self._kernel_sum(indices, offsets, per_sample_weights,
                                    self.include_last_offset and indices.dim() == 1)
        flat, sizes = _bag_sizes(indices, offsets, self.include_last_offset)
        weights = per_sample_weights
        if weights is not None:
            weights = weights.reshape(-1)
        padding_idx = self.padding_idx
        if padding_idx is not None:
            flat, sizes, weights = _drop_padding(flat, sizes, weights, padding_idx)
        if self.mode == "max":
            return self._bag_max(flat, sizes)
        total = self._kernel_sum(flat, _starts(sizes), weights, False)
        if self.mode == "mean":
            return total / sizes.clamp(min=1).unsqueeze(1).to(total.dtype)
        return total

    def _kernel_sum(self, indices: Tensor, offsets: Optional[Tensor],
                    weights: Optional[Tensor], include_last_offset: bool) -> Tensor:
        if self.dtype == torch.quint4x2:
            return torch.ops.quantized.embedding_bag_4bit(
                self._packed, indices, offsets, False, 0, False, weights, None,
                include_last_offset)
        return torch.ops.quantized.embedding_bag_byte(
            self._packed, indices, offsets, False, 0, False, weights, None, include_last_offset)

    def _bag_max(self, indices: Tensor, sizes: Tensor) -> Tensor:
        rows = self._rows(indices)
        bag = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes)
        out = torch.zeros(sizes.numel(), rows.size(1), dtype=rows.dtype, device=rows.device)
        return out.scatter_reduce(0, bag.unsqueeze(1).expand_as(rows), rows, "amax",
                                  include_self=False)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", mode={self.mode}"
        return s + (", include_last_offset=True" if self.include_last_offset else "")

    @classmethod
    def from_float(cls, mod: nn.Module, weight_observer_factory: Optional[ObserverFactory] = None,
                   dtype: torch.dtype = torch.quint8) -> "EmbeddingBag":
        """Quantize a float ``nn.EmbeddingBag`` row-wise, keeping its mode,
        include_last_offset and padding_idx."""
        if not isinstance(mod, nn.EmbeddingBag):
            raise TypeError(f"{cls._owner}.from_float expects nn.EmbeddingBag, "
                            f"got {type(mod).__name__}")
        _check_dtype(dtype, _EMBEDDING_DTYPES, cls._owner)
        _warn_max_norm(mod, cls._owner)
        qmod = cls(mod.num_embeddings, mod.embedding_dim, mod.mode, mod.include_last_offset,
                   mod.padding_idx, dtype)
        qmod.set_weight(_embedding_weight(mod.weight, dtype, weight_observer_factory, cls._owner))
        return qmod
