"""Dynamic quantization of an LSTM text classifier with fxquant: the LSTM and the Linear head
run on int8 weights (torch.quantized_lstm / quantized::linear_dynamic), the embedding on 8-bit
row-wise weights (weight-only). No calibration.

    python examples/dynamic_lstm.py [--dtype qint8|float16]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

import fxquant
from fxquant.measure import interleaved_latency, model_size_bytes, sqnr_db
from fxquant.qconfig import (default_dynamic_qconfig, float16_dynamic_qconfig,
                             float_qparams_weight_only_qconfig)


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 5000, emb: int = 256, hidden: int = 512, layers: int = 2,
                 classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.fc(out[:, -1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="qint8", choices=["qint8", "float16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    tokens = torch.randint(0, 5000, (1, 50))
    dynamic = default_dynamic_qconfig if args.dtype == "qint8" else float16_dynamic_qconfig
    spec = {nn.LSTM: dynamic, nn.Linear: dynamic, nn.Embedding: float_qparams_weight_only_qconfig}
    quantized = fxquant.quantize_dynamic_fx(model, spec, getattr(torch, args.dtype), (tokens,))
    print(fxquant.report.text_report(quantized))
    with torch.no_grad():
        err = sqnr_db(model(tokens), quantized(tokens))
    t = interleaved_latency({"fp32": model, "int8": quantized}, (tokens,), rounds=7, iters=10)
    lstm_ratio = model_size_bytes(quantized.lstm) / model_size_bytes(model.lstm)
    print(f"model size   fp32 {model_size_bytes(model) / 1e6:.2f} MB -> "
          f"{model_size_bytes(quantized) / 1e6:.2f} MB; LSTM weights {lstm_ratio:.2f}x")
    print(f"output SQNR  {err:.1f} dB vs float")
    print(f"latency      batch 1: fp32 {t['fp32'] * 1e3:.2f} ms, dynamic {t['int8'] * 1e3:.2f} ms "
          f"({t['int8'] / t['fp32']:.2f}x)")


if __name__ == "__main__":
    main()
