"""Two small real-weights models trained in seconds, for accuracy work (no downloads, no fxquant).

Quantization accuracy on random weights says little: real weights have per-channel ranges,
outliers and BatchNorm statistics that random ones lack. These models are trained here, seeded
and deterministic, from data that ships with scikit-learn or is generated:

* :func:`digits_cnn` - a MobileNet-style depthwise-separable CNN (Conv-BN-ReLU6 everywhere, one
  inverted-residual block with an add) trained on scikit-learn's 8x8 digits, upsampled to
  16x16. About 97% test accuracy after ~3 s of training on one core.
* :func:`masked_encoder` - a 2-layer BERT-style encoder (attention written with nn.Linear,
  matmul, softmax and an additive padding mask ``(1 - mask) * -1e4``, GELU feed-forward,
  LayerNorm) whose forward returns a masked-mean sentence embedding. It is trained, with a
  linear head, on a synthetic task with variable-length padded sequences whose padding holds
  random tokens, so that a broken mask changes the answer.

Trained weights are cached in memory only (``functools.lru_cache``); every call returns a fresh
copy of the trained model. ``python examples/accuracy_models.py`` trains both and prints their
accuracy.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------- digits CNN
@dataclass(frozen=True)
class Split:
    """Inputs and labels of one split."""

    x: torch.Tensor
    y: torch.Tensor


@functools.lru_cache(maxsize=None)
def digits_data(size: int = 16) -> tuple[Split, Split, Split]:
    """scikit-learn's digits as (train, calibration, test) splits of (N, 1, size, size) images
    normalized to mean 0 / std 1. The split is a fixed permutation (seed 0): 1097 / 200 / 500.
    Calibration images are never trained on, like a user's held-out calibration set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return Split(x[:1097], y[:1097]), Split(x[1097:1297], y[1097:1297]), Split(x[1297:], y[1297:])


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1 (no activation), add."""

    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        h = c * expand
        self.expand = _cbr(c, h, 1)
        self.dw = _cbr(h, h, 3, groups=h)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


class DigitsNet(nn.Module):
    """Depthwise-separable CNN with ReLU6, for 1x16x16 inputs and 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _cbr(1, 16),                                   # 16x16
            _cbr(16, 16, 3, 1, groups=16), _cbr(16, 32, 1),
            _cbr(32, 32, 3, 2, groups=32), _cbr(32, 48, 1),  # 8x8
            InvertedResidual(48, 2),
            _cbr(48, 48, 3, 2, groups=48), _cbr(48, 64, 1),  # 4x4
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _train(model: nn.Module, batches, steps: int, lr: float, seed: int) -> None:
    """Adam with a cosine schedule; ``batches(generator)`` yields (inputs, labels) tuples."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        *inputs, y = batches(gen)
        loss = F.cross_entropy(model(*inputs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@functools.lru_cache(maxsize=None)
def _trained_digits(steps: int) -> DigitsNet:
    train, _, _ = digits_data()
    torch.manual_seed(0)
    model = DigitsNet()

    def batches(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(train.y), (64,), generator=gen)
        return train.x[idx], train.y[idx]

    with _one_thread():
        _train(model, batches, steps, 3e-3, seed=0)
    return model


def digits_cnn(steps: int = 200) -> DigitsNet:
    """A trained :class:`DigitsNet` in eval mode (a fresh copy; training is cached)."""
    return copy.deepcopy(_trained_digits(steps))


def accuracy(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        return float((model(split.x).argmax(1) == split.y).float().mean())


# ------------------------------------------------------------------------------- encoder
VOCAB, PAD_VOCAB, MAX_LEN, CLASSES = 12, 4, 16, 4


class SelfAttention(nn.Module):
    """Multi-head self-attention as HF BERT writes it: Linear projections, matmul, an additive
    mask, softmax, matmul."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dh).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh)
        probs = torch.softmax(scores + additive_mask, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, d)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.attention = SelfAttention(d, heads)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, additive_mask))
        return self.norm2(x + self.ff2(F.gelu(self.ff1(x))))


class MaskedEncoder(nn.Module):
    """Token + position embeddings, ``layers`` encoder layers, masked mean pooling.

    ``forward(tokens, mask)``: tokens (B, T) int64, mask (B, T) with 1 for real tokens and 0
    for padding; returns the (B, d) sentence embedding."""

    def __init__(self, d: int = 64, heads: int = 4, ff: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Embedding(MAX_LEN, d)
        self.norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ff) for _ in range(layers))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.norm(self.tokens(tokens) + self.positions(pos))
        additive_mask = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive_mask)
        m = mask[:, :, None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1)


class _EncoderClassifier(nn.Module):
    def __init__(self, encoder: MaskedEncoder) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.norm.normalized_shape[0], CLASSES)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens, mask))


def sequence_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, mask, labels): lengths 4..16; real tokens in [0, VOCAB); the label is the most
    frequent of the tokens 0..CLASSES-1 among the real tokens (ties: the smallest). Padding
    positions hold random tokens from the same range, so only a working mask gets it right."""
    lengths = torch.randint(4, MAX_LEN + 1, (n,), generator=gen)
    tokens = torch.randint(0, VOCAB, (n, MAX_LEN), generator=gen)
    mask = (torch.arange(MAX_LEN)[None, :] < lengths[:, None]).long()
    counts = torch.stack([((tokens == c) & (mask == 1)).sum(1) for c in range(CLASSES)], 1)
    labels = (counts * CLASSES + (CLASSES - 1 - torch.arange(CLASSES))).argmax(1)
    return tokens, mask, labels


@functools.lru_cache(maxsize=None)
def _trained_encoder(steps: int) -> MaskedEncoder:
    torch.manual_seed(0)
    model = _EncoderClassifier(MaskedEncoder())
    with _one_thread():
        _train(model, lambda gen: sequence_batch(64, gen), steps, 2e-3, seed=1)
    return model.encoder.eval(), model.head.eval()


def masked_encoder(steps: int = 150) -> tuple[MaskedEncoder, nn.Linear]:
    """(trained :class:`MaskedEncoder`, its classification head), fresh copies, eval mode."""
    enc, head = _trained_encoder(steps)
    return copy.deepcopy(enc), copy.deepcopy(head)


def sequence_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed batch of ``n`` sequences (see :func:`sequence_batch`)."""
    return sequence_batch(n, torch.Generator().manual_seed(seed))


class _one_thread:
    """Train on one thread: results do not depend on the machine's core count, and a shared
    machine is not swamped."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.n)


if __name__ == "__main__":
    t0 = time.perf_counter()
    cnn = digits_cnn()
    t1 = time.perf_counter()
    print(f"digits CNN: test accuracy {accuracy(cnn, digits_data()[2]):.3f} "
          f"(trained in {t1 - t0:.1f} s)")
    enc, head = masked_encoder()
    t2 = time.perf_counter()
    tokens, mask, labels = sequence_data(1000, seed=123)
    with torch.no_grad():
        acc = float((head(enc(tokens, mask)).argmax(1) == labels).float().mean())
    print(f"masked encoder: test accuracy {acc:.3f} (trained in {t2 - t1:.1f} s)")
