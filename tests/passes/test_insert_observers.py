"""insert_observers: the mechanism. Observers exactly where annotate put specs: each quantized
input edge not yet observed, each own output; shared outputs call the input's observer module."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant.backends.cpu import full_range_activations_safe
from fxquant.errors import PassFailed
from fxquant.meta import SharedSpec, qinfo
from fxquant.observers import HistogramObserver
from fxquant.passes import Annotate, Fuse, InsertObservers, Normalize, PropagateQConfig
from fxquant.qconfig import QConfigMapping, get_default_qconfig_mapping
from tests.passes.graphs import (assert_every_call_decided, call_nodes, decisions, run_passes,
                                 structure, traced)
from tests.passes.graphs import Fn, Fn2

P, O = "placeholder", "output"


OBS = "call_module:HistogramObserver"
X4 = torch.randn(2, 3, 6, 6)
A, B = torch.randn(2, 4), torch.randn(2, 4)


def observe(model, *inputs, mapping=None, options=None):
    model = model.eval()
    gm = traced(model, *inputs)
    opts = {"qconfig_mapping": mapping if mapping is not None else
            get_default_qconfig_mapping("x86"), "backend": "x86", **(options or {})}
    prefix, _ = run_passes(gm, [Normalize(), Fuse(), PropagateQConfig(), Annotate()], opts)
    before = structure(prefix.gm)
    r, _ = run_passes(prefix.gm, [InsertObservers()], opts, facts={"annotated"})
    assert_every_call_decided(r.gm)
    for n in call_nodes(r.gm):
        if qinfo(n).role == "observer":
            ds = decisions(n)
            assert ds and all(d.pass_name == "insert_observers"
                              and d.action in ("observe", "share_observer") for d in ds)
    # observers are the identity: the prepared graph computes what the model does
    want = model(*inputs)
    got = r.gm(*inputs)
    torch.testing.assert_close(got, want)
    return before, r


def observers(gm):
    return [n for n in call_nodes(gm) if qinfo(n).role == "observer"]


def test_conv_input_and_output_observed():
    before, r = observe(Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)), X4)
    assert before == [P, "call_module:Conv2d", O]
    assert structure(r.gm) == [P, OBS, "call_module:Conv2d", OBS, O]
    assert r.modified is True and r.stats == {"observers": 2}
    obs_in, obs_out = observers(r.gm)
    conv = next(n for n in call_nodes(r.gm) if n.target == "conv")
    assert conv.args[0] is obs_in and obs_out.args[0] is conv
    assert decisions(obs_in)[0].reason == "input of conv: HistogramObserver(quint8)"
    assert decisions(obs_out)[0].reason == "output of conv: HistogramObserver(quint8)"
    assert obs_in.target != obs_out.target
    assert isinstance(r.gm.get_submodule(obs_in.target), HistogramObserver)
    # x86 default: 7-bit activations where this CPU's kernels saturate int16 sums, else 8-bit
    want_reduce = not full_range_activations_safe("x86")
    assert r.gm.get_submodule(obs_in.target).reduce_range is want_reduce


def test_shared_output_calls_the_inputs_observer_module():
    model = Fn(lambda s, x: s.pool(s.conv(x)), conv=nn.Conv2d(3, 4, 3), pool=nn.MaxPool2d(2))
    before, r = observe(model, X4)
    assert structure(r.gm) == [P, OBS, "call_module:Conv2d", OBS, "call_function:F.max_pool2d", OBS, O]
    assert r.stats == {"observers": 2, "shared": 1}
    _, conv_out, pool_out = observers(r.gm)
    assert pool_out.target == conv_out.target  # one observer measures both
    assert decisions(pool_out)[0].action == "share_observer"
    assert f"shares {conv_out.target}" in decisions(pool_out)[0].reason
    n_modules = sum(1 for name, _ in r.gm.named_children() if name.startswith("activation_"))
    assert n_modules == 2


def test_value_read_by_two_ops_is_observed_once():
    model = Fn(lambda s, x: s.a(x) + s.b(x), a=nn.Conv2d(3, 3, 1), b=nn.Conv2d(3, 3, 1))
    before, r = observe(model, X4)
    assert structure(r.gm) == [P, OBS, "call_module:Conv2d", OBS, "call_module:Conv2d", OBS,
                               "call_function:torch.add", OBS, O]
    assert r.stats == {"observers": 4}
    x_obs = observers(r.gm)[0]
    assert len(x_obs.users) == 2


def test_group_interior_output_is_not_observed():
    before, r = observe(Fn2(lambda s, x, y: F.relu(x + y)), A, B)
    assert structure(r.gm) == [P, OBS, P, OBS, "call_function:torch.add", "call_function:F.relu",
                               OBS, O]
    add = next(n for n in call_nodes(r.gm) if n.target is torch.add)
    relu = next(n for n in call_nodes(r.gm) if n.target is F.relu)
    assert relu.args[0] is add
    assert r.stats == {"observers": 3}


def test_cat_list_inputs_observed():
    before, r = observe(Fn2(lambda s, x, y: torch.cat([x, y], 0)), A, B)
    assert structure(r.gm) == [P, OBS, P, OBS, "call_function:torch.cat", OBS, O]
    cat = next(n for n in call_nodes(r.gm) if n.target is torch.cat)
    assert all(qinfo(a).role == "observer" for a in cat.args[0])
    # inputs and output share one observer module, so cat copies quantized data as is
    mods = {id(r.gm.get_submodule(a.target)) for a in cat.args[0]}
    out = next(iter(cat.users))
    assert len(mods) == 1 and id(r.gm.get_submodule(out.target)) in mods


def test_float_op_between_observed_ops():
    """A kept-float op (cumsum has no quantized kernel) between two quantized ones: its input is the
    previous op's output observer, its output is observed as the next op's input."""
    model = Fn(lambda s, x: s.b(torch.cumsum(s.a(x), 1)), a=nn.Linear(4, 4), b=nn.Linear(4, 4))
    before, r = observe(model, A)
    assert structure(r.gm) == [P, OBS, "call_module:Linear", OBS, "call_function:torch.cumsum",
                               OBS, "call_module:Linear", OBS, O]
    third = observers(r.gm)[2]
    assert decisions(third)[0].reason.startswith("input of b:")


def test_unchanged_graph_when_nothing_is_quantized():
    before, r = observe(Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3)), X4,
                        mapping=QConfigMapping())
    assert structure(r.gm) == before
    assert r.modified is False and r.stats == {}


def test_qat_wrapper_turns_observers_into_fake_quant():
    class FakeQuant(nn.Module):
        def __init__(self, obs):
            super().__init__()
            self.activation_post_process = obs
            self.dtype = obs.dtype

        def forward(self, x):
            return self.activation_post_process(x)

    made = []

    def wrap(factory):
        def build():
            made.append(factory)
            return FakeQuant(factory())
        return build

    before, r = observe(Fn(lambda s, x: s.fc(x), fc=nn.Linear(4, 4)), A,
                        options={"observer_factory_wrapper": wrap})
    assert structure(r.gm) == [P, "call_module:FakeQuant", "call_module:Linear",
                               "call_module:FakeQuant", O]
    assert len(made) == 2


def test_shared_spec_on_unobserved_input_fails_with_pass_and_node():
    model = Fn(lambda s, x: s.pool(x), pool=nn.MaxPool2d(2)).eval()
    gm = traced(model, X4)
    opts = {"qconfig_mapping": get_default_qconfig_mapping("x86"), "backend": "x86"}
    prefix, _ = run_passes(gm, [Normalize(), Fuse(), PropagateQConfig(), Annotate()], opts)
    pool = next(n for n in call_nodes(prefix.gm) if qinfo(n).module_path == "pool")
    qinfo(pool).input_specs = {}  # a broken annotation: shared output, input not quantized
    assert qinfo(pool).output_spec == SharedSpec(0)
    with pytest.raises(PassFailed) as e:
        run_passes(prefix.gm, [InsertObservers()], opts, facts={"annotated"})
    assert e.value.pass_name == "insert_observers" and e.value.node_name == pool.name
    assert "not observed" in str(e.value)


def test_before_expected_on_a_model():
    from tests.models import PlainCNN, build

    before, r = observe(build(PlainCNN), torch.randn(2, 3, 16, 16))
    assert structure(r.gm) == [P, OBS, "call_module:ConvReLU2d", OBS, "call_function:F.max_pool2d",
                               OBS, "call_module:Conv2d", OBS, "call_function:F.max_pool2d", OBS,
                               "call_function:F.relu6", OBS, "call_function:F.adaptive_avg_pool2d", OBS,
                               "call_function:torch.flatten", OBS, "call_module:Linear", OBS, O]
    assert r.stats == {"observers": 4, "shared": 5}


# ----------------------------------------------------------- sets of observers that must share
def _three_convs(forward):
    return Fn(forward, a=nn.Conv2d(3, 4, 3, padding=1), b=nn.Conv2d(3, 4, 3, padding=1),
              c=nn.Conv2d(8, 8, 3, padding=1))


def _modules(gm, nodes):
    return {id(gm.get_submodule(str(n.target))) for n in nodes}


@pytest.mark.parametrize("pooled_first", [True, False])
def test_cats_joined_through_a_pool_are_one_set_in_either_order(pooled_first):
    """cat2 reaches cat1 through a max_pool (which shares cat1's observer): a, b, cat1, the pool,
    c and cat2 are one set, one module, whichever of cat2's inputs comes first."""
    def forward(s, x):
        p = F.max_pool2d(torch.cat([s.a(x), s.b(x)], 1), 2)
        return torch.cat([p, s.c(p)] if pooled_first else [s.c(p), p], 1)

    _, r = observe(_three_convs(forward), X4)
    obs = observers(r.gm)
    assert len(obs) == 7 and len(_modules(r.gm, obs[1:])) == 1
    assert _modules(r.gm, obs[:1]) != _modules(r.gm, obs[1:])  # the input x has its own
    names = [n for n, _ in r.gm.named_children() if n.startswith("activation_post_process_")]
    assert len(names) == 2  # the modules merged away are deleted, not left aliased
    assert r.stats["aliased"] >= 1
    merged = [n for n in obs if decisions(n)[-1].reason.startswith("uses ")]
    assert merged and all("need one scale/zero_point" in decisions(n)[-1].reason for n in merged)


def test_tensor_feeding_two_cats_merges_both_sets():
    def forward(s, x):
        a, b, c = s.a(x), s.b(x), s.c(torch.cat([x, x, x[:, :2]], 1))
        return torch.cat([a, b], 1), torch.cat([b, c], 1)

    model = Fn(forward, a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(3, 4, 1), c=nn.Conv2d(8, 4, 1))
    _, r = observe(model, X4)
    cats = [n for n in call_nodes(r.gm) if n.target is torch.cat][1:]
    ins = [a for c in cats for a in c.args[0]] + [next(iter(c.users)) for c in cats]
    assert len(_modules(r.gm, ins)) == 1


def test_fixed_qparams_input_is_requantized_into_the_set():
    model = Fn(lambda s, x: torch.cat([torch.sigmoid(s.a(x)), s.b(x)], 1),
               a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(3, 4, 1))
    _, r = observe(model, X4)
    assert r.stats["requantized"] == 1
    cat = next(n for n in call_nodes(r.gm) if n.target is torch.cat)
    first = cat.args[0][0]
    assert "requantized" in decisions(first)[0].reason and "fixed qparams" in decisions(first)[0].reason
    fixed = first.args[0]
    assert type(r.gm.get_submodule(fixed.target)).__name__.startswith("FixedQParams")
    assert _modules(r.gm, [fixed]) != _modules(r.gm, list(cat.args[0]))
    assert len(_modules(r.gm, [*cat.args[0], next(iter(cat.users))])) == 1


def test_kernel_derived_qparams_input_is_requantized_into_the_set():
    model = Fn(lambda s, x: torch.cat([s.a(x) * 3, s.b(x)], 1),
               a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(3, 4, 1))
    _, r = observe(model, X4)
    assert r.stats["requantized"] == 1
    cat = next(n for n in call_nodes(r.gm) if n.target is torch.cat)
    assert "derives its qparams" in decisions(cat.args[0][0])[0].reason


# ------------------------------------------------------------------- reads after in-place writes
class WriteThenRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        z = self.conv(x)
        before = self.conv2(z)
        z[:, :2].mul_(2)
        return before, self.conv2(z)


def test_input_read_after_an_in_place_write_is_observed_where_it_is_read():
    _, r = observe(WriteThenRead(), X4)
    assert structure(r.gm) == [P, OBS, "call_module:Conv2d", OBS, "call_module:Conv2d", OBS,
                               "call_function:operator.getitem", "call_method:mul_", OBS,
                               "call_module:Conv2d", OBS, O]
    assert r.stats["observed_at_read"] == 1
    convs = [n for n in call_nodes(r.gm) if n.op == "call_module" and qinfo(n).role == "op"]
    z_obs = convs[1].args[0]  # the first reader reuses conv's output observer
    assert z_obs.args[0] is convs[0]
    at_read = convs[2].args[0]
    assert at_read.args[0] is z_obs and at_read.prev.target == "mul_"
    assert "mul_ writes it in place before" in decisions(at_read)[0].reason
    assert qinfo(at_read).debug_handle is None  # not conv's output: compare skips it
