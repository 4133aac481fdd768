"""The bench's models: in-repo look-alikes of the CPU models people quantize, randomly initialised.

Each is written here (no torchvision, no downloads) with the layer structure and full channel
widths of the published network, because what decides int8 speed is the op mix and the tensor
shapes: ResNet-18 / ResNet-50 (basic and bottleneck residual blocks), MobileNetV2 (inverted
residuals, ReLU6), MobileNetV3-Large (hardswish, squeeze-excite gated by hardsigmoid, i.e. a
broadcasting ``mul``), ShuffleNetV2 x1.0 (channel split and shuffle, depthwise 3x3 convs on 58 /
116 / 232 channels), EfficientNet-B0 (MBConv, SiLU, sigmoid-gated SE and a stochastic-depth
look-alike that is a no-op at inference, spelled like torchvision's so a tracer keeps it as a
call), a 2-layer bidirectional LSTM text classifier and a 4-layer transformer encoder (both for
dynamic quantization).

Weights are seeded; BatchNorm running statistics are settled on one random batch
(:func:`settle_batchnorm`) so activations have realistic ranges rather than growing through
identity BatchNorms. The accuracy figures are therefore about quantization noise on random
networks (SQNR against float), not task accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------- helpers


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: Optional[Callable[[], nn.Module]] = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _divisible(v: float, divisor: int = 8) -> int:
    """Round channels the way the MobileNet papers do (multiple of 8, never below 90%)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


# ------------------------------------------------------------------------------------ ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (_conv_bn(cin, width, 1, stride) if stride != 1 or cin != width
                           else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (_conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout
                           else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], classes: int = 1000) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 64, 7, 2, act=lambda: nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks: list[nn.Module] = []
        cin = 64
        for i, n in enumerate(layers):
            width = 64 * 2 ** i
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.maxpool(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50() -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3])


# ------------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=lambda: nn.ReLU6(inplace=True)))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden,
                            act=lambda: nn.ReLU6(inplace=True)),
                   _conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=lambda: nn.ReLU6(inplace=True))]
        cin = 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, act=lambda: nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------------------- MobileNetV3
class SqueezeExcite(nn.Module):
    """Squeeze-excite: global pool → 1x1 conv → act → 1x1 conv → gate; ``x * gate`` is a
    broadcasting (N,C,1,1)×(N,C,H,W) multiply."""

    def __init__(self, channels: int, squeeze: int, act: type = nn.ReLU,
                 gate: type = nn.Hardsigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))
        return x * scale


class V3Block(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool,
                 stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_conv_bn(cin, exp, 1, act=act))
        layers.append(_conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp, _divisible(exp // 4)))
        layers.append(_conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    """MobileNetV3-Large: (kernel, expanded, out, SE, hardswish, stride) per block."""

    CONFIG = [(3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2),
              (3, 72, 24, False, False, 1), (5, 72, 40, True, False, 2),
              (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
              (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1),
              (3, 184, 80, False, True, 1), (3, 184, 80, False, True, 1),
              (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
              (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1),
              (5, 960, 160, True, True, 1)]

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
        cin = 16
        for k, exp, cout, se, hs, s in self.CONFIG:
            layers.append(V3Block(cin, k, exp, cout, se, hs, s))
            cin = cout
        layers.append(_conv_bn(cin, 960, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------------------------ ShuffleNetV2
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, stride, groups=cin),
                                         _conv_bn(cin, branch, 1, act=nn.ReLU))
        else:
            self.branch1 = nn.Identity()
        b2_in = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(_conv_bn(b2_in, branch, 1, act=nn.ReLU),
                                     _conv_bn(branch, branch, 3, stride, groups=branch),
                                     _conv_bn(branch, branch, 1, act=nn.ReLU))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 x1.0: stages of 4 / 8 / 4 units, 116 / 232 / 464 channels (58 / 116 / 232
    per branch)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, 24, 3, 2, act=nn.ReLU)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        units: list[nn.Module] = []
        cin = 24
        for repeats, cout in ((4, 116), (8, 232), (4, 464)):
            units += [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1)
                                                    for _ in range(repeats - 1)]
            cin = cout
        self.stages = nn.Sequential(*units)
        self.conv5 = _conv_bn(cin, 1024, 1, act=nn.ReLU)
        self.fc = nn.Linear(1024, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# ---------------------------------------------------------------------------- EfficientNet-B0
@torch.fx.wrap
def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth's signature and behaviour: identity unless training.
    ``torch.fx.wrap`` keeps it a ``call_function`` node in traced graphs, as torchvision's is."""
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(1.0 - p)
    return input * noise.div_(1.0 - p)


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, sd_p: float) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=nn.SiLU))
        layers += [_conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcite(hidden, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid),
                   _conv_bn(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout
        self.stochastic_depth = StochasticDepth(sd_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetB0(nn.Module):
    CONFIG = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
              (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
              (6, 3, 1, 192, 320, 1)]

    def __init__(self, classes: int = 1000, sd_prob: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=nn.SiLU)]
        total = sum(c[-1] for c in self.CONFIG)
        done = 0
        for expand, k, stride, cin, cout, n in self.CONFIG:
            for i in range(n):
                layers.append(MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1,
                                     expand, sd_prob * done / total))
                done += 1
        layers.append(_conv_bn(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- dynamic models
class LSTMClassifier(nn.Module):
    """Embedding → 2-layer bidirectional LSTM (hidden 512) → Linear on the last step."""

    def __init__(self, vocab: int = 5000, emb: int = 256, hidden: int = 512, layers: int = 2,
                 classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.fc(out[:, -1])


def _example_encoder() -> type:
    """The transformer encoder of examples/dynamic_transformer.py (embedding -> 4 post-norm
    encoder layers, d=256, 4 heads, ff 1024 -> mean -> Linear): one definition for both."""
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                        "dynamic_transformer.py")
    name = "fxquant_example_dynamic_transformer"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].Encoder


TransformerEncoder = _example_encoder()


# ------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class BenchModel:
    """One bench entry: how to build the float model and its inputs.

    ``kind`` is "static" (post-training static quantization, calibrated) or "dynamic"
    (dynamic quantization of Linear/LSTM: no calibration). ``make_input(batch, size,
    generator)`` gives one input tensor; ``size`` is the image side for CNNs ("full" 224,
    "small" 112, or any int) and is ignored by the sequence models.
    """

    name: str
    build: Callable[[], nn.Module]
    kind: str
    make_input: Callable[[int, int, torch.Generator], torch.Tensor]


def _image(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=gen)


def _tokens(vocab: int, length: int) -> Callable[[int, int, torch.Generator], torch.Tensor]:
    def make(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length), generator=gen)
    return make


MODELS: dict[str, BenchModel] = {m.name: m for m in (
    BenchModel("resnet18", resnet18, "static", _image),
    BenchModel("resnet50", resnet50, "static", _image),
    BenchModel("mobilenet_v2", MobileNetV2, "static", _image),
    BenchModel("mobilenet_v3", MobileNetV3, "static", _image),
    BenchModel("shufflenet_v2", ShuffleNetV2, "static", _image),
    BenchModel("efficientnet_b0", EfficientNetB0, "static", _image),
    BenchModel("lstm", LSTMClassifier, "dynamic", _tokens(5000, 50)),
    BenchModel("transformer", TransformerEncoder, "dynamic", _tokens(1000, 64)),
)}

SIZES = {"full": 224, "small": 112}


def settle_batchnorm(model: nn.Module, example: torch.Tensor) -> None:
    """Give every BatchNorm the statistics of one batch (momentum 1 for one train-mode pass),
    so a randomly initialised deep network has normalised activations, as a trained one has."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(example)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def build(name: str, size: int = 224, seed: int = 0) -> nn.Module:
    """The seeded float model ``name``, in eval mode, BatchNorm statistics settled."""
    spec = MODELS[name]
    torch.manual_seed(seed)
    model = spec.build().eval()
    if spec.kind == "static":
        gen = torch.Generator().manual_seed(seed + 1)
        settle_batchnorm(model, spec.make_input(4, size, gen))
    return model
