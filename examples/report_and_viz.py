"""See every decision: the report, the drawing and the numeric debugger on the demo's CNN.

Quantizes the ResNet-style CNN of ``static_ptq_resnet.py`` (x86 backend, 8 random calibration
batches), then

* draws the converted graph, colored by decision (``fxquant.visualize``);
* writes the report with per-layer SQNR against float (``fxquant.report``) as text, Markdown
  and a self-contained HTML page;
* finds the layers that add the most noise (``fxquant.compare``), leaves the worst one float
  with ``fxquant.skip_layers``, quantizes again and draws that graph collapsed to one box
  per ``layerN.M`` block.

    python examples/report_and_viz.py [--out DIR] [--docs DIR]

``--docs docs`` (``make docs``) also refreshes the pictures in docs/ and the text report in
the README (between its ``report_and_viz`` markers).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxquant  # noqa: E402
from static_ptq_resnet import make_model  # noqa: E402

SHAPE = (8, 3, 64, 64)


def quantize(model: torch.nn.Module, mapping: fxquant.QConfigMapping,
             batches: list[torch.Tensor]) -> torch.fx.GraphModule:
    prepared = fxquant.prepare_fx(model, mapping, (batches[0][:1],), backend="x86")
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    return fxquant.convert_fx(prepared)


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- report_and_viz:begin -->", "<!-- report_and_viz:end -->"


def update_readme(text: str, path: str = README) -> bool:
    """Put ``text`` in the README's code block between the report_and_viz markers."""
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        return False
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n```\n{text}\n```\n{END}{tail}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="where the report files go (default out/)")
    parser.add_argument("--docs", default=None, help="also write the README's picture here")
    args = parser.parse_args()
    torch.backends.quantized.engine = "x86"

    model = make_model()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(*SHAPE, generator=g) for _ in range(8)]
    test = [torch.randn(*SHAPE, generator=g) for _ in range(2)]
    mapping = fxquant.get_default_qconfig_mapping("x86")
    quantized = quantize(model, mapping, calib)

    os.makedirs(args.out, exist_ok=True)
    rep = fxquant.report(quantized, float_model=model, inputs=test,
                         title="ResNetish, x86, static int8")
    print(rep.to_text())
    rep.to_html(os.path.join(args.out, "report.html"))
    rep.save(os.path.join(args.out, "report.md"))
    fxquant.visualize(quantized, os.path.join(args.out, "decisions.svg"))
    if args.docs:
        os.makedirs(args.docs, exist_ok=True)
        fxquant.visualize(quantized, os.path.join(args.docs, "decisions.svg"),
                          title="ResNetish (examples/static_ptq_resnet.py), converted for x86")
        with open(os.path.join(args.docs, "report.txt"), "w", encoding="utf-8") as f:
            f.write(rep.to_text() + "\n")
        update_readme(rep.to_text())

    worst = rep.comparison.worst_layers(1)
    print(f"\nleaving {worst} float and quantizing again")
    retry = quantize(model, fxquant.skip_layers(mapping, worst), calib)
    again = fxquant.compare(model, retry, test)
    print(f"output SQNR {rep.comparison.output_sqnr_db:.1f} dB -> {again.output_sqnr_db:.1f} dB")
    if args.docs:
        fxquant.visualize(retry, os.path.join(args.docs, "decisions_skipped.svg"),
                          collapse_depth=2,
                          title=f"the same with {', '.join(worst)} left float, collapse_depth=2")
    print(f"wrote {args.out}/report.html, report.md, decisions.svg"
          + (f"; {args.docs}/decisions.svg, decisions_skipped.svg, report.txt"
             if args.docs else ""))


if __name__ == "__main__":
    main()
