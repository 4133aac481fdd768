"""Safe model files (fxquant.save / fxquant.load / serialize.read_graph):

* a file with code in it (a pickle payload, a pickled model with a payload in one decision
  record, a JSON record naming a function to run) is refused, and the payload never runs
  (the marker file it would write stays absent; each payload is shown to be live);
* save → load gives a model with identical outputs (torch.equal) for static PTQ (x86 and
  qnnpack), QAT and dynamic (Linear + LSTM) models, from a freshly initialized float model;
* a file made from another architecture / other shapes / other options is refused with
  ArtifactMismatch;
* the state_dict carries every qparam (input quantize buffers, kernel qparams): loading it into
  a differently calibrated model gives identical outputs;
* torch.save of a prepared model, torch.load (trusted, our own file), convert_fx works.
"""
from __future__ import annotations

import copy
import io
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant
from fxquant.meta import Decision, qinfo
from fxquant.observers import MinMaxObserver
from fxquant.qconfig import QConfig
from fxquant.serialize import (ArtifactError, ArtifactMismatch, NotAnArtifactError,
                               UnsafeFileError, read_graph)
from tests.models import PlainCNN, TinyResNet, build, calibration_batches

SHAPE = (2, 3, 8, 8)


class Evil:
    """Unpickling this runs ``exec`` of code that writes ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _static(factory=TinyResNet, shape=SHAPE, backend="x86", seed=1, n=4):
    torch.backends.quantized.engine = backend
    prepared = fxquant.prepare_fx(build(factory), fxquant.get_default_qconfig_mapping(backend),
                                  (torch.randn(*shape),), backend=backend)
    with torch.no_grad():
        for batch in calibration_batches(shape, n=n, seed=seed):
            prepared(batch)
    return prepared, fxquant.convert_fx(prepared)


def _fresh(factory, seed=123):
    """Another instance of the float model class, initialized differently: load must use the
    file's weights, not these."""
    torch.manual_seed(seed)
    return factory().eval()


def _only_str_and_tensors(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _only_str_and_tensors(v) for k, v in obj.items())
    return isinstance(obj, (str, torch.Tensor))


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
@pytest.mark.parametrize("factory,shape", [(TinyResNet, SHAPE), (PlainCNN, (2, 3, 16, 16))],
                         ids=["tiny_resnet", "plain_cnn"])
def test_static_round_trip_is_identical(tmp_path, factory, shape, backend):
    _, quantized = _static(factory, shape, backend)
    path = fxquant.save(quantized, tmp_path / "m.fxq")
    raw = torch.load(path, weights_only=True)  # no code needed to read it
    assert raw["format"] == "fxquant/1" and _only_str_and_tensors(raw)
    loaded = fxquant.load(_fresh(factory), path, (torch.randn(*shape),))
    for x in calibration_batches(shape, n=3, seed=9):
        assert torch.equal(loaded(x), quantized(x))
    assert torch.jit.script(loaded)(x).equal(quantized(x))


def test_reference_model_round_trip(tmp_path):
    torch.backends.quantized.engine = "x86"
    prepared, _ = _static()
    reference = fxquant.convert_to_reference_fx(prepared)
    loaded = fxquant.load(_fresh(TinyResNet), fxquant.save(reference, tmp_path / "r.fxq"),
                          (torch.randn(*SHAPE),))
    x = torch.randn(*SHAPE)
    assert torch.equal(loaded(x), reference(x))
    assert "lower_to_backend" not in loaded.meta["fxquant_timings"]


class QatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = x + self.conv2(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_qat_round_trip_is_identical(tmp_path):
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    prepared = fxquant.prepare_qat_fx(QatNet().train(), fxquant.get_default_qat_qconfig_mapping(
        "x86"), (torch.randn(*SHAPE),))
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for x in calibration_batches((8, 3, 8, 8), n=5):
        opt.zero_grad()
        prepared(x).pow(2).mean().backward()
        opt.step()
    quantized = fxquant.convert_fx(prepared.eval())
    float_model = _fresh(QatNet)
    loaded = fxquant.load(float_model, fxquant.save(quantized, tmp_path / "q.fxq"),
                          (torch.randn(*SHAPE),))
    assert float_model.training is False  # the user's model keeps its mode
    for x in calibration_batches(SHAPE, n=3, seed=5):
        assert torch.equal(loaded(x), quantized(x))


class LstmNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2)
        self.fc = nn.Linear(16, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(F.relu(self.fc(y)))


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
def test_dynamic_round_trip_is_identical(tmp_path, dtype):
    torch.backends.quantized.engine = "x86"
    x = torch.randn(5, 2, 8)
    quantized = fxquant.quantize_dynamic_fx(_fresh(LstmNet, 0), {nn.LSTM, nn.Linear}, dtype, (x,))
    path = fxquant.save(quantized, tmp_path / "d.fxq")
    loaded = fxquant.load(_fresh(LstmNet, 7), path, (x,))
    assert torch.equal(loaded(x), quantized(x))
    assert [type(m).__name__ for m in loaded.modules()] == \
        [type(m).__name__ for m in quantized.modules()]


class Untraceable(nn.Module):
    """Data-dependent control flow in the root forward: fallback runs it eagerly and
    quantizes each child on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = self.a(x) if float(x.mean()) > 0.1 else self.b(x)
        return self.head(x.mean((2, 3)))


def test_model_quantized_piece_by_piece_round_trip(tmp_path):
    torch.backends.quantized.engine = "x86"
    prepared = fxquant.prepare_fx(_fresh(Untraceable, 0), fxquant.get_default_qconfig_mapping(
        "x86"), (torch.randn(*SHAPE),))
    for x in calibration_batches(SHAPE, n=4):
        prepared(x)
    quantized = fxquant.convert_fx(prepared)
    assert not isinstance(quantized, torch.fx.GraphModule)  # an eager root holding pieces
    loaded = fxquant.load(_fresh(Untraceable), fxquant.save(quantized, tmp_path / "u.fxq"),
                          (torch.randn(*SHAPE),))
    for x in calibration_batches(SHAPE, n=3, seed=3):
        assert torch.equal(loaded(x), quantized(x))
    pieces = {n for n, m in read_graph(tmp_path / "u.fxq").named_modules() if hasattr(m, "graph")}
    assert pieces == {n for n, m in quantized.named_modules() if isinstance(m, torch.fx.GraphModule)}


# ------------------------------------------------------------------------------ refusals
def test_pickle_payload_is_refused_without_running(tmp_path, monkeypatch, capsys):
    marker = str(tmp_path / "marker")
    evil = tmp_path / "evil.pt"
    torch.save(Evil(marker), evil)
    with pytest.raises(UnsafeFileError, match="pickled Python objects.*run code"):
        fxquant.load(_fresh(TinyResNet), evil, (torch.randn(*SHAPE),))
    with pytest.raises(UnsafeFileError):
        read_graph(evil)
    from fxquant.cli import main

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for argv in (["report", str(evil)], ["viz", str(evil), "--out", str(tmp_path / "g.dot")],
                 ["quantize", "tests.models:TinyResNet", "--example-shape", "2,3,8,8",
                  "--calib", str(evil)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "pickled Python objects" in err and "Traceback" not in err
    assert not os.path.exists(marker)
    torch.load(evil, weights_only=False)  # the payload is live: unpickling it runs it
    assert os.path.exists(marker)


def test_payload_hidden_in_a_decision_record_of_a_pickled_model(tmp_path, capsys):
    """The old model file (a pickled GraphModule): a payload in one decision record, the rest
    a real model whose report looked normal. Refused without running."""
    from fxquant.cli import main

    _, quantized = _static()
    marker = str(tmp_path / "marker")
    node = next(n for n in quantized.graph.nodes if n.op == "call_module")
    qinfo(node).decisions.append(Decision("lower_to_backend", "lower", "fine", {"x": Evil(marker)}))
    torch.save(quantized, tmp_path / "old.pt")
    assert main(["report", str(tmp_path / "old.pt")]) == 2
    assert "pickled Python objects" in capsys.readouterr().err
    with pytest.raises(UnsafeFileError):
        fxquant.load(_fresh(TinyResNet), tmp_path / "old.pt", (torch.randn(*SHAPE),))
    assert not os.path.exists(marker)


def test_payload_inside_an_fxquant_file_is_refused(tmp_path):
    _, quantized = _static()
    path = fxquant.save(quantized, tmp_path / "m.fxq")
    data = torch.load(path, weights_only=True)
    marker = str(tmp_path / "marker")
    data["tensors"]["converted"]["fc.weight"] = Evil(marker)
    torch.save(data, tmp_path / "tampered.fxq")
    with pytest.raises(UnsafeFileError):
        fxquant.load(_fresh(TinyResNet), tmp_path / "tampered.fxq", (torch.randn(*SHAPE),))
    with pytest.raises(UnsafeFileError):
        read_graph(tmp_path / "tampered.fxq")
    assert not os.path.exists(marker)


def _tamper_json(path, out, edit) -> str:
    data = torch.load(path, weights_only=True)
    doc = json.loads(data["json"])
    edit(doc)
    data["json"] = json.dumps(doc)
    torch.save(data, out)
    return str(out)


def test_json_naming_code_to_run_is_refused(tmp_path):
    """A mapping whose observer factory names subprocess.call (with the arguments that would
    write the marker) and a record naming os.system: nothing is resolved outside the
    registries, so nothing runs."""
    _, quantized = _static()
    path = fxquant.save(quantized, tmp_path / "m.fxq")
    marker = str(tmp_path / "marker")
    payload = {"factory": {"class": {"class": "subprocess.call"},
                           "kwargs": {"dict": {"args": ["touch", marker]}}}}

    def in_mapping(doc):
        doc["options"]["qconfig_mapping"]["global"]["activation"] = payload

    def in_record(doc):
        node = next(n for n in doc["units"][""] if n["op"] == "call_module")
        node["record"]["record"][1]["original"] = {"function": "os.system"}

    bad = _tamper_json(path, tmp_path / "bad.fxq", in_mapping)
    with pytest.raises(ArtifactError, match="names class 'subprocess.call'.*refused"):
        fxquant.load(_fresh(TinyResNet), bad, (torch.randn(*SHAPE),))
    bad2 = _tamper_json(path, tmp_path / "bad2.fxq", in_record)
    with pytest.raises(ArtifactError, match="names function 'os.system'"):
        read_graph(bad2)
    assert not os.path.exists(marker)
    import subprocess

    subprocess.call(["touch", marker])  # the payload's call is real
    assert os.path.exists(marker)


def test_file_of_another_architecture_is_refused(tmp_path):
    _, quantized = _static(PlainCNN, (2, 3, 16, 16))
    path = fxquant.save(quantized, tmp_path / "plain.fxq")
    with pytest.raises(ArtifactMismatch, match="made from another model") as e:
        fxquant.load(_fresh(TinyResNet), path, (torch.randn(*SHAPE),))
    assert "float model class" in e.value.hint


def test_file_of_other_shapes_is_refused(tmp_path):
    def mlp(hidden):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 2)).eval()

    prepared = fxquant.prepare_fx(mlp(4), fxquant.get_default_qconfig_mapping("x86"),
                                  (torch.randn(4, 6),))
    prepared(torch.randn(16, 6))
    path = fxquant.save(fxquant.convert_fx(prepared), tmp_path / "mlp.fxq")
    with pytest.raises(ArtifactMismatch, match="does not fit the given float model.*size"):
        fxquant.load(mlp(5), path, (torch.randn(4, 6),))
    assert fxquant.load(mlp(4), path, (torch.randn(4, 6),)) is not None


def test_other_options_are_refused(tmp_path):
    _, quantized = _static()
    path = fxquant.save(quantized, tmp_path / "m.fxq")
    other = fxquant.get_default_qconfig_mapping("x86").set_module_name("fc", None)
    with pytest.raises(ArtifactMismatch):
        fxquant.load(_fresh(TinyResNet), path, (torch.randn(*SHAPE),), qconfig_mapping=other)


@pytest.mark.parametrize("what", ["text", "state_dict", "tensor", "directory", "missing"])
def test_not_a_model_file(tmp_path, what):
    path = tmp_path / "x.pt"
    if what == "text":
        path.write_text("hello")
    elif what == "state_dict":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    elif what == "tensor":
        torch.save(torch.randn(3), path)
    elif what == "directory":
        path.mkdir()
    with pytest.raises(ArtifactError) as e:
        read_graph(path)
    assert type(e.value) is (ArtifactError if what == "missing" else NotAnArtifactError)
    assert "fxquant.save" in e.value.hint


# ------------------------------------------------------------------------------ user observers
class MyObserver(MinMaxObserver):
    """A user observer class: no JSON form, so the file is saved without its mapping."""


def test_unsaveable_mapping_needs_qconfig_mapping_at_load(tmp_path):
    torch.backends.quantized.engine = "x86"
    mapping = fxquant.get_default_qconfig_mapping("x86")
    mapping.set_global(QConfig(MyObserver.with_args(reduce_range=True),
                               mapping.global_qconfig.weight))
    prepared = fxquant.prepare_fx(build(TinyResNet), mapping, (torch.randn(*SHAPE),))
    for batch in calibration_batches(SHAPE):
        prepared(batch)
    quantized = fxquant.convert_fx(prepared)
    path = fxquant.save(quantized, tmp_path / "m.fxq")
    doc = json.loads(torch.load(path, weights_only=True)["json"])
    assert "MyObserver" in doc["options"]["qconfig_mapping_unsaved"]
    with pytest.raises(ArtifactError, match="saved without its QConfigMapping") as e:
        fxquant.load(_fresh(TinyResNet), path, (torch.randn(*SHAPE),))
    assert "qconfig_mapping=" in e.value.hint
    loaded = fxquant.load(_fresh(TinyResNet), path, (torch.randn(*SHAPE),),
                          qconfig_mapping=mapping)
    x = torch.randn(*SHAPE)
    assert torch.equal(loaded(x), quantized(x))


# ------------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_state_dict_carries_every_qparam(backend):
    """Input quantize qparams (buffers) and kernel qparams (quantized::add_relu's output
    scale / zero point) are in the state_dict: a differently calibrated model that loads it
    computes what the saved one does."""
    _, a = _static(backend=backend, seed=1, n=4)
    _, b = _static(backend=backend, seed=2, n=1)
    state = a.state_dict()
    assert {"x_qparams.scale", "x_qparams.zero_point", "fxquant_kernel_qparams.0.scale",
            "fxquant_kernel_qparams.1.zero_point"} <= set(state)
    assert state["x_qparams.scale"].item() != b.state_dict()["x_qparams.scale"].item()
    xs = calibration_batches(SHAPE, n=2, seed=7)
    assert not all(torch.equal(a(x), b(x)) for x in xs)
    b.load_state_dict(state)
    for x in xs:
        assert torch.equal(b(x), a(x))
        assert torch.equal(torch.jit.script(b)(x), a(x))
    del state["fxquant_kernel_qparams.0.scale"]
    with pytest.raises(RuntimeError, match="fxquant_kernel_qparams.0.scale"):
        b.load_state_dict(state)


# ------------------------------------------------------------------------------ pickled prepared
@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_pickled_prepared_model_converts(qat):
    """torch.fx drops node.meta and gm.meta when it pickles a GraphModule (it re-traces the
    generated code on load); fxquant's records and options ride along and come back."""
    torch.backends.quantized.engine = "x86"
    if qat:
        torch.manual_seed(0)
        prepared = fxquant.prepare_qat_fx(QatNet().train(),
                                          fxquant.get_default_qat_qconfig_mapping("x86"),
                                          (torch.randn(*SHAPE),))
        prepared(torch.randn(8, 3, 8, 8))
        prepared.eval()
    else:
        prepared, _ = _static()
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)  # our own, trusted file
    assert "fxquant_options" not in clone.meta  # what torch.fx gives back ...
    converted = fxquant.convert_fx(clone)  # ... and convert still works
    expected = fxquant.convert_fx(prepared)
    x = torch.randn(*SHAPE)
    assert torch.equal(converted(x), expected(x))
    assert fxquant.report.build(converted).to_text() == fxquant.report.build(expected).to_text()


def test_pickled_prepared_model_with_unpicklable_records_says_so():
    torch.backends.quantized.engine = "x86"
    prepared, _ = _static()
    node = next(n for n in prepared.graph.nodes if n.op == "call_module")
    qinfo(node).decisions.append(Decision("annotate", "note", "a lambda", {"f": lambda: 0}))
    clone = torch.load(_saved(prepared), weights_only=False)
    with pytest.raises(fxquant.FxQuantError, match="do not pickle"):
        fxquant.convert_fx(clone)


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------------ records only
def test_read_graph_gives_the_same_report_and_drawing(tmp_path):
    from fxquant.report import rows
    from fxquant.viz import to_dot

    _, quantized = _static()
    recorded = read_graph(fxquant.save(quantized, tmp_path / "m.fxq"))
    assert rows(recorded) == rows(quantized)
    assert fxquant.report.build(recorded).to_text() == fxquant.report.build(quantized).to_text()
    assert to_dot(recorded).source == to_dot(quantized).source
    with pytest.raises(ArtifactError, match="does not run"):
        recorded(torch.randn(*SHAPE))


def test_save_refuses_what_fxquant_did_not_convert(tmp_path):
    from fxquant.serialize import NotSaveableError

    with pytest.raises(NotSaveableError, match="not a model converted by fxquant"):
        fxquant.save(nn.Linear(2, 2), tmp_path / "x.fxq")
    prepared, quantized = _static()
    clone = copy.deepcopy(quantized)
    del clone.meta["fxquant_prepared_state"]
    with pytest.raises(NotSaveableError, match="does not hold the state"):
        fxquant.save(clone, tmp_path / "y.fxq")


@pytest.mark.parametrize("change", ["int_representation", "bias_correction"])
def test_save_refuses_models_load_would_not_rebuild(change: str, tmp_path) -> None:
    """load re-prepares and converts the float model: a model in the integer representation
    or bias-corrected after convert would come back different, so save refuses it, saying
    what to do instead (not load's "rebuilt graph differs" later)."""
    from fxquant.serialize import NotSaveableError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("qnnpack"), (x,),
                                  backend="qnnpack")
    prepared(x)
    if change == "int_representation":
        quantized = fxquant.convert_fx(copy.deepcopy(prepared), representation="int")
        expected = "integer representation"
    else:
        quantized = fxquant.bias_correction(prepared, [x])
        expected = "bias-corrected"
    with pytest.raises(NotSaveableError, match=expected) as err:
        fxquant.save(quantized, tmp_path / "m.fxq")
    assert err.value.hint
    assert not (tmp_path / "m.fxq").exists()


def test_load_replays_the_saved_engine_choices(tmp_path) -> None:
    """Lowering's per-layer engine choice is measured (timings): load must not measure again
    and maybe pick another engine (other outputs) but repack each conv as saved."""
    from fxquant.backends import engine_choice

    if not {"x86", "onednn"} <= set(torch.backends.quantized.supported_engines):
        pytest.skip("needs the x86 and onednn engines")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(1, 16, 16, 16)
    torch.backends.quantized.engine = "x86"
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (x,),
                                  backend="x86")
    prepared(x)
    with engine_choice.options(force="onednn", min_kernel_ms=0.0):
        quantized = fxquant.convert_fx(prepared)
    packed = {n: getattr(m, "packed_engine", None) for n, m in quantized.named_modules()}
    assert "onednn" in packed.values()
    fxquant.save(quantized, tmp_path / "m.fxq")
    with engine_choice.options(enabled=False):  # a load that would not choose onednn itself
        loaded = fxquant.load(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16),
                                            nn.ReLU(), nn.Conv2d(16, 8, 1)),
                              tmp_path / "m.fxq", (x,))
    assert {n: getattr(m, "packed_engine", None) for n, m in loaded.named_modules()} == packed
    xs = torch.randn(3, 16, 16, 16)
    assert torch.equal(loaded(xs), quantized(xs))
