"""Small float models the tests quantize. Each factory returns (model in eval mode, example input
builder). Kept tiny so the whole suite stays fast on 2 cores."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.pool2 = nn.MaxPool2d(2)
        self.relu2 = nn.ReLU6()  # after a pool, so it stays a standalone (shared-qparams) op
        self.avg = nn.AdaptiveAvgPool2d((1, 1))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.relu2(self.pool2(self.conv2(x)))
        x = torch.flatten(self.avg(x), 1)
        return self.fc(self.drop(x))


class ConvBnReLUChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers = []
        c = 3
        for out in (8, 16, 16):
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.relu(self.bn(x))
        return self.head(x)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2, groups=2)
        self.pool = nn.AvgPool1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.pool(F.relu(self.conv2(x)))


class ReLUSpellings(nn.Module):
    """Every way of writing ReLU after a conv: torch.ao fuses only nn.ReLU and F.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(6))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.convs[0](x))
        x = F.relu(self.convs[1](x))
        x = torch.relu(self.convs[2](x))
        x = self.convs[3](x).relu()
        x = self.convs[4](x).relu_()
        return F.relu(self.convs[5](x), inplace=True)


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.conv2 = nn.Conv3d(4, 4, 1)
        self.pool = nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        return self.pool(self.conv2(x))


class ConvTransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.up2 = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = self.bn(self.up(x))
        return self.up2(x)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        x = self.bn(self.fc2(x))
        return self.fc3(F.relu(x) if self.bn_relu else x)

    bn_relu = False


class MLPBnReLU(MLP):
    """Linear + BatchNorm1d + ReLU: fxquant folds and fuses all three; torch.ao leaves the ReLU."""

    bn_relu = True


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class WithFloatHead(nn.Module):
    """A submodule that the tests leave float with qconfig None."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(F.relu(self.stem(x))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        self.layer1 = Block(16)
        self.layer2 = Block(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial statistics so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


ModelCase = tuple[str, Callable[[], nn.Module], tuple[int, ...]]

STATIC_CASES: list[ModelCase] = [
    ("plain_cnn", PlainCNN, (2, 3, 16, 16)),
    ("conv_bn_relu_chain", ConvBnReLUChain, (2, 3, 8, 8)),
    ("conv1d", Conv1dNet, (2, 4, 32)),
    ("conv3d", Conv3dNet, (1, 2, 6, 8, 8)),
    ("conv_transpose2d", ConvTransposeNet, (2, 3, 8, 8)),
    ("mlp_linear_relu", MLP, (8, 32)),
    ("tiny_resnet", TinyResNet, (2, 3, 8, 8)),
    ("float_head", WithFloatHead, (2, 3, 8, 8)),
]


def build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_bn(factory(), seed).eval()


def calibration_batches(shape: tuple[int, ...], n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]
