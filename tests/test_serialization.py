"""Converted models survive state_dict round trips, torch.save/torch.load of the whole
GraphModule, and torch.jit.script, giving bit-identical outputs."""
from __future__ import annotations

import io

import pytest
import torch

import fxquant
from tests.models import STATIC_CASES, build, calibration_batches

CASES = [c for c in STATIC_CASES if c[0] in ("plain_cnn", "conv1d", "conv3d", "conv_transpose2d",
                                             "mlp_linear_relu", "tiny_resnet", "float_head")]


def _converted(factory, shape, backend="x86"):
    torch.backends.quantized.engine = backend
    model = build(factory)
    mapping = fxquant.get_default_qconfig_mapping(backend)
    if hasattr(model, "head"):
        mapping.set_module_name("head", None)
    prepared = fxquant.prepare_fx(model, mapping, (torch.randn(*shape),), backend=backend)
    for batch in calibration_batches(shape, n=2):
        prepared(batch)
    return prepared, fxquant.convert_fx(prepared)


@pytest.mark.parametrize("name,factory,shape", CASES, ids=[c[0] for c in CASES])
def test_script_save_load_state_dict(name, factory, shape):
    prepared, quantized = _converted(factory, shape)
    x = torch.randn(*shape)
    expected = quantized(x)

    scripted = torch.jit.script(quantized)
    assert torch.equal(scripted(x), expected)

    buf = io.BytesIO()
    torch.save(quantized, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), expected)

    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    # torch.jit.load re-packs weights under the *current* engine. On x86 that sends transposed
    # convs to onednn's quantized deconvolution, which is wrong in torch 2.13 (README, "Known
    # torch defects"): such TorchScript files must be loaded under the fbgemm engine.
    torch.backends.quantized.engine = "fbgemm" if name == "conv_transpose2d" else "x86"
    loaded_script = torch.jit.load(buf)
    torch.backends.quantized.engine = "x86"
    assert torch.equal(loaded_script(x), expected)

    fresh = fxquant.convert_fx(prepared)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(quantized.state_dict())
    assert torch.equal(fresh(x), expected)


def test_qnnpack_model_scripts():
    from tests.models import TinyResNet

    _, quantized = _converted(TinyResNet, (2, 3, 8, 8), backend="qnnpack")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(torch.jit.script(quantized)(x), quantized(x))


def test_prepared_model_is_independent_of_user_model():
    from tests.models import TinyResNet

    model = build(TinyResNet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    prepared, _ = _converted(TinyResNet, (2, 3, 8, 8))
    assert [type(m) for m in model.modules()] == modules_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
