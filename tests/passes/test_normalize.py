"""normalize: one spelling per op, in-place → out-of-place with eager semantics, dropout/identity
removal in eval mode. Graphs are compared by structure (node names ignored)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.meta import qinfo
from fxquant.passes import Normalize
from fxquant.trace import annotate_trace_meta, record_values
from tests.passes.graphs import (assert_decisions_well_formed, call_nodes, decisions, run_passes,
                                 structure, traced)
from tests.passes.graphs import Fn, Fn2

P, O = "placeholder", "output"


def normalize(model: nn.Module, *inputs, **opts):
    """trace + record values + normalize (verified); returns (before structure, result)."""
    gm = traced(model, *[i.clone() for i in inputs])
    before = structure(gm)
    result, _ = run_passes(gm, [Normalize(**opts)])
    assert_decisions_well_formed(result.gm)
    return before, result


def same_output(model: nn.Module, gm: fx.GraphModule, *inputs) -> None:
    """Eager model and rewritten graph agree (each on its own copy of the inputs, since in-place
    spellings mutate them)."""
    want = model(*[i.clone() for i in inputs])
    got = gm(*[i.clone() for i in inputs])
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


X = torch.randn(2, 4)
Y = torch.randn(2, 4)

# --------------------------------------------------------------------------------------- relu

RELU_SPELLINGS = [
    # id, model, written structure entry, rewritten in place?
    ("nn.ReLU", lambda: Fn(lambda s, x: s.relu(x), relu=nn.ReLU()), "call_module:ReLU", False),
    ("nn.ReLU(inplace)", lambda: Fn(lambda s, x: s.relu(x), relu=nn.ReLU(inplace=True)),
     "call_module:ReLU", True),
    ("torch.relu", lambda: Fn(lambda s, x: torch.relu(x)), "call_function:torch.relu", False),
    ("torch.relu_", lambda: Fn(lambda s, x: torch.relu_(x)), "call_function:torch.relu_", True),
    ("F.relu_", lambda: Fn(lambda s, x: F.relu_(x)), "call_function:torch.relu_", True),
    ("F.relu(inplace=True)", lambda: Fn(lambda s, x: F.relu(x, inplace=True)),
     "call_function:F.relu", True),
    ("F.relu(x, True)", lambda: Fn(lambda s, x: F.relu(x, True)), "call_function:F.relu", True),
    ("x.relu()", lambda: Fn(lambda s, x: x.relu()), "call_method:relu", False),
    ("x.relu_()", lambda: Fn(lambda s, x: x.relu_()), "call_method:relu_", True),
]


@pytest.mark.parametrize("written,factory,entry,inplace", RELU_SPELLINGS,
                         ids=[c[0] for c in RELU_SPELLINGS])
def test_relu_spelling_becomes_F_relu(written, factory, entry, inplace):
    model = factory()
    before, r = normalize(model, X)
    assert before == [P, entry, O]
    assert structure(r.gm) == [P, "call_function:F.relu", O]
    assert r.modified is True
    assert r.stats == {"rewritten": 1}
    relu = call_nodes(r.gm)[0]
    assert relu.args == (relu.args[0],) and relu.kwargs == {}  # no inplace flag left
    (d,) = decisions(relu, "normalize")
    assert d.action == "normalize" and d.reason.endswith("rewritten as F.relu" +
                                                         (" (out of place)" if inplace else ""))
    assert qinfo(relu).debug_handle == 1  # the rewritten node keeps the original's handle
    same_output(model, r.gm, X)
    assert not any(isinstance(m, nn.ReLU) for m in r.gm.modules())  # the module is gone


def test_relu_negative_canonical_spelling_unchanged():
    before, r = normalize(Fn(lambda s, x: F.relu(x)), X)
    assert structure(r.gm) == before == [P, "call_function:F.relu", O]
    assert r.modified is False and r.stats == {}
    assert decisions(call_nodes(r.gm)[0]) == []


def test_relu_negative_relu6_is_another_op():
    """nn.ReLU6 becomes F.relu6 (its own op), never F.relu."""
    before, r = normalize(Fn(lambda s, x: s.act(x), act=nn.ReLU6()), X)
    assert before == [P, "call_module:ReLU6", O]
    assert structure(r.gm) == [P, "call_function:F.relu6", O]


# ------------------------------------------------------------------------------------ add, mul


def _two(fn):
    return lambda: Fn2(fn)


BINARY_SPELLINGS = [
    ("x + y", _two(lambda s, x, y: x + y), "call_function:operator.add", "torch.add", False),
    ("torch.add", _two(lambda s, x, y: torch.add(x, y, alpha=1)), "call_function:torch.add",
     "torch.add", None),
    ("x.add(y)", _two(lambda s, x, y: x.add(y)), "call_method:add", "torch.add", False),
    ("x.add_(y)", _two(lambda s, x, y: x.add_(y)), "call_method:add_", "torch.add", True),
    ("x * y", _two(lambda s, x, y: x * y), "call_function:operator.mul", "torch.mul", False),
    ("torch.mul", _two(lambda s, x, y: torch.mul(x, y)), "call_function:torch.mul", "torch.mul",
     None),
    ("x.mul(y)", _two(lambda s, x, y: x.mul(y)), "call_method:mul", "torch.mul", False),
    ("x.mul_(y)", _two(lambda s, x, y: x.mul_(y)), "call_method:mul_", "torch.mul", True),
]


@pytest.mark.parametrize("written,factory,entry,canonical,inplace", BINARY_SPELLINGS,
                         ids=[c[0] for c in BINARY_SPELLINGS])
def test_binary_spelling(written, factory, entry, canonical, inplace):
    model = factory()
    before, r = normalize(model, X, Y)
    assert before == [P, P, entry, O]
    assert structure(r.gm) == [P, P, f"call_function:{canonical}", O]
    node = call_nodes(r.gm)[0]
    assert [a.op for a in node.args] == ["placeholder", "placeholder"] and node.kwargs == {}
    if inplace is None:  # already canonical: nothing to rewrite, no decision
        assert r.modified is False and r.stats == {} and decisions(node) == []
    else:
        assert r.modified is True and r.stats == {"rewritten": 1}
        (d,) = decisions(node, "normalize")
        assert canonical in d.reason and d.reason.endswith("(out of place)") == inplace
    same_output(model, r.gm, X, Y)


@pytest.mark.parametrize("op,canonical", [(operator.iadd, "torch.add"),
                                          (operator.imul, "torch.mul")])
def test_augmented_assignment_operator_is_rewritten_out_of_place(op, canonical):
    """fx traces ``x += y`` on a Proxy as operator.add; operator.iadd/imul nodes come from graphs
    built by hand (or other front ends), so the graph is built here directly."""
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    g.call_function(op, (x, y))  # mutates x, result unused
    g.output(g.call_function(operator.sub, (x, y)))  # reads the mutated x (becomes torch.sub)
    gm = fx.GraphModule(nn.Module(), g)
    annotate_trace_meta(gm)
    record_values(gm, (X.clone(), Y.clone()))
    want = gm(X.clone(), Y.clone())
    r, _ = run_passes(gm, [Normalize()])
    assert structure(r.gm) == [P, P, f"call_function:{canonical}", "call_function:torch.sub", O]
    new, sub = call_nodes(r.gm)
    assert sub.args[0] is new  # the later reader reads the result
    assert decisions(new, "normalize")[0].reason.endswith("(out of place)")
    assert r.stats == {"rewritten": 2}  # the augmented op and the a - b after it
    torch.testing.assert_close(r.gm(X.clone(), Y.clone()), want, rtol=0, atol=0)


def test_scalar_first_operand_is_swapped():
    before, r = normalize(Fn(lambda s, x: 2 + x), X)
    assert structure(r.gm) == [P, "call_function:torch.add", O]
    node = call_nodes(r.gm)[0]
    assert node.args[0].op == "placeholder" and node.args[1] == 2
    before, r = normalize(Fn(lambda s, x: 3 * x), X)
    node = call_nodes(r.gm)[0]
    assert node.target is torch.mul and node.args[1] == 3


def test_add_negative_python_int_arithmetic_stays_python():
    """``x.size(0) + 1`` and ``n * 2`` produce ints: never torch.add / torch.mul."""
    model = Fn(lambda s, x: x.view(x.size(0) + 1 - 1, -1) * (x.size(1) * 2))
    before, r = normalize(model, X)
    assert before == [P, "call_method:size", "call_function:operator.add",
                      "call_function:operator.sub", "call_method:view", "call_method:size",
                      "call_function:operator.mul", "call_function:operator.mul", O]
    assert structure(r.gm) == [P, "call_method:size", "call_function:operator.add",
                               "call_function:operator.sub", "call_method:view",
                               "call_method:size", "call_function:operator.mul",
                               "call_function:torch.mul", O]
    assert r.stats == {"rewritten": 1}  # only the tensor * int
    same_output(model, r.gm, X)


def test_add_negative_without_recorded_values_nothing_tensor_only_is_rewritten():
    gm = traced(Fn2(lambda s, x, y: x + y))  # no example inputs: values unknown
    r, _ = run_passes(gm, [Normalize()])
    assert structure(r.gm) == [P, P, "call_function:operator.add", O]
    assert r.modified is False


@pytest.mark.parametrize("fn", [lambda s, x, y: torch.add(x, y, alpha=2),
                                lambda s, x, y: x.add(y, alpha=2),
                                lambda s, x, y: x.add_(y, alpha=2)],
                         ids=["torch.add-alpha", "x.add-alpha", "x.add_-alpha"])
def test_add_negative_alpha_is_left_as_written(fn):
    model = Fn2(fn)
    before, r = normalize(model, X, Y)
    assert structure(r.gm) == before
    assert r.modified is False
    same_output(model, r.gm, X, Y)


# ------------------------------------------------------------------------------------------ cat


@pytest.mark.parametrize("fn,entry", [
    (lambda s, x, y: torch.concat([x, y], dim=1), "call_function:torch.concat"),
    (lambda s, x, y: torch.concatenate([x, y], axis=1), "call_function:torch.concatenate"),
], ids=["torch.concat", "torch.concatenate(axis=)"])
def test_cat_spelling(fn, entry):
    model = Fn2(fn)
    before, r = normalize(model, X, Y)
    assert before == [P, P, entry, O]
    assert structure(r.gm) == [P, P, "call_function:torch.cat", O]
    node = call_nodes(r.gm)[0]
    assert len(node.args) == 2 and node.args[1] == 1 and node.kwargs == {}
    assert r.stats == {"rewritten": 1}
    assert "rewritten as torch.cat" in decisions(node, "normalize")[0].reason
    same_output(model, r.gm, X, Y)


def test_cat_negative_canonical_cat_only_gets_positional_args():
    model = Fn2(lambda s, x, y: torch.cat(tensors=[x, y], dim=1))
    before, r = normalize(model, X, Y)
    assert structure(r.gm) == before == [P, P, "call_function:torch.cat", O]
    node = call_nodes(r.gm)[0]
    assert r.modified is False and r.stats == {}
    assert node.args[1] == 1 and node.kwargs == {}
    same_output(model, r.gm, X, Y)


# -------------------------------------------------------------------------------------- flatten

X4 = torch.randn(2, 3, 4, 5)


@pytest.mark.parametrize("factory,entry,args", [
    (lambda: Fn(lambda s, x: s.flat(x), flat=nn.Flatten()), "call_module:Flatten", (1, -1)),
    (lambda: Fn(lambda s, x: s.flat(x), flat=nn.Flatten(0, 2)), "call_module:Flatten", (0, 2)),
    (lambda: Fn(lambda s, x: x.flatten(1)), "call_method:flatten", (1,)),
], ids=["nn.Flatten", "nn.Flatten(0,2)", "x.flatten(1)"])
def test_flatten_spelling(factory, entry, args):
    model = factory()
    before, r = normalize(model, X4)
    assert before == [P, entry, O]
    assert structure(r.gm) == [P, "call_function:torch.flatten", O]
    node = call_nodes(r.gm)[0]
    assert node.args[1:] == args
    assert r.stats == {"rewritten": 1}
    assert not any(isinstance(m, nn.Flatten) for m in r.gm.modules())
    same_output(model, r.gm, X4)


def test_flatten_negative_reshape_and_canonical_flatten_unchanged():
    """A reshape is not a flatten: it becomes torch.reshape (its own canonical op), and the
    canonical torch.flatten is left as it is."""
    model = Fn(lambda s, x: torch.flatten(x.reshape(2, 3, -1), 1))
    before, r = normalize(model, X4)
    assert before == [P, "call_method:reshape", "call_function:torch.flatten", O]
    assert structure(r.gm) == [P, "call_function:torch.reshape", "call_function:torch.flatten", O]
    assert r.stats == {"rewritten": 1}
    flat = call_nodes(r.gm)[1]
    assert flat.args[1:] == (1,) and not decisions(flat, "normalize")
    same_output(model, r.gm, X4)


# ------------------------------------------------------------ every other spelling of an op
A4 = torch.randn(2, 3, 4, 5)
B4 = torch.randn(2, 3, 4, 5)
POS4 = torch.rand(2, 3, 4, 5) + 0.5
C3 = torch.randn(3)
V3 = torch.rand(3) + 0.5
M3 = (torch.randn(2, 3, 4), torch.randn(2, 4, 5))


def _xs(*args):
    return lambda *p: (tuple(p) + args, {})


def _kw(**kwargs):
    return lambda *p: (tuple(p), kwargs)


# id, written target, canonical, example inputs, (placeholders) -> (args, kwargs) of the call.
# Built as graphs by hand: several spellings (F.sigmoid, F.upsample, ...) are Python functions
# that symbolic tracing runs through, so only graphs from other front ends hold them.
ALIAS_CASES = [
    ("a - b", operator.sub, torch.sub, (A4, B4), _xs()),
    ("torch.subtract", torch.subtract, torch.sub, (A4, B4), _xs()),
    ("x.sub", "sub", torch.sub, (A4, B4), _xs()),
    ("a -= b", operator.isub, torch.sub, (A4, B4), _xs()),
    ("x.sub_", "sub_", torch.sub, (A4, B4), _xs()),
    ("a / b", operator.truediv, torch.div, (A4, POS4), _xs()),
    ("torch.divide", torch.divide, torch.div, (A4, POS4), _xs()),
    ("x.div", "div", torch.div, (A4, POS4), _xs()),
    ("a /= b", operator.itruediv, torch.div, (A4, POS4), _xs()),
    ("x.div_", "div_", torch.div, (A4, POS4), _xs()),
    ("a @ b", operator.matmul, torch.matmul, M3, _xs()),
    ("x.matmul", "matmul", torch.matmul, M3, _xs()),
    ("torch.bmm", torch.bmm, torch.matmul, M3, _xs()),
    ("x.bmm", "bmm", torch.matmul, M3, _xs()),
    ("x.mean", "mean", torch.mean, (A4,), _xs((2, 3), True)),
    ("F.sigmoid", F.sigmoid, torch.sigmoid, (A4,), _xs()),
    ("torch.special.expit", torch.special.expit, torch.sigmoid, (A4,), _xs()),
    ("x.sigmoid", "sigmoid", torch.sigmoid, (A4,), _xs()),
    ("torch.sigmoid_", torch.sigmoid_, torch.sigmoid, (A4,), _xs()),
    ("x.sigmoid_", "sigmoid_", torch.sigmoid, (A4,), _xs()),
    ("F.tanh", F.tanh, torch.tanh, (A4,), _xs()),
    ("x.tanh", "tanh", torch.tanh, (A4,), _xs()),
    ("torch.tanh_", torch.tanh_, torch.tanh, (A4,), _xs()),
    ("x.tanh_", "tanh_", torch.tanh, (A4,), _xs()),
    ("torch.softmax", torch.softmax, F.softmax, (A4,), _xs(1)),
    ("torch.special.softmax", torch.special.softmax, F.softmax, (A4,), _xs(-1, torch.float64)),
    ("x.softmax", "softmax", F.softmax, (A4,), _xs(1, torch.float64)),
    ("torch.log_softmax", torch.log_softmax, F.log_softmax, (A4,), _xs(1)),
    ("torch.special.log_softmax", torch.special.log_softmax, F.log_softmax, (A4,), _xs(-1)),
    ("x.log_softmax", "log_softmax", F.log_softmax, (A4,), _xs(1, torch.float64)),
    ("F.hardtanh_", F.hardtanh_, F.hardtanh, (A4,), _xs(-0.5, 0.5)),
    ("torch.clip", torch.clip, torch.clamp, (A4,), _xs(-0.5, 0.5)),
    ("x.clamp", "clamp", torch.clamp, (A4,), _kw(min=0.0)),
    ("x.clip", "clip", torch.clamp, (A4,), _xs(-1.0, 1.0)),
    ("F.elu_", F.elu_, F.elu, (A4,), _xs(0.5)),
    ("F.leaky_relu_", F.leaky_relu_, F.leaky_relu, (A4,), _xs(0.2)),
    ("torch.selu", torch.selu, F.selu, (A4,), _xs()),
    ("torch.selu_", torch.selu_, F.selu, (A4,), _xs()),
    ("torch.celu", torch.celu, F.celu, (A4,), _xs(0.5)),
    ("torch.celu_", torch.celu_, F.celu, (A4,), _xs()),
    ("x.prelu", "prelu", F.prelu, (A4, torch.tensor([0.25])), _xs()),
    ("torch.layer_norm", torch.layer_norm, F.layer_norm, (A4, torch.randn(5), torch.randn(5)),
     lambda x, w, b: ((x, [5], w, b, 1e-4, False), {})),
    ("torch.group_norm", torch.group_norm, F.group_norm, (A4,), _xs(3, None, None, 1e-5, True)),
    ("torch.batch_norm", torch.batch_norm, F.batch_norm, (A4, C3, C3, C3, V3),
     lambda x, w, b, m, v: ((x, w, b, m, v, False, 0.1, 1e-3, False), {})),
    ("torch.instance_norm", torch.instance_norm, F.instance_norm, (A4, C3, C3),
     lambda x, w, b: ((x, w, b, None, None, True, 0.1, 1e-5, False), {})),
    ("F.upsample", F.upsample, F.interpolate, (A4,), _kw(scale_factor=2, mode="bilinear")),
    ("F.upsample_nearest", F.upsample_nearest, F.interpolate, (A4,), _xs(None, 2)),
    ("F.upsample_bilinear", F.upsample_bilinear, F.interpolate, (A4,), _kw(size=(5, 7))),
    ("torch.constant_pad_nd", torch.constant_pad_nd, F.pad, (A4,), _xs([1, 2], 0.5)),
    ("x.reshape(2, -1)", "reshape", torch.reshape, (A4,), _xs(2, -1)),
    ("x.permute(0, 2, 3, 1)", "permute", torch.permute, (A4,), _xs(0, 2, 3, 1)),
    ("x.flip(0, 1)", "flip", torch.flip, (A4,), _xs(0, 1)),
    ("x.transpose", "transpose", torch.transpose, (A4,), _xs(1, 3)),
    ("torch.swapaxes", torch.swapaxes, torch.transpose, (A4,), _xs(1, 3)),
    ("x.swapaxes", "swapaxes", torch.transpose, (A4,), _xs(0, 2)),
    ("x.movedim", "movedim", torch.movedim, (A4,), _xs(1, 3)),
    ("x.squeeze", "squeeze", torch.squeeze, (torch.randn(2, 1, 3),), _xs(1)),
    ("x.unsqueeze", "unsqueeze", torch.unsqueeze, (A4,), _xs(1)),
    ("x.t", "t", torch.t, (torch.randn(3, 4),), _xs()),
    ("x.narrow", "narrow", torch.narrow, (A4,), _xs(1, 1, 2)),
    ("x.unflatten", "unflatten", torch.unflatten, (A4,), _xs(3, (5, 1))),
    ("x.chunk", "chunk", torch.chunk, (A4,), _xs(2, 1)),
    ("x.split", "split", torch.split, (A4,), _xs([1, 2], 1)),
    ("x.unbind", "unbind", torch.unbind, (A4,), _xs(1)),
    ("x.tensor_split", "tensor_split", torch.tensor_split, (A4,), _xs(2, 3)),
]


def _one_call_graph(target, inputs, make_args) -> fx.GraphModule:
    """x..., the call as written, then a reader of the first input (sees an in-place
    spelling's mutation): the graph returns both."""
    g = fx.Graph()
    ps = [g.placeholder(f"x{i}") for i in range(len(inputs))]
    args, kwargs = make_args(*ps)
    call = g.call_method(target, args, kwargs) if isinstance(target, str) \
        else g.call_function(target, args, kwargs)
    g.output((call, g.call_method("clone", (ps[0],))))
    gm = fx.GraphModule(nn.Module(), g)
    annotate_trace_meta(gm)
    record_values(gm, tuple(i.clone() for i in inputs))
    return gm


@pytest.mark.parametrize("written,target,canonical,inputs,make_args", ALIAS_CASES,
                         ids=[c[0] for c in ALIAS_CASES])
def test_alias_spelling_becomes_the_canonical_op(written, target, canonical, inputs, make_args):
    from fxquant.ops import spelling_for

    gm = _one_call_graph(target, inputs, make_args)
    want = gm(*[i.clone() for i in inputs])
    sp = spelling_for("call_method" if isinstance(target, str) else "call_function", target, None)
    r, _ = run_passes(gm, [Normalize()])
    assert_decisions_well_formed(r.gm)
    (call,) = [n for n in call_nodes(r.gm) if n.target != "clone"]
    assert call.op == "call_function" and call.target is canonical
    assert r.stats == {"rewritten": 1}
    (d,) = decisions(call, "normalize", "normalize")
    assert d.reason.endswith(("(out of place)" if sp.inplace else canonical.__name__))
    clone = next(n for n in call_nodes(r.gm) if n.target == "clone")
    assert (clone.args[0] is call) == sp.inplace  # the reader sees the mutation: the result
    got = r.gm(*[i.clone() for i in inputs])
    for w, g in zip(pytree_leaves(want), pytree_leaves(got)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def pytree_leaves(value):
    from torch.utils import _pytree

    return _pytree.tree_leaves(value)


def test_method_varargs_with_traced_sizes_become_one_shape():
    """``x.reshape(x.size(0), -1)`` / ``x.permute(*order)``: the torch function takes one
    sequence; a traced int is an item of it, a traced shape is the sequence itself."""
    model = Fn(lambda s, x: x.reshape(x.size(0), -1) + x.reshape(x.shape).sum() +
               x.flatten().reshape(x.numel()).sum())
    before, r = normalize(model, X4)
    reshapes = [n for n in call_nodes(r.gm) if n.target is torch.reshape]
    assert len(reshapes) == 3 and "call_method:reshape" not in structure(r.gm)
    first, second, third = reshapes
    assert isinstance(first.args[1], tuple) and first.args[1][1] == -1
    assert isinstance(second.args[1], fx.Node)  # x.shape: already a sequence
    assert isinstance(third.args[1], tuple) and isinstance(third.args[1][0], fx.Node)
    same_output(model, r.gm, X4)


def test_reverse_subtraction_and_division_stay_python_operators():
    """``1 - x`` / ``1 / x`` have no torch.sub / torch.div form with the number first."""
    model = Fn(lambda s, x: (1 - x) * (2 / x))
    before, r = normalize(model, X4)
    assert structure(r.gm) == [P, "call_function:operator.sub", "call_function:operator.truediv",
                               "call_function:torch.mul", O]
    same_output(model, r.gm, X4)


def test_alias_spelling_of_a_viewed_tensor_stays_in_place():
    """``v = x[0]; x.sigmoid_()``: v sees the mutation in eager mode; out of place it would
    not, so the in-place spelling stays, with the reason."""
    model = Fn(lambda s, x: (lambda v: (x.sigmoid_(), v * 1))(x[0]))
    before, r = normalize(model, X4)
    assert "call_method:sigmoid_" in structure(r.gm)
    node = next(n for n in call_nodes(r.gm) if n.target == "sigmoid_")
    assert decisions(node, "normalize", "keep_inplace")
    same_output(model, r.gm, X4)


@pytest.mark.parametrize("written", ["x.clamp_", "x.clip_", "torch.clamp_", "torch.clip_"])
def test_inplace_clamp_stays_as_written_with_its_readers_repointed(written):
    """In-place clamps are no spelling of torch.clamp: the backends' rule for them checks their
    bounds at annotate time (see fxquant.ops). Later readers read the result, as for any
    in-place op without an out-of-place rewrite."""
    fn = {"x.clamp_": lambda x: x.clamp_(0, 1), "x.clip_": lambda x: x.clip_(0, 1),
          "torch.clamp_": lambda x: torch.clamp_(x, 0, 1),
          "torch.clip_": lambda x: torch.clip_(x, 0, 1)}[written]
    model = Fn(lambda s, x: fn(x) + x * 2)
    before, r = normalize(model, X4)
    assert structure(r.gm) == before[:2] + ["call_function:torch.mul", "call_function:torch.add",
                                            O]
    clamp, mul, _ = call_nodes(r.gm)
    assert mul.args[0] is clamp and r.stats == {"inplace_readers_repointed": 1, "rewritten": 2}
    same_output(model, r.gm, X4)


# ----------------------------------------------------------------------------- dropout, identity


class WithDropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.Dropout(0.5)
        self.d2 = nn.Dropout2d(0.5)
        self.ad = nn.AlphaDropout(0.5)
        self.ident = nn.Identity()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        x = self.d(self.lin(x))
        x = self.d2(x)
        x = F.dropout(x, 0.5, self.training)
        x = self.ad(x)
        return self.ident(x) * 2


DROP_BEFORE = [P, "call_module:Linear", "call_module:Dropout", "call_module:Dropout2d",
               "call_function:F.dropout", "call_module:AlphaDropout", "call_module:Identity",
               "call_function:operator.mul", O]


def test_dropout_and_identity_removed_in_eval():
    model = WithDropouts().eval()
    before, r = normalize(model, X4)
    assert before == DROP_BEFORE
    assert structure(r.gm) == [P, "call_module:Linear", "call_function:torch.mul", O]
    assert r.stats == {"removed": 5, "rewritten": 1}
    lin = call_nodes(r.gm)[0]
    removed = decisions(lin, "normalize", "remove_identity")
    assert len(removed) == 5
    assert all("eval mode" in d.reason for d in removed)
    assert {d.reason.split(" ")[1] for d in removed} == {"Dropout", "Dropout2d", "F.dropout",
                                                         "AlphaDropout", "Identity"}
    names = {n for n, _ in r.gm.named_children()}
    assert names == {"lin"}  # the dropout / identity submodules are deleted
    same_output(model, r.gm, X4)


DROPOUT_CASES = [
    ("nn.Dropout", lambda: nn.Dropout(0.5), (2, 4)),
    ("nn.Dropout1d", lambda: nn.Dropout1d(0.5), (2, 3, 4)),
    ("nn.Dropout2d", lambda: nn.Dropout2d(0.5), (2, 3, 4, 4)),
    ("nn.Dropout3d", lambda: nn.Dropout3d(0.5), (1, 2, 3, 4, 4)),
    ("nn.AlphaDropout", lambda: nn.AlphaDropout(0.5), (2, 4)),
    ("nn.Identity", lambda: nn.Identity(), (2, 4)),
    ("F.dropout", lambda: F.dropout, (2, 4)),
    ("F.dropout1d", lambda: F.dropout1d, (2, 3, 4)),
    ("F.dropout2d", lambda: F.dropout2d, (2, 3, 4, 4)),
    ("F.dropout3d", lambda: F.dropout3d, (1, 2, 3, 4, 4)),
    ("F.alpha_dropout", lambda: F.alpha_dropout, (2, 4)),
]


class OneDropout(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        if isinstance(op, nn.Module):
            self.op = op
        else:
            self.fn = op

    def forward(self, x):
        x = x * 2
        y = self.op(x) if hasattr(self, "op") else self.fn(x, 0.5, self.training)
        return y - 1


@pytest.mark.parametrize("name,factory,shape", DROPOUT_CASES, ids=[c[0] for c in DROPOUT_CASES])
@pytest.mark.parametrize("training", [False, True], ids=["eval-removed", "train-kept"])
def test_each_dropout_and_identity(name, factory, shape, training):
    model = OneDropout(factory()).train(training)
    x = torch.randn(*shape)
    gm = traced(model, x)
    gm.train(training)
    before = structure(gm)
    r, _ = run_passes(gm, [Normalize()])
    op = before[2]
    assert op.endswith(name.split(".")[1]) or op.endswith(name)
    if training:
        assert op in structure(r.gm)
        assert r.stats == {"rewritten": 2}  # x * 2 and y - 1
    else:
        assert op not in structure(r.gm)
        assert structure(r.gm) == [P, "call_function:torch.mul", "call_function:torch.sub", O]
        assert r.stats == {"removed": 1, "rewritten": 2}
        mul = call_nodes(r.gm)[0]
        (d,) = decisions(mul, "normalize", "remove_identity")
        assert name.split(".")[1] in d.reason and "eval mode" in d.reason
        same_output(model.eval(), r.gm, x)


# ------------------------------------------------------------------ stateless modules → function
IMG = torch.randn(2, 4, 6, 6)
MODULE_CASES = [
    # stateless module, canonical function, its arguments after x, input
    (nn.ReLU6(), F.relu6, (), X),
    (nn.Hardtanh(-0.5, 0.25), F.hardtanh, (-0.5, 0.25), X),
    (nn.Hardswish(), F.hardswish, (), X),
    (nn.ELU(0.5), F.elu, (0.5,), X),
    (nn.SELU(), F.selu, (), X),
    (nn.CELU(0.5), F.celu, (0.5,), X),
    (nn.LeakyReLU(0.2), F.leaky_relu, (0.2,), X),
    (nn.GELU(approximate="tanh"), F.gelu, (), X),
    (nn.SiLU(), F.silu, (), X),
    (nn.Sigmoid(), torch.sigmoid, (), X),
    (nn.Hardsigmoid(), F.hardsigmoid, (), X),
    (nn.Tanh(), torch.tanh, (), X),
    (nn.Softmax(dim=0), F.softmax, (0,), X),
    (nn.Softmax2d(), F.softmax, (-3,), IMG),
    (nn.LogSoftmax(dim=1), F.log_softmax, (1,), X),
    (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), F.interpolate, (), IMG),
    (nn.Upsample(scale_factor=1.5, mode="nearest", recompute_scale_factor=True), F.interpolate,
     (), IMG),
    (nn.UpsamplingNearest2d(size=(9, 9)), F.interpolate, (), IMG),
    (nn.UpsamplingBilinear2d(scale_factor=2), F.interpolate, (), IMG),
    (nn.ZeroPad1d((1, 2)), F.pad, ((1, 2),), X),
    (nn.ZeroPad2d((1, 0, 2, 1)), F.pad, ((1, 0, 2, 1),), IMG),
    (nn.ZeroPad3d(1), F.pad, ((1,) * 6,), IMG),
    (nn.ConstantPad1d(1, 0.5), F.pad, ((1, 1),), X),
    (nn.ConstantPad2d((1, 2, 0, 1), -1.0), F.pad, ((1, 2, 0, 1),), IMG),
    (nn.ConstantPad3d(1, 2.0), F.pad, ((1,) * 6,), IMG),
    (nn.ReflectionPad1d(1), F.pad, ((1, 1),), IMG[0]),
    (nn.ReflectionPad2d((1, 2, 0, 1)), F.pad, ((1, 2, 0, 1),), IMG),
    (nn.ReflectionPad3d(1), F.pad, ((1,) * 6,), IMG),
    (nn.ReplicationPad1d(1), F.pad, ((1, 1),), IMG[0]),
    (nn.ReplicationPad2d(2), F.pad, ((2,) * 4,), IMG),
    (nn.ReplicationPad3d(1), F.pad, ((1,) * 6,), IMG),
    (nn.CircularPad1d(1), F.pad, ((1, 1),), IMG[0]),
    (nn.CircularPad2d(1), F.pad, ((1,) * 4,), IMG),
    (nn.CircularPad3d(1), F.pad, ((1,) * 6,), IMG),
    (nn.PixelShuffle(2), F.pixel_shuffle, (2,), IMG),
    (nn.PixelUnshuffle(2), F.pixel_unshuffle, (2,), IMG),
    (nn.Unflatten(1, (2, 2)), torch.unflatten, (1, (2, 2)), X),
    # pooling: kernel_size, stride, padding, dilation (ceil_mode, return_indices as keywords);
    # kernel_size, stride, padding, ceil_mode, count_include_pad(, divisor_override); output_size
    (nn.MaxPool1d(2), F.max_pool1d, (2, 2, 0, 1), IMG[0]),
    (nn.MaxPool2d(3, 2, 1, ceil_mode=True), F.max_pool2d, (3, 2, 1, 1), IMG),
    (nn.MaxPool2d(2, dilation=2), F.max_pool2d, (2, 2, 0, 2), IMG),
    (nn.MaxPool2d(2, return_indices=True), F.max_pool2d, (2, 2, 0, 1), IMG),
    (nn.MaxPool3d(2), F.max_pool3d, (2, 2, 0, 1), IMG),
    (nn.AvgPool1d(3, 1, 1, count_include_pad=False), F.avg_pool1d,
     ((3,), (1,), (1,), False, False), IMG[0]),
    (nn.AvgPool2d(3, 2, 1, True, False, 4), F.avg_pool2d, (3, 2, 1, True, False, 4), IMG),
    (nn.AvgPool2d(2), F.avg_pool2d, (2, 2, 0, False, True, None), IMG),
    (nn.AvgPool3d(2, 1), F.avg_pool3d, (2, 1, 0, False, True, None), IMG),
    (nn.AdaptiveAvgPool1d(3), F.adaptive_avg_pool1d, (3,), IMG[0]),
    (nn.AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d, (1,), IMG),
    (nn.AdaptiveAvgPool2d((None, 2)), F.adaptive_avg_pool2d, ((None, 2),), IMG),
    (nn.AdaptiveAvgPool3d(1), F.adaptive_avg_pool3d, (1,), IMG),
    (nn.AdaptiveMaxPool1d(2), F.adaptive_max_pool1d, (2, False), IMG[0]),
    (nn.AdaptiveMaxPool2d(2, return_indices=True), F.adaptive_max_pool2d, (2, True), IMG),
    (nn.AdaptiveMaxPool3d((1, 2, 3)), F.adaptive_max_pool3d, ((1, 2, 3), False), IMG),
]


@pytest.mark.parametrize("module,canonical,extra,x", MODULE_CASES,
                         ids=[repr(c[0]) for c in MODULE_CASES])
def test_stateless_module_becomes_its_function(module, canonical, extra, x):
    """The module's configuration becomes the call's arguments; the call keeps the module's
    path (module_name rules, reports, nn_module_stack) and its class (object_type rules)."""
    model = Fn(lambda s, x: s.act(x * 1), act=module)
    before, r = normalize(model, x)
    assert before[2] == f"call_module:{type(module).__name__}"
    (call,) = [n for n in call_nodes(r.gm) if n.target is canonical]
    assert tuple(call.args[1:]) == extra
    assert qinfo(call).module_path == "act" and qinfo(call).original is type(module)
    (d,) = decisions(call, "normalize", "normalize")
    assert type(module).__name__ in d.reason
    assert not any(n.op == "call_module" for n in r.gm.graph.nodes)
    same_output(model, r.gm, x)


def test_max_pool_keywords_and_indices():
    """nn.MaxPool2d's ceil_mode and return_indices reach F.max_pool2d as the keywords its
    forward passes; with return_indices=True the call returns the same (values, indices)
    tuple, so the rewrite is exact and the getitem readers are unchanged."""
    model = Fn(lambda s, x: s.act(x * 1)[1], act=nn.MaxPool2d(3, 2, 1, return_indices=True,
                                                             ceil_mode=True))
    before, r = normalize(model, IMG)
    (call,) = [n for n in call_nodes(r.gm) if n.target is F.max_pool2d]
    assert call.kwargs == {"ceil_mode": True, "return_indices": True}
    assert [u.target for u in call.users] == [operator.getitem]
    same_output(model, r.gm, IMG)


def test_lp_pool_stays_a_module():
    """nn.LPPool2d has no rule in any table (quantized or export) in either spelling: kept."""
    before, r = normalize(Fn(lambda s, x: s.act(x), act=nn.LPPool2d(2, 2)), IMG)
    assert structure(r.gm) == before == [P, "call_module:LPPool2d", O]


def test_softmax_module_without_dim_stays_a_module():
    """nn.Softmax() picks its dim from the input's rank at each call (torch's legacy implicit
    dim): no F.softmax call states that, so the module stays as written."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        before, r = normalize(Fn(lambda s, x: s.act(x), act=nn.Softmax()), X)
    assert structure(r.gm) == before == [P, "call_module:Softmax", O]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        before, r = normalize(Fn(lambda s, x: s.act(x), act=nn.LogSoftmax()), X)
    assert structure(r.gm) == before == [P, "call_module:LogSoftmax", O]


@pytest.mark.parametrize("module,canonical", [(nn.Hardswish(inplace=True), F.hardswish),
                                              (nn.ReLU6(inplace=True), F.relu6),
                                              (nn.ELU(0.5, inplace=True), F.elu)])
def test_inplace_module_on_a_view_becomes_its_inplace_function(module, canonical):
    """An in-place module whose tensor has views stays in place, as its function with
    ``inplace=True`` (which the rule tables list), so that the views see the mutation."""
    class OnView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = module

        def forward(self, x):
            x = x * 1
            self.act(x[1:])
            return x * 1

    model = OnView()
    _, r = normalize(model, X)
    (call,) = [n for n in call_nodes(r.gm) if n.target is canonical]
    assert call.kwargs.get("inplace") is True and qinfo(call).module_path == "act"
    assert decisions(call, "normalize", "keep_inplace")
    for x in (X, -X):
        same_output(model, r.gm, x)


def test_every_spelling_of_the_table_has_a_case():
    from fxquant.ops import DROPOUT_FUNCTIONS, DROPOUT_MODULES, IDENTITY_MODULES, SPELLINGS

    covered = {nn.ReLU, F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_",
               operator.add, operator.iadd, torch.add, "add", "add_",
               operator.mul, operator.imul, torch.mul, "mul", "mul_",
               torch.cat, torch.concat, torch.concatenate, nn.Flatten, torch.flatten, "flatten"}
    covered |= {c[1] for c in ALIAS_CASES}
    covered |= {type(c[0]) for c in MODULE_CASES}
    assert {s.target for s in SPELLINGS} == covered
    dropouts = {nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.Identity, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                "dropout"}  # (Tensor has no .dropout() method: that entry cannot occur)
    assert set(DROPOUT_MODULES + IDENTITY_MODULES + DROPOUT_FUNCTIONS) == dropouts


def test_dropout_kept_in_train():
    model = WithDropouts().train()
    gm = traced(model)
    gm.train()
    r, _ = run_passes(gm, [Normalize()])
    assert structure(r.gm)[:-2] == DROP_BEFORE[:-2]  # mul: no value recorded, not rewritten
    assert r.modified is False and r.stats == {}


def test_remove_dropout_option_overrides_mode():
    gm = traced(WithDropouts().train())
    gm.train()
    r, _ = run_passes(gm, [Normalize(remove_dropout=True)])
    assert r.stats == {"removed": 5}
    gm = traced(WithDropouts().eval(), X4)
    r, _ = run_passes(gm, [Normalize(remove_dropout=False)])
    assert r.stats == {"rewritten": 1}
    assert structure(r.gm) == DROP_BEFORE[:-2] + ["call_function:torch.mul", O]


def test_identity_negative_kept_in_train():
    model = Fn(lambda s, x: s.ident(x), ident=nn.Identity()).train()
    gm = traced(model)
    gm.train()
    r, _ = run_passes(gm, [Normalize()])
    assert structure(r.gm) == [P, "call_module:Identity", O] and r.modified is False


# ------------------------------------------------------------------------- in-place semantics


class ReadsAfterAddInplace(nn.Module):
    def forward(self, x, y):
        before = x * 2  # reads x before the mutation
        x.add_(y)
        return x * 3 + before, x  # reads x after it, and returns the mutated tensor


def test_inplace_add_later_readers_see_the_result():
    model = ReadsAfterAddInplace()
    before, r = normalize(model, X, Y)
    assert "call_method:add_" in before
    assert structure(r.gm) == [P, P, "call_function:torch.mul", "call_function:torch.add",
                               "call_function:torch.mul", "call_function:torch.add", O]
    x = next(n for n in r.gm.graph.nodes if n.op == "placeholder")
    mul_before, add, mul_after, _ = call_nodes(r.gm)
    assert mul_before.args[0] is x  # the earlier reader still reads the original
    assert mul_after.args[0] is add  # the later reader reads the out-of-place result
    same_output(model, r.gm, X, Y)


class InplaceReLUThenRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = x * 1
        y = self.relu(x)  # mutates x
        z = x.mul_(2)  # mutates x (== y) again
        return x + y + z, torch.relu_(x - 1) + x


def test_inplace_chain_keeps_eager_semantics():
    model = InplaceReLUThenRead()
    before, r = normalize(model, X)
    assert r.stats["rewritten"] == 8  # (x - 1 becomes torch.sub too)
    assert not any(str(n.target).endswith("_") for n in call_nodes(r.gm))
    same_output(model, r.gm, X)


class MutateThroughView(nn.Module):
    def forward(self, x):
        x = x * 1
        v = x.view(-1)
        x.add_(1)  # v sees this in eager mode
        return v * 1


class MutateAView(nn.Module):
    def forward(self, x):
        x = x * 1
        x[0].relu_()  # mutates row 0 of x in eager mode
        return x * 1


class MutateThroughAnInPlaceResult(nn.Module):
    """``y = x.sigmoid_()`` is ``x``: mul_ on ``y`` writes the storage ``v`` views, though
    neither ``y`` nor its users are views themselves."""

    def forward(self, x):
        x = x * 1
        v = x.view(-1)
        y = x.sigmoid_()
        y.mul_(2)
        return v * 1


class ReLUModuleOnAView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = x * 1
        self.relu(x[1:])
        return x * 1


@pytest.mark.parametrize("model", [MutateThroughView(), MutateAView(),
                                   MutateThroughAnInPlaceResult(), ReLUModuleOnAView()],
                         ids=["mutate-base-read-view", "mutate-view-read-base",
                              "mutate-in-place-result-read-view", "relu-module-on-view"])
def test_inplace_through_alias_keeps_eager_semantics(model):
    _, r = normalize(model, X)
    for x in (X, -X, X - X.mean()):  # whatever the signs, the mutation must be seen
        same_output(model, r.gm, x)
    kept = [n for n in call_nodes(r.gm) if decisions(n, "normalize", "keep_inplace")]
    assert kept and all("view" in decisions(n, "normalize", "keep_inplace")[0].reason
                        for n in kept)
    assert len(kept) == (2 if isinstance(model, MutateThroughAnInPlaceResult) else 1)


# --------------------------------------------------------------------------------- whole pass


class AllSpellings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.drop = nn.Dropout()

    def forward(self, x, y):
        a = self.relu(x) + y
        b = torch.concat([a.relu(), F.relu(y)], 1)
        c = self.drop(b).mul(2)
        return self.flat(c.unsqueeze(-1)), x.size(0) + 1


def test_before_expected_structure():
    model = AllSpellings().eval()
    before, r = normalize(model, X, Y)
    assert before == [P, P, "call_module:ReLU", "call_function:operator.add", "call_method:relu",
                      "call_function:F.relu", "call_function:torch.concat", "call_module:Dropout",
                      "call_method:mul", "call_method:unsqueeze", "call_module:Flatten",
                      "call_method:size", "call_function:operator.add", O]
    assert structure(r.gm) == [P, P, "call_function:F.relu", "call_function:torch.add",
                               "call_function:F.relu", "call_function:F.relu",
                               "call_function:torch.cat", "call_function:torch.mul",
                               "call_function:torch.unsqueeze", "call_function:torch.flatten",
                               "call_method:size", "call_function:operator.add", O]
    assert r.modified is True
    assert r.stats == {"rewritten": 7, "removed": 1}
    rewritten = [n for n in call_nodes(r.gm) if decisions(n, "normalize", "normalize")]
    assert len(rewritten) == 7
    same_output(model, r.gm, X, Y)


def test_unchanged_graph():
    model = Fn2(lambda s, x, y: torch.flatten(torch.cat([F.relu(torch.add(x, y)), y], 1), 1))
    before, r = normalize(model, X, Y)
    code = r.gm.code
    assert structure(r.gm) == before
    assert r.modified is False and r.stats == {}
    assert r.gm.code == code
    # a second run over an already-normalized graph changes nothing either
    _, r2 = normalize(AllSpellings().eval(), X, Y)
    again, _ = run_passes(r2.gm, [Normalize()])
    assert again.modified is False and again.stats == {}


def test_idempotent_on_models():
    from tests.models import STATIC_CASES, ReLUSpellings, build

    for name, factory, shape in STATIC_CASES + [("relu", ReLUSpellings, (1, 4, 3, 3))]:
        model = build(factory)
        x = torch.randn(*shape)
        _, r = normalize(model, x)
        assert not any(n.op == "call_module" and isinstance(r.gm.get_submodule(n.target),
                                                            (nn.ReLU, nn.Dropout, nn.Flatten))
                       for n in r.gm.graph.nodes), name
        same_output(model, r.gm, x)
        again, _ = run_passes(r.gm, [Normalize()])
        assert again.modified is False, name

