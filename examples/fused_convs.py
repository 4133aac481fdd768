"""Fuse convs with what follows them for OpenVINO: ``convert_fx(..., fuse_sums=True,
fuse_activations=True)``.

An EfficientNet-style model (conv-bn-SiLU stem; inverted residual blocks: expand 1x1 + SiLU,
depthwise 3x3 + SiLU, squeeze-excite, project 1x1, + identity; a hardswish conv; a head) is
calibrated once and converted twice: the default model (each conv's output rounded, then the
SiLU / add on quantized kernels, as torch.ao does) and the fused model, where each conv that
only feeds a residual add or a SiLU / hardswish is computed with it and rounded once (oneDNN's
int8 conv with a post-op natively; the graph OpenVINO + NNCF models give OpenVINO). The script
prints each fusion fxquant decided (and why a candidate was not fused), both models' SQNR
against float and, where OpenVINO is installed (``pip install fxquant[openvino]``), both
compiled by OpenVINO: agreement with their own native model and batch-1 latency.

    python examples/fused_convs.py [--size 96]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxquant  # noqa: E402
from fxquant.measure import interleaved_latency  # noqa: E402
from fxquant.meta import qinfo  # noqa: E402
from fxquant.records import Action  # noqa: E402
from onnx_engines import within_one_step  # noqa: E402  (examples/onnx_engines.py)

FUSIONS = ("fuse_sums", "fuse_activations")  # the passes whose decisions the script prints


class MBConv(nn.Module):
    """Inverted residual block with squeeze-excite (EfficientNet's MBConv)."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        e = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False),
                                nn.BatchNorm2d(e), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(e, c // 2, 1), nn.Conv2d(c // 2, e, 1)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        s = F.adaptive_avg_pool2d(y, 1)
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(s))))
        return x + self.project(y * s)


def make_model(c: int = 24) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU(),
        MBConv(c), MBConv(c),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10))
    for m in model.modules():  # trained-looking BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()))


def fusion_decisions(qmodel: torch.fx.GraphModule) -> list[str]:
    """One line per fuse / not-fused decision of the two fusion passes."""
    lines = []
    for n in qmodel.graph.nodes:
        for d in qinfo(n).decisions:
            if d.pass_name in FUSIONS and d.action in (Action.FUSE, Action.NOT_FUSED):
                lines.append(f"{d.action.value:9s} {n.name}: {d.reason}")
    return lines


def run(size: int = 96) -> dict[str, float]:
    """Convert both ways, print the decisions, SQNR and (with OpenVINO) agreement and latency;
    returns the figures by name."""
    model = make_model()
    example = torch.randn(1, 3, size, size)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (example,),
                                  backend="x86")
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(8, 3, size, size))
    default = fxquant.convert_fx(prepared)
    fused = fxquant.convert_fx(prepared, fuse_sums=True, fuse_activations=True)
    print("\n".join(fusion_decisions(fused)))
    x = torch.randn(128, 3, size, size)  # enough outputs for the SQNR to settle (~0.1 dB)
    figures: dict[str, float] = {}
    with torch.no_grad():
        ref = model(x)
        for name, qmodel in (("default", default), ("fused", fused)):
            figures[f"sqnr {name}"] = sqnr(ref, qmodel(x))
    print(f"SQNR vs float: default {figures['sqnr default']:.1f} dB, "
          f"fused {figures['sqnr fused']:.1f} dB")
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("onnx") is None:
        print("openvino not installed (pip install fxquant[openvino]): no engine figures")
        return figures
    runners = {}
    for name, qmodel in (("default", default), ("fused", fused)):
        engine = fxquant.compile(qmodel, (example,), backend="openvino", threads=1)
        with torch.no_grad():
            figures[f"openvino {name} agreement"] = within_one_step(qmodel(x), engine(x), qmodel)
        runners[f"openvino {name}"] = engine
        print(f"openvino {name:8s} {figures[f'openvino {name} agreement']:.1%} of the outputs "
              f"within one step of its own native model")
    times = interleaved_latency(runners, (example,), rounds=5, iters=5)
    print("batch 1 latency    " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    run(parser.parse_args().size)


if __name__ == "__main__":
    main()
