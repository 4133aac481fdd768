"""Quantizing models that torch.fx cannot trace.

Two models with the usual untraceable idioms:

* ``GatedNet`` (static post-training quantization): a submodule whose forward branches on the
  data (``if y.abs().mean() > ...``) and a helper function that pads to a multiple of 8
  (``if pad:`` on a traced shape);
* ``TinyTextEncoder`` (dynamic quantization): Hugging Face style, with shape-dependent slicing
  of a position-id buffer, ``**kwargs`` forwarded through the layers and a dict output.

First each is prepared with ``fallback=False`` to show the error (submodule, source line,
cause, fix); then with fallback (the default), which quantizes them anyway and says what it did.

    python examples/untraceable.py
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.fallback import fallback_records, units
from fxquant.measure import sqnr_db


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.size(-1)) % multiple
    if pad:
        x = F.pad(x, (0, pad))
    return x


class Gate(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.skip = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.abs().mean() > 10:  # data-dependent control flow
            y = y / 2
        return F.relu(y) + self.skip(x)


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.gate = Gate(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(self.stem(x), 8)  # a helper with control flow, in the root forward
        return self.head(self.gate(x).mean((2, 3)))


class Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.norm1(x + self.out(attn))
        return self.norm2(x + self.ff(x))


class TinyTextEncoder(nn.Module):
    def __init__(self, vocab: int = 500, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(128, d)
        self.register_buffer("position_ids", torch.arange(128)[None], persistent=False)
        self.layers = nn.ModuleList(Layer(d) for _ in range(layers))
        self.pooler = nn.Linear(d, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> dict:
        position_ids = self.position_ids[:, : input_ids.size(1)]  # shape-dependent slicing
        x = self.tokens(input_ids) + self.positions(position_ids)
        mask = (1.0 - attention_mask[:, None, :].float()) * -1e4
        for layer in self.layers:
            x = layer(x, mask, **kwargs)  # **kwargs forwarding
        return {"last_hidden_state": x, "pooler_output": torch.tanh(self.pooler(x[:, 0]))}


def static_gated_net() -> float:
    torch.manual_seed(0)
    model = GatedNet().eval()
    mapping = fxquant.get_default_qconfig_mapping("x86")
    example = (torch.randn(2, 3, 20, 20),)
    try:
        fxquant.prepare_fx(model, mapping, example, backend="x86", fallback=False)
    except fxquant.FxQuantError as e:
        print(f"without fallback:\n{e}\n")
    prepared = fxquant.prepare_fx(model, mapping, example, backend="x86")
    for _ in range(8):
        prepared(torch.randn(2, 3, 20, 20))
    quantized = fxquant.convert_fx(prepared)
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        db = sqnr_db(model(x), quantized(x))
    _show("GatedNet, static", quantized, db)
    return db


def dynamic_text_encoder() -> float:
    torch.manual_seed(0)
    model = TinyTextEncoder().eval()
    ids = torch.randint(0, 500, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    quantized = fxquant.quantize_dynamic_fx(model, example_inputs=(ids, mask))
    with torch.no_grad():
        db = sqnr_db(model(ids, mask)["last_hidden_state"],
                     quantized(ids, mask)["last_hidden_state"])
    _show("TinyTextEncoder, dynamic", quantized, db)
    return db


def _show(title: str, quantized: nn.Module, db: float) -> None:
    print(f"{title}: {type(quantized).__name__}, {db:.1f} dB against float")
    print("  what fallback did:")
    for record in fallback_records(quantized):
        print(f"    {record}")
    print(f"  pieces: {', '.join(path or '(root)' for path, _ in units(quantized))}\n")


if __name__ == "__main__":
    static_gated_net()
    dynamic_text_encoder()
