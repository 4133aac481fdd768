"""The extension example runs and shows what it promises: the user's pass runs in the pipeline
and the user's rule makes a leaf module run on the int8 tensor."""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from fxquant.backends.registry import unregister_backend
from fxquant.meta import qinfo

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "custom_pass_and_rule.py")


def _example():
    spec = importlib.util.spec_from_file_location("custom_pass_and_rule", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_custom_pass_and_rule():
    ex = _example()
    torch.manual_seed(0)
    model = ex.Net().eval()
    plain = ex.quantize(model, "x86")
    try:
        extended = ex.quantize(model, ex.shuffle_rule_backend())
    finally:  # other tests list the registered backends
        unregister_backend("x86+shuffle")
    x = torch.randn(2, 3, 16, 16)

    def shuffle(gm):
        return next(n for n in gm.graph.nodes if n.target == "shuffle")

    assert qinfo(shuffle(plain)).last("keep_float") is not None
    assert qinfo(shuffle(extended)).kernel == "ChannelShuffle on the quantized tensor"
    # float island gone: one quantize in, one dequantize out
    calls = [n.target for n in extended.graph.nodes if n.op != "placeholder"]
    assert calls.count("dequantize") == 1
    from fxquant.measure import sqnr_db

    with torch.no_grad():
        ref = model(x)
    assert sqnr_db(ref, plain(x)) > 25 and sqnr_db(ref, extended(x)) > 25
    assert plain.meta["fxquant_stats"]["count_macs"]["macs"] == 16 * 16 * (8 * 27 + 8 * 36)
