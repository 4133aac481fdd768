"""Dynamic quantization of a hand-written transformer encoder with fxquant.

Every nn.Linear (q/k/v/out projections, the feed-forward layers with their ReLU fused) runs on
int8 weights with activations quantized on the fly; F.scaled_dot_product_attention and
LayerNorm stay float. No calibration.

    python examples/dynamic_transformer.py [--dtype qint8|float16]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.measure import interleaved_latency, model_size_bytes, sqnr_db


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        attn = F.scaled_dot_product_attention(self._split(self.q(x)), self._split(self.k(x)),
                                              self._split(self.v(x)))
        x = self.norm1(x + self.out(attn.transpose(1, 2).reshape(b, t, d)))
        return self.norm2(x + self.ff2(F.relu(self.ff1(x))))


class Encoder(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 256, heads: int = 4, ff: int = 1024,
                 layers: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ff) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def linear_weight_bytes(model: nn.Module) -> int:
    return sum(model_size_bytes(m) for m in model.modules()
               if type(m).__name__ in ("Linear", "LinearReLU") and not list(m.children()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="qint8", choices=["qint8", "float16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Encoder().eval()
    tokens = torch.randint(0, 1000, (1, 64))
    quantized = fxquant.quantize_dynamic_fx(model, None, getattr(torch, args.dtype), (tokens,))
    print(fxquant.report.text_report(quantized))
    with torch.no_grad():
        err = sqnr_db(model(tokens), quantized(tokens))
    t = interleaved_latency({"fp32": model, "int8": quantized}, (tokens,), rounds=7, iters=10)
    print(f"model size   fp32 {model_size_bytes(model) / 1e6:.2f} MB -> "
          f"{model_size_bytes(quantized) / 1e6:.2f} MB; Linear weights "
          f"{linear_weight_bytes(quantized) / linear_weight_bytes(model):.2f}x")
    print(f"output SQNR  {err:.1f} dB vs float")
    print(f"latency      batch 1: fp32 {t['fp32'] * 1e3:.2f} ms, dynamic {t['int8'] * 1e3:.2f} ms "
          f"({t['int8'] / t['fp32']:.2f}x)")


if __name__ == "__main__":
    main()
