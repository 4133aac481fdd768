"""Static post-training quantization of a ResNet-style CNN with fxquant.

The model is ordinary PyTorch: conv-bn-relu blocks, residual `+`, functional relu, pooling and
a linear head; no QuantStub, no FloatFunctional, no fuse_modules list. fxquant traces it, fuses,
calibrates on a few batches and converts it to int8 on the x86 (or ARM: qnnpack) kernels.

    python examples/static_ptq_resnet.py [--backend x86|fbgemm|qnnpack|onednn] [--dump DIR]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.measure import interleaved_latency, model_size_bytes, sqnr_db
from fxquant.options import options_of


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return F.relu(out + identity)


class ResNetish(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2),
                                    BasicBlock(4 * width, 4 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_model(seed: int = 0) -> ResNetish:
    """A ResNetish with BatchNorm statistics as a trained network would have them."""
    torch.manual_seed(seed)
    model = ResNetish()
    model.train()
    with torch.no_grad():  # a few forward passes in train mode give the BNs real statistics
        for _ in range(8):
            model(torch.randn(16, 3, 64, 64))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--dump", default=None, help="write the graph after each pass here")
    args = parser.parse_args()

    model = make_model()
    example = (torch.randn(1, 3, 64, 64),)
    mapping = fxquant.get_default_qconfig_mapping(args.backend)
    prepared = fxquant.prepare_fx(model, mapping, example, backend=args.backend, dump_dir=args.dump)
    backend = options_of(prepared).backend.name
    torch.backends.quantized.engine = backend
    with torch.no_grad():
        for i in range(args.calib_batches):
            prepared(torch.randn(8, 3, 64, 64))
            print(f"\rcalibrating {i + 1}/{args.calib_batches}", end="", flush=True)
    print()
    quantized = fxquant.convert_fx(prepared)

    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        err = sqnr_db(model(x), quantized(x))
    print(fxquant.report.text_report(quantized))
    fp32, int8 = model_size_bytes(model), model_size_bytes(quantized)
    print(f"backend            {backend}")
    print(f"model size         fp32 {fp32 / 1e6:.2f} MB -> int8 {int8 / 1e6:.2f} MB "
          f"({int8 / fp32:.2f}x)")
    print(f"output SQNR        {err:.1f} dB vs float")
    for batch in (1, 8):
        inp = (torch.randn(batch, 3, 64, 64),)
        t = interleaved_latency({"fp32": model, "int8": quantized}, inp, rounds=5, iters=5)
        print(f"latency batch {batch:<3}  fp32 {t['fp32'] * 1e3:.2f} ms, int8 {t['int8'] * 1e3:.2f} ms "
              f"(int8/fp32 = {t['int8'] / t['fp32']:.2f})")
    # the same int8 kernels without the GraphModule's Python dispatch (docs/freeze.md)
    inp = (torch.randn(1, 3, 64, 64),)
    frozen = fxquant.freeze(quantized, inp)
    t = interleaved_latency({"int8": quantized, "frozen": frozen}, inp, rounds=5, iters=5)
    print(f"frozen batch 1     int8 {t['int8'] * 1e3:.2f} ms, frozen {t['frozen'] * 1e3:.2f} ms "
          f"(frozen/int8 = {t['frozen'] / t['int8']:.2f}, fxquant.freeze)")


if __name__ == "__main__":
    main()
