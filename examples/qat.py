"""Quantization-aware training with fxquant on scikit-learn's bundled digits (8x8 images, 10
classes; no download): float vs post-training quantization (PTQ) vs QAT top-1 on the held-out
split, with 8-bit weights and with 4-bit weights (quant_min=-8, quant_max=7, per-tensor).

    python examples/qat.py [--backend x86|fbgemm|qnnpack|onednn] [--seed 0]

The float model trains for 15 epochs; PTQ calibrates it on 512 training images; QAT starts
from it and fine-tunes 10 more epochs with fake quantization in the loop (conv-bn folding
simulated), the observers and BatchNorm statistics frozen for the last epoch, and is converted
with convert_fx like PTQ. Every PTQ / QAT accuracy is measured on the model that actually runs:
the converted int8 GraphModule on the backend's kernels. (The extra epochs are part of what QAT
costs; at 8-bit they are also why QAT can end above float.)
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant import fake_quantize as fq
from fxquant.nn.qat import freeze_bn_stats
from fxquant.observers import MinMaxObserver
from fxquant.qconfig import QConfig

WEIGHT_BITS_4 = {"quant_min": -8, "quant_max": 7, "dtype": torch.qint8,
                 "qscheme": torch.per_tensor_symmetric}


class DigitsCNN(nn.Module):
    """A deliberately small CNN (about 500 weights): two conv-bn-relu-pool stages and a linear
    head. Small models have little redundancy, which is where 4-bit weights hurt."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(width * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))      # 8x8 -> 4x4
        x = self.pool(F.relu(self.bn2(self.conv2(x))))      # 4x4 -> 2x2
        return self.fc(torch.flatten(x, 1))


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(seed: int = 0) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.3,
                                           random_state=seed, stratify=y.numpy())
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return Data(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def batches(data: Data, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(data.y_train), generator=generator)
    for i in range(0, len(order), batch_size):
        j = order[i:i + batch_size]
        yield data.x_train[j], data.y_train[j]


def train(model: nn.Module, data: Data, epochs: int, lr: float, seed: int,
          on_epoch=None) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(model, epoch)
        model.train()
        for x, y in batches(data, 64, g):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model


@torch.no_grad()
def top1(model: nn.Module, data: Data) -> float:
    model.eval()
    pred = model(data.x_test).argmax(1)
    return 100.0 * float((pred == data.y_test).float().mean())


def ptq_mapping(backend: str, four_bit: bool):
    mapping = fxquant.get_default_qconfig_mapping(backend)
    if four_bit:
        act = mapping.global_qconfig.activation
        mapping.set_global(QConfig(activation=act, weight=MinMaxObserver.with_args(**WEIGHT_BITS_4)))
    return mapping


def qat_mapping(backend: str, four_bit: bool):
    mapping = fxquant.get_default_qat_qconfig_mapping(backend)
    if four_bit:
        act = mapping.global_qconfig.activation
        weight = fq.FusedMovingAvgObsFakeQuantize.with_args(
            observer=fq.MovingAverageMinMaxObserver, **WEIGHT_BITS_4)
        mapping.set_global(QConfig(activation=act, weight=weight))
    return mapping


def ptq(float_model: nn.Module, data: Data, backend: str, four_bit: bool) -> nn.Module:
    example = (data.x_train[:2],)
    prepared = fxquant.prepare_fx(copy.deepcopy(float_model).eval(), ptq_mapping(backend, four_bit),
                                  example, backend=backend)
    with torch.no_grad():
        for i in range(0, 512, 64):  # calibrate on 512 training images
            prepared(data.x_train[i:i + 64])
    return fxquant.convert_fx(prepared)


def qat(float_model: nn.Module, data: Data, backend: str, four_bit: bool, epochs: int,
        seed: int) -> nn.Module:
    example = (data.x_train[:2],)
    prepared = fxquant.prepare_qat_fx(copy.deepcopy(float_model).train(),
                                      qat_mapping(backend, four_bit), example, backend=backend)

    def last_epoch_freeze(model: nn.Module, epoch: int) -> None:
        if epoch == epochs - 1:  # the last epoch trains with the qparams / BN stats it will keep
            fq.disable_observer(model)
            freeze_bn_stats(model)

    train(prepared, data, epochs, lr=1e-2, seed=seed + 1, on_epoch=last_epoch_freeze)
    return fxquant.convert_fx(prepared)


def run(backend: str = "x86", seed: int = 0, float_epochs: int = 15, qat_epochs: int = 10
        ) -> dict[str, dict[str, float]]:
    """Top-1 (%) of float, PTQ and QAT at 8-bit and 4-bit weights on the held-out split."""
    torch.manual_seed(seed)
    torch.backends.quantized.engine = backend
    data = load_data(seed)
    float_model = train(DigitsCNN(), data, float_epochs, lr=1e-2, seed=seed)
    float_top1 = top1(float_model, data)
    table = {}
    for name, four_bit in (("8-bit", False), ("4-bit weights", True)):
        table[name] = {
            "float": float_top1,
            "PTQ": top1(ptq(float_model, data, backend, four_bit), data),
            "QAT": top1(qat(float_model, data, backend, four_bit, qat_epochs, seed), data),
        }
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'setting':<16}{'float':>8}{'PTQ':>8}{'QAT':>8}"]
    for name, row in table.items():
        lines.append(f"{name:<16}{row['float']:>8.2f}{row['PTQ']:>8.2f}{row['QAT']:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="x86", choices=["x86", "fbgemm", "qnnpack", "onednn"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the model is tiny: threads cost more than they give
    t0 = time.perf_counter()
    table = run(args.backend, args.seed)
    print(f"digits, top-1 (%) on the held-out 30% ({args.backend}; PTQ and QAT: converted int8 "
          f"models)")
    print(format_table(table))
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
