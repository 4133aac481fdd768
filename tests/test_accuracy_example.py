"""examples/accuracy.py and examples/accuracy_models.py, in a fast mode: briefly trained models
(real, if undertrained, weights), the example's own helpers, a few of its rows.

The full table (README "Accuracy", docs/accuracy.md) takes minutes; here each model is
trained for 15-60 steps and only the rows whose claims the docs make are checked.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import fxquant

pytest.importorskip("sklearn")

_DIR = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ex():
    _load("accuracy_models")
    return _load("accuracy")


def test_models_train_deterministically(ex):
    am = sys.modules["accuracy_models"]
    a = am._trained_digits(15)
    am._trained_digits.cache_clear()
    again = am._trained_digits(15)
    for (k, v), w in zip(a.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
    tokens, mask, labels = am.sequence_data(8, seed=0)
    assert mask.sum(1).min() >= 4 and labels.max() < am.CLASSES
    assert torch.equal(am.sequence_data(8, seed=0)[0], tokens)


def test_cnn_rows(ex):
    am = sys.modules["accuracy_models"]
    model = am.digits_cnn(steps=60)
    _, calib, test = am.digits_data()
    assert am.accuracy(model, test) > 0.6  # 0.836 after 60 steps
    batches = [(calib.x[:100],), (calib.x[100:],)]
    f = ex.run(model, test.x)
    x86 = fxquant.get_default_qconfig_mapping("x86")
    default = ex.static(model, x86, batches, "x86")
    kl, agree = ex.kl_and_agreement(f, ex.run(default, test.x))
    assert agree > 0.9 and kl < 0.05, (agree, kl)
    corrected = ex.static(model, x86, batches, "x86", correct_bias=True)
    report = corrected.meta["fxquant_bias_correction"]
    assert len(report.layers) == 11 and not report.skipped  # 10 convs and the classifier
    kl_bc, _ = ex.kl_and_agreement(f, ex.run(corrected, test.x))
    assert kl_bc < 0.05
    assert ex._clamps_folded(default) == 9  # every Conv-BN-ReLU6 fused into one kernel


def test_encoder_rows(ex):
    am = sys.modules["accuracy_models"]
    enc, head = am.masked_encoder(steps=40)
    tokens, mask, _ = am.sequence_data(128, seed=123)
    batches = [am.sequence_data(64, seed=s)[:2] for s in range(2)]
    f = ex.run(enc, tokens, mask)

    def cosine(q):
        return float(torch.nn.functional.cosine_similarity(ex.run(q, tokens, mask), f).mean())

    x86 = fxquant.get_default_qconfig_mapping("x86")
    assert cosine(ex.static(enc, x86, batches, "x86")) > 0.99
    dyn = fxquant.quantize_dynamic_fx(enc, {torch.nn.Linear: ex.per_channel_dynamic_qconfig},
                                      example_inputs=batches[0], backend="x86")
    assert cosine(dyn) > 0.99


def test_table_format(ex):
    rows = [ex.Row("float", {"cosine": 1.0}), ex.Row("x", {}, "n/a: missing")]
    md = ex.table(rows, ["cosine"], markdown=True).splitlines()
    assert md[0] == "| technique | cosine | note |" and md[-1] == "| x | n/a | n/a: missing |"
    assert "1.0000" in ex.table(rows, ["cosine"], markdown=False)
