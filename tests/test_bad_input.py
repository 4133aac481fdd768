"""Bad input gets a specific FxQuantError subclass, at the earliest point, naming what is wrong
(module path / node / the misspelled name with the closest ones) and the fix; the user's model
is never modified by any API."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import observers as O
from fxquant.errors import (CalibrationDataError, CalibrationWarning, ConfigError, ConfigTypeError,
                            ConfigWarning, ExampleInputsError, FxQuantError, InputError,
                            ModelModeError, ModelModeWarning, NonFiniteParameterError,
                            UnknownNameError, UnsupportedDtypeError)
from fxquant.fake_quantize import get_default_qat_qconfig_mapping
from fxquant.qconfig import QConfig, QConfigMapping, default_weight_observer

X = (torch.randn(2, 3, 8, 8),)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.stem(x))
        return self.fc(self.drop(y.mean((2, 3))))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def mapping() -> QConfigMapping:
    return fxquant.get_default_qconfig_mapping("x86")


_DEFAULT = object()


def prepare(model: nn.Module, qconfig_mapping=_DEFAULT, example_inputs=X, **kwargs):
    return fxquant.prepare_fx(model, mapping() if qconfig_mapping is _DEFAULT else qconfig_mapping,
                              example_inputs, backend="x86", **kwargs)


def test_every_bad_input_error_is_an_fxquant_error():
    for cls in (ModelModeError, UnsupportedDtypeError, CalibrationDataError, ConfigError,
                ConfigTypeError, UnknownNameError, ExampleInputsError, NonFiniteParameterError):
        assert issubclass(cls, InputError) and issubclass(cls, FxQuantError), cls
    # where a builtin type was raised before, the subclass is that type too
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigTypeError, TypeError)
    assert issubclass(CalibrationDataError, ValueError)


# -- 1. train / eval modes ---------------------------------------------------------------


def test_prepare_fx_refuses_a_model_in_training_mode():
    with pytest.raises(ModelModeError) as e:
        prepare(Net())  # a fresh module is in training mode
    msg = str(e.value)
    assert "eval mode" in msg and "Net" in msg and "training mode" in msg
    assert "model.eval()" in e.value.hint and "prepare_qat_fx" in e.value.hint
    assert "test_bad_input.py" in e.value.source and "class Net" in e.value.source


def test_prepare_fx_names_the_one_child_in_training_mode():
    model = net()
    model.block.bn.train()
    with pytest.raises(ModelModeError) as e:
        prepare(model)
    assert e.value.module_path == "block.bn"
    assert "'block.bn' (BatchNorm2d) is in training mode" in str(e.value)
    assert "model.eval()" in e.value.hint


def test_prepare_fx_lists_every_child_in_training_mode():
    model = net()
    model.block.train()  # block, block.conv, block.bn
    with pytest.raises(ModelModeError) as e:
        prepare(model)
    assert e.value.module_path == "block"
    assert "'block', 'block.conv', 'block.bn'" in str(e.value)


def test_prepare_qat_fx_refuses_eval_mode_and_warns_on_eval_children():
    with pytest.raises(ModelModeError, match="training mode") as e:
        fxquant.prepare_qat_fx(net(), get_default_qat_qconfig_mapping("x86"), X, backend="x86")
    assert "model.train()" in str(e.value)
    model = net().train()
    model.block.bn.eval()  # frozen BatchNorm: the prepared model would train it
    with pytest.warns(ModelModeWarning, match=r"'block.bn'.*eval mode"):
        fxquant.prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), X, backend="x86")


# -- 2. dtypes and non-finite parameters --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_float32_model_is_refused_at_prepare_naming_the_first_parameter(dtype):
    with pytest.raises(UnsupportedDtypeError) as e:
        prepare(net().to(dtype))
    name = str(dtype).replace("torch.", "")
    assert f"parameter 'stem.weight' is {name}" in str(e.value)
    assert e.value.module_path == "stem"
    assert "model.float()" in e.value.hint


def test_a_float64_buffer_alone_is_named():
    model = net()
    model.block.register_buffer("offset", torch.zeros(4, dtype=torch.float64))
    with pytest.raises(UnsupportedDtypeError, match=r"buffer 'block.offset' is float64") as e:
        prepare(model)
    assert e.value.module_path == "block" and "model.float()" in e.value.hint


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_non_float32_example_inputs_are_refused(dtype):
    with pytest.raises(UnsupportedDtypeError) as e:
        prepare(net(), example_inputs=(X[0].to(dtype),))
    assert "example_inputs[0] is Tensor[2, 3, 8, 8]" in str(e.value)
    assert "example_inputs[0].float()" in e.value.hint


def test_integer_example_inputs_are_fine():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)).eval()
    prepared = prepare(model, example_inputs=(torch.randint(0, 10, (2, 5)),))
    assert isinstance(prepared, nn.Module)


def test_nan_parameter_is_refused_at_prepare():
    model = net()
    with torch.no_grad():
        model.fc.weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteParameterError, match="parameter 'fc.weight' holds NaN") as e:
        prepare(model)
    assert e.value.module_path == "fc"


# -- 3. NaN / inf calibration data ----------------------------------------------------------


def _with_activation(observer) -> QConfigMapping:
    return QConfigMapping().set_global(QConfig(observer, default_weight_observer))


OBSERVERS = {
    "minmax": O.MinMaxObserver.with_args(),
    "moving_average": O.MovingAverageMinMaxObserver.with_args(),
    "per_channel": O.PerChannelMinMaxObserver.with_args(ch_axis=1),
    "moving_average_per_channel": O.MovingAveragePerChannelMinMaxObserver.with_args(ch_axis=1),
    "histogram": O.HistogramObserver.with_args(bins=64),
}


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _stats(prepared: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in prepared.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or (a[k].numel() == b[k].numel() == 0), k


@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_nan_calibration_data_names_the_observed_node(kind):
    prepared = prepare(Conv().eval(), _with_activation(OBSERVERS[kind]))
    prepared(torch.randn(2, 3, 8, 8))
    before = _stats(prepared)
    bad = torch.randn(2, 3, 8, 8)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(CalibrationDataError) as e:
        prepared(bad)
    err = e.value
    assert "saw NaN" in str(err) and "(observing node 'x')" in str(err)
    assert err.node_name == "x" and "torch.isfinite" in err.hint
    _assert_same(before, _stats(prepared))  # refused before the statistics changed


@pytest.mark.parametrize("kind", [k for k in OBSERVERS if k != "histogram"])
def test_infinite_calibration_data_is_refused_by_min_max_observers(kind):
    prepared = prepare(Conv().eval(), _with_activation(OBSERVERS[kind]))
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(CalibrationDataError, match="saw infinity") as e:
        prepared(bad)
    assert e.value.node_name == "x" and "HistogramObserver" in e.value.hint


def test_histogram_observer_ignores_infinities_with_a_calibration_warning_naming_the_node():
    prepared = prepare(Conv().eval(), _with_activation(OBSERVERS["histogram"]))
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = float("-inf")
    with pytest.warns(CalibrationWarning, match=r"observing node 'x'.*ignoring infinite values"):
        prepared(bad)
    obs = prepared.get_submodule("activation_post_process_0")
    assert torch.isfinite(obs.min_val) and obs.min_val.item() == bad[bad.isfinite()].min().item()


class LogThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.log(x))


def test_nan_made_inside_the_model_names_the_node_that_made_it():
    prepared = prepare(LogThenConv().eval(), example_inputs=(torch.rand(2, 3, 8, 8) + 0.1,))
    prepared(torch.rand(2, 3, 8, 8) + 0.1)
    with pytest.raises(CalibrationDataError) as e:
        prepared(torch.randn(2, 3, 8, 8))  # log of negative numbers
    assert e.value.node_name == "log"
    assert "test_bad_input.py" in e.value.source and "torch.log(x)" in e.value.source


def test_nan_in_qat_training_names_the_node():
    example = (torch.rand(2, 3, 8, 8) + 0.1,)
    prepared = fxquant.prepare_qat_fx(LogThenConv().train(), get_default_qat_qconfig_mapping("x86"),
                                      example, backend="x86")
    prepared(*example)
    with pytest.raises(CalibrationDataError, match="FusedMovingAvgObsFakeQuantize .* saw NaN") as e:
        prepared(torch.randn(2, 3, 8, 8))
    assert e.value.node_name == "log" and "torch.log(x)" in e.value.source


# -- 4. wrong mapping types ---------------------------------------------------------------


@pytest.mark.parametrize("bad, accepted", [
    ("x86", "get_default_qconfig_mapping('x86')"),
    ([("", None)], "qconfig_dict"),
    (fxquant.get_default_qconfig("x86"), "QConfigMapping().set_global(qconfig)"),
    (None, "QConfigMapping() to keep"),
    (3, "qconfig_dict"),
])
def test_wrong_mapping_type_names_the_type_and_what_is_accepted(bad, accepted):
    with pytest.raises(ConfigTypeError) as e:
        prepare(net(), bad)
    assert f"got {type(bad).__module__}.{type(bad).__qualname__}" in str(e.value)
    assert "QConfigMapping or a qconfig_dict" in str(e.value)
    assert accepted in e.value.hint


def test_torch_ao_mapping_is_named_as_another_librarys():
    tq = pytest.importorskip("torch.ao.quantization")
    with pytest.raises(ConfigTypeError, match="QConfigMapping") as e:
        prepare(net(), tq.get_default_qconfig_mapping("x86"))
    assert "fxquant.get_default_qconfig_mapping" in e.value.hint


def test_qconfig_dict_unknown_keys_and_malformed_sections():
    with pytest.raises(ConfigError, match=r"unknown keys \['module_names'\] \(did you mean 'module_name'"):
        prepare(net(), {"": None, "module_names": [("fc", None)]})
    with pytest.raises(ConfigTypeError, match=r"qconfig_dict\['module_name'\] must be a list of "
                                              r"\(module_name, qconfig\) tuples, got dict") as e:
        prepare(net(), {"module_name": {"fc": None}})
    assert "list(d.items())" in e.value.hint
    with pytest.raises(ConfigTypeError, match=r"got the entry 'fc'"):
        prepare(net(), {"module_name": ["fc"]})


def test_unknown_backend_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown quantization backend 'x68' \(did you mean 'x86'\?\)"):
        fxquant.get_default_qconfig_mapping("x68")


# -- 5. names that match nothing ----------------------------------------------------------


def test_misspelled_module_name_is_an_error_with_did_you_mean():
    with pytest.raises(UnknownNameError) as e:
        prepare(net(), mapping().set_module_name("block.bnn", None))
    assert "set_module_name('block.bnn', ...)" in str(e.value)
    assert "(did you mean 'block.bn'," in str(e.value)  # the closest first
    assert e.value.module_path == "block.bnn" and "named_modules()" in e.value.hint


def test_module_name_like_nothing_in_the_model_only_warns():
    # one mapping for several models ("keep the head float wherever there is one") is normal
    with pytest.warns(ConfigWarning, match=r"set_module_name\('head', \.\.\.\) names no submodule of Net: "):
        prepared = prepare(net(), mapping().set_module_name("head", None))
    assert isinstance(prepared, nn.Module)


def test_misspelled_order_module_name_is_an_error():
    bad = mapping().set_module_name_object_type_order("blok", nn.Conv2d, 0, None)
    with pytest.raises(UnknownNameError,
                       match=r"set_module_name_object_type_order\('blok'.*did you mean 'block'"):
        prepare(net(), bad)
    root = mapping().set_module_name_object_type_order("", F.relu, 0, None)  # "" is the root
    prepare(net(), root)


def test_misspelled_leaf_name_is_an_error_and_leaf_options_must_be_lists():
    with pytest.raises(UnknownNameError, match=r"leaf_names entry 'blocks'.*did you mean 'block'"):
        prepare(net(), leaf_names=["blocks"])
    with pytest.raises(ConfigTypeError, match="leaf_names must be a list") as e:
        prepare(net(), leaf_names="block")
    assert "leaf_names=['block']" in e.value.hint
    with pytest.raises(ConfigTypeError, match="leaf_modules must be a list"):
        prepare(net(), leaf_modules=Block)
    with pytest.raises(ConfigTypeError, match="not an nn.Module subclass"):
        prepare(net(), leaf_modules=["block"])


def test_regex_matching_nothing_warns_and_absent_object_types_do_not():
    with pytest.warns(ConfigWarning,
                      match=r"set_module_name_regex\('head\\\\..\*', \.\.\.\) matches no module"):
        prepare(net(), mapping().set_module_name_regex(r"head\..*", None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        prepare(net(), mapping().set_object_type(nn.LSTM, None).set_module_name_regex("block.*", None))


def test_quantize_dynamic_fx_misspelled_name_in_qconfig_spec():
    from fxquant.qconfig import default_dynamic_qconfig

    with pytest.raises(UnknownNameError, match="did you mean 'fc'"):
        fxquant.quantize_dynamic_fx(net(), {"fc1": default_dynamic_qconfig}, example_inputs=X)


# -- 6. the user's model is never modified --------------------------------------------------


def _snapshot(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "flags": {n: m.training for n, m in model.named_modules()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks),
                      list(m._backward_hooks)) for n, m in model.named_modules()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_unmodified(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    for key in ("ids", "flags", "types", "hooks", "grads"):
        assert after[key] == before[key], key
    _assert_same(before["tensors"], after["tensors"])


def _hooked(model: nn.Module) -> nn.Module:
    model.stem.register_forward_hook(lambda m, i, o: None)
    model.block.register_forward_pre_hook(lambda m, i: None)
    return model


def test_quantize_dynamic_fx_keeps_each_modules_train_eval_flag():
    model = net()
    model.block.train()  # root eval, a child in training
    before = _snapshot(model)
    fxquant.quantize_dynamic_fx(model, example_inputs=X)
    _assert_unmodified(model, before)
    model = Net().train()
    model.block.bn.eval()  # root training, a grandchild in eval
    before = _snapshot(model)
    quantized = fxquant.quantize_dynamic_fx(model, example_inputs=X)
    _assert_unmodified(model, before)
    assert not quantized.training


def test_no_api_modifies_the_users_model():
    model = _hooked(net())
    before = _snapshot(model)
    prepared = prepare(model)
    prepared(torch.randn(2, 3, 8, 8))
    _assert_unmodified(model, before)
    calibrated = _snapshot(prepared)
    fxquant.convert_fx(prepared)
    fxquant.convert_to_reference_fx(prepared)
    _assert_unmodified(prepared, calibrated)  # convert works on a copy of the prepared model
    fxquant.fuse_fx(model, X)
    fxquant.quantize_dynamic_fx(model, example_inputs=X)
    _assert_unmodified(model, before)
    qat = _hooked(Net().train())
    before = _snapshot(qat)
    fxquant.prepare_qat_fx(qat, get_default_qat_qconfig_mapping("x86"), X, backend="x86")(X[0])
    fxquant.fuse_fx(qat, X)
    _assert_unmodified(qat, before)


def test_a_refused_model_is_not_modified_either():
    model = net()
    model.block.bn.train()
    before = _snapshot(model)
    with pytest.raises(ModelModeError):
        prepare(model)
    _assert_unmodified(model, before)


# -- 7. uncalibrated convert, example inputs ------------------------------------------------


def test_convert_without_calibration_names_the_unobserved_nodes():
    prepared = prepare(net())
    with pytest.raises(CalibrationDataError) as e:
        fxquant.convert_fx(prepared)
    msg = str(e.value)
    assert "not calibrated: none of its" in msg and "unobserved nodes: 'x'" in msg
    assert e.value.node_name == "x" and "prepared(batch)" in e.value.hint
    with pytest.raises(CalibrationDataError):
        fxquant.convert_to_reference_fx(prepared)


def test_convert_names_an_observer_that_only_saw_empty_tensors():
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            return self.a(x), self.b(x[: n.shape[0]])

    prepared = prepare(Split().eval(), example_inputs=(torch.randn(3, 4), torch.zeros(2)))
    prepared(torch.randn(3, 4), torch.zeros(0))  # b only ever sees an empty batch
    with pytest.raises(CalibrationDataError, match=r"observers saw no data.*unobserved nodes: ") as e:
        fxquant.convert_fx(prepared)
    assert e.value.module_path == "b"


@pytest.mark.parametrize("bad, hint", [
    ([torch.randn(2, 3, 8, 8)], "tuple(example_inputs)"),
    ({"x": torch.randn(2, 3, 8, 8)}, "as a tuple"),
    (3, "(example_input,)"),
])
def test_example_inputs_must_be_a_tuple_or_a_tensor(bad, hint):
    with pytest.raises(ExampleInputsError, match="must be a tuple of forward's positional") as e:
        prepare(net(), example_inputs=bad)
    assert hint in e.value.hint
    prepare(net(), example_inputs=X[0])  # one tensor is fine


def test_example_inputs_of_the_wrong_count_name_forward_and_the_shapes():
    with pytest.raises(ExampleInputsError) as e:
        prepare(net(), example_inputs=(X[0], X[0]))
    assert ("Net.forward(x) takes 1 positional argument but example_inputs has 2: "
            "tuple(Tensor[2, 3, 8, 8] float32, Tensor[2, 3, 8, 8] float32)") in str(e.value)
    with pytest.raises(ExampleInputsError, match=r"forward\(x\) takes 1 .* has 0"):
        prepare(net(), example_inputs=())


def test_example_inputs_the_model_rejects_name_the_node_and_the_shapes():
    with pytest.raises(ExampleInputsError) as e:
        prepare(net(), example_inputs=(torch.randn(2, 5, 8, 8),))
    msg = str(e.value)
    assert "failed on example_inputs tuple(Tensor[2, 5, 8, 8] float32)" in msg
    assert "at node 'stem', which got 'x' Tensor[2, 5, 8, 8] float32" in msg
    assert "expected input[2, 5, 8, 8] to have 3 channels" in msg
    assert e.value.module_path == "stem" and "self.block(self.stem(x))" in e.value.source
