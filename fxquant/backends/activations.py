"""Rules for activations, normalizations and fixed-qparams ops (hardswish, elu, leaky_relu,
prelu, gelu, silu, sigmoid / hardsigmoid / tanh / softmax, layer/group/instance/batch norm,
interpolate, pad, the clamp spellings the native table does not list), shared by the native
backends.

Every op is listed in all its spellings (nn module, F function, torch function, Tensor method
name, in-place variants). A lowering builds the kernel call, runs it once on quantized zeros
shaped like the real input (``ctx.probe``, through :func:`_checked`, which also demands the
dtype / scale / zero point the reference graph quantizes the op's output to) and declines with
the kernel's own error when the engine lacks it, so the op stays a correct float reference op.
Kernels are chosen once per op by what torch 2.13 runs on quint8:

* own output qparams: ``quantized::hardswish / elu / celu / leaky_relu / prelu / layer_norm /
  group_norm / instance_norm / batch_norm*``, and SiLU as ``quantized::sigmoid`` +
  ``quantized::mul`` (torch.ao leaves SiLU float);
* fixed output qparams: sigmoid, hardsigmoid, softmax (scale 1/256, zp 0), tanh (2/256, 128);
* shared with the input (the kernel keeps the input's scale / zero point): GELU (aten::gelu
  has a QuantizedCPU kernel; torch.ao leaves it float), interpolate / upsample, pad, clamp.

In-place spellings (``x.sigmoid_()``, ``F.elu(x, inplace=True)``, ``nn.Hardswish(inplace=True)``)
are lowered to the out-of-place kernel; that is only the same program when nobody reads the
mutated tensor afterwards, so they are accepted only then (else they stay float, with why).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.backends.base import FIXED, OWN, SHARED, LowerCtx, Lowered, Rule
from fxquant.meta import inherit, qinfo, record
from fxquant.records import Action
from fxquant.patterns import NoMatch, Op, target_name

Q = torch.ops.quantized
UNIT = (1.0 / 256.0, 0)  # outputs in [0, 1]
SIGNED_UNIT = (2.0 / 256.0, 128)  # outputs in [-1, 1]
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

Check = Callable[[fx.Node, Mapping[str, nn.Module], Any], Union[bool, NoMatch]]


def _present(*targets: Any) -> tuple[Any, ...]:
    """The targets that exist in this torch build, without duplicates (F.prelu is torch.prelu)."""
    out: list[Any] = []
    for t in targets:
        if t is not None and not any(t is o for o in out):
            out.append(t)
    return tuple(out)


# ---------------------------------------------------------------- spellings
# Canonical spellings only (fxquant.ops: normalize rewrites F.sigmoid / x.sigmoid() /
# torch.softmax / torch.batch_norm / F.upsample / x.clamp() ... into these). Stateless modules
# are rewritten into their function too (nn.Sigmoid → torch.sigmoid, nn.ELU → F.elu, nn.ZeroPad2d
# → F.pad, nn.Upsample → F.interpolate ...); modules with state stay modules, and so does
# nn.Softmax() without a dim (torch's implicit dim depends on the rank at each call), listed
# beside F.softmax. The in-place spellings stay listed: normalize keeps an in-place op as written when
# its tensor has views (a "keep_inplace" decision), and check_inplace rules on those; the
# in-place clamps (clamp_ / clip_) are always kept as written (their rule checks the bounds).
HARDSWISH = _present(F.hardswish)
ELU = _present(F.elu, F.elu_)
SELU = _present(F.selu, torch.selu_)
CELU = _present(F.celu, torch.celu_)
LEAKY_RELU = _present(F.leaky_relu, F.leaky_relu_)
PRELU = _present(nn.PReLU, F.prelu)
GELU = _present(F.gelu)
SILU = _present(F.silu)
SIGMOID = _present(torch.sigmoid, torch.sigmoid_, "sigmoid_")
HARDSIGMOID = _present(F.hardsigmoid)  # (no Tensor method)
TANH = _present(torch.tanh, torch.tanh_, "tanh_")
SOFTMAX = _present(nn.Softmax, F.softmax)  # nn.Softmax: only with dim None
LAYER_NORM = _present(nn.LayerNorm, F.layer_norm)
GROUP_NORM = _present(nn.GroupNorm, F.group_norm)
INSTANCE_NORM = _present(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                         F.instance_norm)
BATCH_NORM = _present(nn.BatchNorm1d, F.batch_norm)
INTERPOLATE = _present(F.interpolate)
PAD = _present(F.pad)
CLAMP = _present(torch.clamp, torch.clamp_, torch.clip_, F.hardtanh_, "clamp_", "clip_")
# the clamp spellings the native table's "clamp_family" rule runs as the same op on the
# quantized tensor; the "clamp" rule here takes the rest of CLAMP (both clamp rules read
# their spellings from here)
CLAMP_FAMILY = (F.relu6, F.hardtanh, F.hardtanh_, torch.clamp)


# ---------------------------------------------------------------- reading a node's arguments
def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, whether passed by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _bound(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a Python F function (keyword names from its signature)."""
    if name in node.kwargs:
        return node.kwargs[name]
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return default
    i = params.index(name) if name in params else -1
    return node.args[i] if 0 <= i < len(node.args) else default


def _is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") or bool(_bound(node, "inplace", False))


def _input_rank(node: fx.Node) -> Optional[int]:
    x = node.args[0] if node.args else None
    value = qinfo(x).value if isinstance(x, fx.Node) else None
    return len(value.shape) if value is not None and value.shape is not None else None


def _output_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    value = qinfo(node).value
    return tuple(value.shape) if value is not None and value.shape is not None else None


# ---------------------------------------------------------------- checks (at annotate time)
def _checks(*checks: Check) -> Check:
    def check(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
              ) -> Union[bool, NoMatch]:
        for c in checks:
            ok = c(node, modules, qconfig)
            if not ok:
                return ok
        return True
    return check


def check_inplace(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
                  ) -> Union[bool, NoMatch]:
    """An in-place spelling becomes the out-of-place kernel: only the same program when no
    later op reads the tensor it mutates."""
    if not _is_inplace(node, modules):
        return True
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return True
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    later = [u.name for u in x.users if u is not node and order[u] > order[node]]
    if later:
        return NoMatch(f"in-place {_written(node, modules)} mutates {x.name}, which "
                       f"{', '.join(later)} read(s) afterwards; the quantized kernel is out of "
                       f"place, so it stays float (normalize has no out-of-place rewrite for it)")
    return True


def _written(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"nn.{type(modules[node.target]).__name__}"
    return target_name(node.target)


def _tensor_args(*spots: tuple[int, str]) -> Check:
    """Tensor arguments (weights, running stats) must be parameters / buffers (get_attr) or
    None: the kernel takes them as constants."""
    def check(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
              ) -> Union[bool, NoMatch]:
        if node.op == "call_module":
            return True
        for index, name in spots:
            a = _arg(node, index, name)
            if isinstance(a, fx.Node) and a.op != "get_attr":
                return NoMatch(f"{target_name(node.target)}: {name} is computed at run time "
                               f"({a.name}); the quantized kernel takes it as a constant "
                               f"parameter, so the op stays float")
        return True
    return check


def _constant_args(*spots: tuple[int, str]) -> Check:
    """Arguments that must be Python constants (not tensors computed in the graph)."""
    def check(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
              ) -> Union[bool, NoMatch]:
        for index, name in spots:
            a = _arg(node, index, name)
            if isinstance(a, fx.Node):
                return NoMatch(f"{_written(node, modules)}: {name} is a tensor ({a.name}); the "
                               f"quantized kernel takes Python numbers only, so it stays float")
        return True
    return check


def _clamp_bounds(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
                  ) -> Union[bool, NoMatch]:
    if node.op == "call_function" and node.target is F.hardtanh_:
        return True
    return _constant_args((1, "min"), (2, "max"))(node, modules, qconfig)


def _softmax_dtype(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
                   ) -> Union[bool, NoMatch]:
    if node.op != "call_module" and _softmax_args(node)[1] is not None:
        return NoMatch("softmax with dtype=: the output is cast; quantized::softmax has no "
                       "such form, so it stays float")
    return True


def _bn_eval(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
             ) -> Union[bool, NoMatch]:
    """Batch norm must use running statistics (eval mode, stats present)."""
    if node.op == "call_module":
        m = modules[node.target]
        if m.training or m.running_mean is None:
            return NoMatch("BatchNorm1d normalizes with batch statistics here (training mode or "
                           "track_running_stats=False); the quantized kernel uses running "
                           "statistics, so it stays float")
        return True
    bn = _norm_args(node, "training", False)
    if bn["training"] is not False or bn["mean"] is None or bn["var"] is None:
        return NoMatch(f"{target_name(node.target)} with training={bn['training']!r} or without "
                       f"running statistics normalizes with batch statistics; the quantized "
                       f"kernel uses running statistics, so it stays float")
    return True


def _batched_rank(extra_dims: int, node: fx.Node, modules: Mapping[str, nn.Module],
                  qconfig: Any) -> Union[bool, NoMatch]:
    rank = _input_rank(node)
    want = None
    if node.op == "call_module":
        dims = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}
        d = dims.get(type(modules[node.target]))
        want = d + 2 if d is not None else None
    if rank is not None and (rank < extra_dims or (want is not None and rank != want)):
        return NoMatch(f"input of rank {rank} (unbatched or wrong rank for "
                       f"{_written(node, modules)}); the quantized kernel needs (N, C, ...)")
    return True


def _batched(extra_dims: int) -> Check:
    """Norms whose kernels need a batch dimension (N, C, *)."""
    return functools.partial(_batched_rank, extra_dims)


def _prelu_weight(node: fx.Node, modules: Mapping[str, nn.Module], qconfig: Any
                  ) -> Union[bool, NoMatch]:
    return _tensor_args((1, "weight"))(node, modules, qconfig)


# ---------------------------------------------------------------- building kernel calls
def _fetch(gm: fx.GraphModule, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), gm)


def _tensor(ctx: LowerCtx, value: Any) -> tuple[Any, Any]:
    """(the value to probe with, the graph argument) of a tensor argument: None, a get_attr
    node, or the name of an attribute of the module being lowered (its get_attr node is made
    only once the probe succeeded, see _emit)."""
    if value is None:
        return None, None
    if isinstance(value, fx.Node):
        return _fetch(ctx.gm, str(value.target)), value
    tensor = getattr(ctx.module, value)
    if tensor is None:
        return None, None
    return tensor, _Attr(f"{ctx.node.target}.{value}")


class _Attr:
    """A get_attr node still to be made."""

    def __init__(self, target: str, value: Optional[torch.Tensor] = None) -> None:
        self.target, self.value = target, value

    def node(self, ctx: LowerCtx) -> fx.Node:
        if self.value is not None:  # a new buffer of the root module
            base, i = self.target, 1
            while hasattr(ctx.gm, self.target):
                self.target, i = f"{base}_{i}", i + 1
            ctx.gm.register_buffer(self.target, self.value)
        return ctx.gm.graph.get_attr(self.target)


def _constant(ctx: LowerCtx, hint: str, tensor: torch.Tensor) -> tuple[Any, Any]:
    """A new buffer of the root module (quantized PReLU weight, unit BN weight)."""
    return tensor, _Attr((hint or "act").replace(".", "_"), tensor)


def _checked(ctx: LowerCtx, fn: Callable[[torch.Tensor], torch.Tensor]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` for ctx.probe, failing unless the kernel returns exactly the quantized tensor the
    reference graph's quantize makes: its dtype, scale and zero point (a kernel picking its own
    qparams, or keeping a qint8 input's dtype, must not be lowered silently). 4-d / 5-d inputs
    are also tried channels-last, the layout quantized convs return."""
    want = (ctx.out_dtype, float(ctx.out_scale), int(ctx.out_zero_point))

    def run(qx: torch.Tensor) -> torch.Tensor:
        if qx.dim() in (4, 5):  # what a quantized conv returns: some kernels fail only on it
            layout = torch.channels_last if qx.dim() == 4 else torch.channels_last_3d
            fn(qx.contiguous(memory_format=layout))
        y = fn(qx)
        got = (y.dtype, y.q_scale(), y.q_zero_point())
        if got[0] != want[0] or got[2] != want[2] or not math.isclose(got[1], want[1],
                                                                      rel_tol=1e-6):
            raise RuntimeError(f"the kernel returns {got[0]} scale={got[1]:.6g} "
                               f"zero_point={got[2]}, not the output's {want[0]} "
                               f"scale={want[1]:.6g} zero_point={want[2]}")
        return y
    return run


def _emit(ctx: LowerCtx, fn: Any, pairs: Iterable[tuple[Any, Any]], kernel: str) -> Lowered:
    """Probe ``fn(qx, *values)`` on the engine, then call ``fn(qx, *graph args)``."""
    pairs = list(pairs)
    values = [p for p, _ in pairs]
    err = ctx.probe(_checked(ctx, lambda qx: fn(qx, *values)))
    if err:
        return NoMatch(f"{kernel} does not run on this engine: {err}")
    ctx.kernel = kernel
    args = [g.node(ctx) if isinstance(g, _Attr) else g for _, g in pairs]
    return ctx.gm.graph.call_function(fn, (ctx.qinputs[0], *args))


def _c(*values: Any) -> list[tuple[Any, Any]]:
    return [(v, v) for v in values]


def _out(ctx: LowerCtx) -> list[tuple[Any, Any]]:
    return _c(float(ctx.out_scale), int(ctx.out_zero_point))


def _param(ctx: LowerCtx, module_attr: str, index: int, name: str) -> Any:
    """A tensor argument: the module's attribute, or the call's argument."""
    return module_attr if ctx.node.op == "call_module" else _arg(ctx.node, index, name)


# ---------------------------------------------------------------- activations with own qparams
def lower_hardswish(ctx: LowerCtx) -> Lowered:
    return _emit(ctx, Q.hardswish, _out(ctx), "quantized::hardswish")


def lower_elu(ctx: LowerCtx) -> Lowered:
    node = ctx.node
    alpha = ctx.module.alpha if node.op == "call_module" else _arg(node, 1, "alpha", 1.0)
    return _emit(ctx, Q.elu, _out(ctx) + _c(float(alpha), 1.0, 1.0), "quantized::elu")


def lower_selu(ctx: LowerCtx) -> Lowered:
    """selu(x) = scale * elu(x, alpha): quantized::elu's own scale argument."""
    return _emit(ctx, Q.elu, _out(ctx) + _c(SELU_ALPHA, SELU_SCALE, 1.0),
                 "quantized::elu (selu's alpha and scale)")


def lower_celu(ctx: LowerCtx) -> Lowered:
    node = ctx.node
    alpha = ctx.module.alpha if node.op == "call_module" else _arg(node, 1, "alpha", 1.0)
    return _emit(ctx, Q.celu, _out(ctx) + _c(float(alpha)), "quantized::celu")


def lower_leaky_relu(ctx: LowerCtx) -> Lowered:
    node = ctx.node
    slope = (ctx.module.negative_slope if node.op == "call_module"
             else _arg(node, 1, "negative_slope", 0.01))
    return _emit(ctx, Q.leaky_relu, _c(float(slope), False) + _out(ctx), "quantized::leaky_relu")


def lower_prelu(ctx: LowerCtx) -> Lowered:
    """quantized::prelu takes a per-tensor affine weight of the activation's dtype, and it
    represents the slope 1 of positive inputs in the *weight's* qparams: a weight range without
    1.0 scales every positive input down (torch.ao's PReLU, whose weight observer sees only the
    weight, loses ~25 dB this way). So the MinMax weight observer sees the weight and 1.0."""
    from fxquant.observers import MinMaxObserver

    weight, _ = _tensor(ctx, _param(ctx, "weight", 1, "weight"))
    if weight is None:
        return NoMatch("PReLU without a weight tensor")
    w = weight.detach().float()
    obs = MinMaxObserver(dtype=ctx.out_dtype, qscheme=torch.per_tensor_affine)
    obs(torch.cat([w.reshape(-1), torch.ones(1)]))
    scale, zp = obs.calculate_qparams()
    qweight = torch.quantize_per_tensor(w, float(scale), int(zp), ctx.out_dtype)
    pairs = [_constant(ctx, f"{ctx.node.name}_qweight", qweight)] + _out(ctx)
    return _emit(ctx, Q.prelu, pairs, "quantized::prelu")


def lower_silu(ctx: LowerCtx) -> Lowered:
    """silu(x) = x * sigmoid(x): quantized::sigmoid (fixed 1/256 output) then quantized::mul
    with the op's own output qparams. aten::silu has no quantized kernel."""
    s, zp = float(ctx.out_scale), int(ctx.out_zero_point)

    def silu(qx: torch.Tensor) -> torch.Tensor:
        return Q.mul(qx, Q.sigmoid(qx, *UNIT), s, zp)

    err = ctx.probe(_checked(ctx, silu))
    if err:
        return NoMatch(f"quantized::sigmoid + quantized::mul do not run on this engine: {err}")
    graph = ctx.gm.graph
    sig = graph.call_function(Q.sigmoid, (ctx.qinputs[0], *UNIT))
    _helper(sig, ctx.node, "quantized::sigmoid (first half of silu: x * sigmoid(x))")
    ctx.kernel = "quantized::sigmoid + quantized::mul"
    return graph.call_function(Q.mul, (ctx.qinputs[0], sig, s, zp))


def _helper(new: fx.Node, node: fx.Node, kernel: str) -> None:
    """A node a lowering adds besides its result: the same record, its own decision."""
    info = inherit(new, node)
    info.kernel = kernel
    record(new, "lower_to_backend", Action.LOWER, f"runs on {kernel}")


# ---------------------------------------------------------------- fixed-qparams ops
def lower_sigmoid(ctx: LowerCtx) -> Lowered:
    return _emit(ctx, Q.sigmoid, _out(ctx), "quantized::sigmoid")


def _lower_fixed_aten(fn: Any, kernel: str) -> Callable[[LowerCtx], Lowered]:
    """Ops whose aten QuantizedCPU kernel picks the fixed output qparams itself (tanh,
    hardsigmoid); the checked probe proves they are the rule's."""
    def lower(ctx: LowerCtx) -> Lowered:
        err = ctx.probe(_checked(ctx, fn))
        if err:
            return NoMatch(f"{kernel} does not run on this engine: {err}")
        ctx.kernel = kernel
        return ctx.gm.graph.call_function(fn, (ctx.qinputs[0],))
    return lower


def _softmax_args(node: fx.Node) -> tuple[Any, Any]:
    """(dim, dtype) of an F.softmax call (normalize rewrote torch.softmax / x.softmax into it;
    its third parameter is _stacklevel)."""
    return _arg(node, 1, "dim"), _arg(node, 3, "dtype")


def _softmax_dim(ctx: LowerCtx, rank: int) -> Optional[int]:
    if ctx.node.op == "call_module":
        dim = -3 if isinstance(ctx.module, nn.Softmax2d) else ctx.module.dim
    else:
        dim = _softmax_args(ctx.node)[0]
    if dim is None:  # torch's legacy implicit dim (F._get_softmax_dim)
        dim = 0 if rank in (0, 1, 3) else 1
    return dim % rank if isinstance(dim, int) and rank else None


def lower_softmax(ctx: LowerCtx) -> Lowered:
    rank = len(_output_shape(ctx.node) or ())
    dim = _softmax_dim(ctx, rank)
    if dim is None:
        return NoMatch("softmax dimension not known before run time")
    return _emit(ctx, Q.softmax, _c(dim) + _out(ctx), "quantized::softmax")


# ---------------------------------------------------------------- normalizations
def lower_layer_norm(ctx: LowerCtx) -> Lowered:
    node = ctx.node
    if node.op == "call_module":
        shape, eps = list(ctx.module.normalized_shape), ctx.module.eps
    else:
        shape = _arg(node, 1, "normalized_shape")
        shape = [shape] if isinstance(shape, int) else list(shape)
        eps = _arg(node, 4, "eps", 1e-5)
    pairs = _c(shape) + [_tensor(ctx, _param(ctx, "weight", 2, "weight")),
                         _tensor(ctx, _param(ctx, "bias", 3, "bias"))]
    return _emit(ctx, Q.layer_norm, pairs + _c(float(eps)) + _out(ctx), "quantized::layer_norm")


def lower_group_norm(ctx: LowerCtx) -> Lowered:
    node = ctx.node
    if node.op == "call_module":
        groups, eps = ctx.module.num_groups, ctx.module.eps
    else:
        groups, eps = _arg(node, 1, "num_groups"), _arg(node, 4, "eps", 1e-5)
    pairs = _c(int(groups)) + [_tensor(ctx, _param(ctx, "weight", 2, "weight")),
                               _tensor(ctx, _param(ctx, "bias", 3, "bias"))]
    return _emit(ctx, Q.group_norm, pairs + _c(float(eps)) + _out(ctx), "quantized::group_norm")


def _norm_args(node: fx.Node, flag: str, flag_default: bool) -> dict[str, Any]:
    """The arguments of F.batch_norm / F.instance_norm (input, running_mean, running_var,
    weight, bias, <flag>, momentum, eps); normalize rewrote the torch.* spellings (another
    argument order) into them. ``flag``: "training" or "use_input_stats"."""
    names = ("mean", "var", "weight", "bias", flag, "momentum", "eps")
    kw = {"mean": "running_mean", "var": "running_var"}
    defaults = {flag: flag_default, "eps": 1e-5}
    return {n: _arg(node, i + 1, kw.get(n, n), defaults.get(n)) for i, n in enumerate(names)}


def lower_instance_norm(ctx: LowerCtx) -> Lowered:
    """Per-instance statistics: quantized::instance_norm. With running statistics at inference
    (track_running_stats / use_input_stats=False) instance norm is a per-channel affine map
    with the running stats, i.e. batch norm: quantized::batch_norm."""
    node = ctx.node
    if node.op == "call_module":
        m = ctx.module
        running = m.track_running_stats and not m.training
        args = {"weight": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var", "eps": m.eps}
    else:
        args = _norm_args(node, "use_input_stats", True)
        running = args["use_input_stats"] is False
    if running:
        return _lower_bn(ctx, args)
    pairs = [_tensor(ctx, args["weight"]), _tensor(ctx, args["bias"])]
    return _emit(ctx, Q.instance_norm, pairs + _c(float(args["eps"])) + _out(ctx),
                 "quantized::instance_norm")


def lower_batch_norm(ctx: LowerCtx) -> Lowered:
    if ctx.node.op == "call_module":
        return _lower_bn(ctx, {"weight": "weight", "bias": "bias", "mean": "running_mean",
                               "var": "running_var", "eps": ctx.module.eps})
    return _lower_bn(ctx, _norm_args(ctx.node, "training", False))


_BN_KERNELS = {2: (Q.batch_norm1d, "quantized::batch_norm1d"),
               3: (Q.batch_norm1d, "quantized::batch_norm1d"),
               4: (Q.batch_norm2d, "quantized::batch_norm2d"),
               5: (Q.batch_norm3d, "quantized::batch_norm3d")}


def _lower_bn(ctx: LowerCtx, args: Mapping[str, Any]) -> Lowered:
    rank = len(_output_shape(ctx.node) or ())
    if rank not in _BN_KERNELS:
        return NoMatch(f"no quantized batch norm kernel for rank-{rank} input")
    fn, kernel = _BN_KERNELS[rank]
    mean, var = _tensor(ctx, args["mean"]), _tensor(ctx, args["var"])
    if mean[0] is None or var[0] is None:
        return NoMatch("no running statistics")
    weight, bias = _tensor(ctx, args["weight"]), _tensor(ctx, args["bias"])
    channels = mean[0].numel()
    if weight[0] is None:  # the kernel needs a weight and a bias: the identity affine map
        weight = _constant(ctx, f"{ctx.node.name}_unit_weight", torch.ones(channels))
    if bias[0] is None:
        bias = _constant(ctx, f"{ctx.node.name}_zero_bias", torch.zeros(channels))
    pairs = [weight, bias, mean, var] + _c(float(args["eps"])) + _out(ctx)
    return _emit(ctx, fn, pairs, kernel)


# ---------------------------------------------------------------- shared-qparams ops
def _same_op(ctx: LowerCtx, target: Any, probe_args: tuple, probe_kwargs: dict,
             kernel: str) -> Lowered:
    """Run the op itself on the quantized tensor (its kernel keeps the input's qparams).
    ``probe_args``/``probe_kwargs``: the call's other arguments with run-time values
    (sizes, pad amounts computed from shapes) replaced by stand-ins of the same kind."""
    node = ctx.node
    fn = ctx.module if node.op == "call_module" else _as_callable(node.op, target)
    err = ctx.probe(_checked(ctx, lambda qx: fn(qx, *probe_args, **probe_kwargs)))
    if err:
        return NoMatch(f"{kernel} has no quantized kernel on this engine: {err}")
    ctx.kernel = f"{kernel} on the quantized tensor"
    op = "call_module" if node.op == "call_module" else node.op
    return ctx.gm.graph.create_node(op, target, (ctx.qinputs[0], *node.args[1:]),
                                    dict(node.kwargs))


def _as_callable(op: str, target: Any) -> Callable[..., Any]:
    if op == "call_method":
        return lambda x, *a, **k: getattr(x, target)(*a, **k)
    return target


def lower_gelu(ctx: LowerCtx) -> Lowered:
    node = ctx.node
    return _same_op(ctx, node.target, tuple(node.args[1:]), dict(node.kwargs), "aten::gelu")


def lower_interpolate(ctx: LowerCtx) -> Lowered:
    node = ctx.node
    kwargs = dict(node.kwargs)
    args = tuple(node.args[1:])
    if node.op == "call_function" and _has_node(args, kwargs):
        out = _output_shape(node)
        if out is None:
            return NoMatch("interpolate size computed at run time and no example output shape")
        args, kwargs = (), {k: v for k, v in kwargs.items()
                            if k in ("mode", "align_corners", "antialias")}
        kwargs["size"] = list(out[2:])
    mode = (ctx.module.mode if node.op == "call_module"
            else _arg(node, 3, "mode", "nearest"))
    return _same_op(ctx, node.target, args, kwargs, f"upsample ({mode})")


def lower_pad(ctx: LowerCtx) -> Lowered:
    node = ctx.node
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    if node.op == "call_function":
        pad = _arg(node, 1, "pad")
        if isinstance(pad, fx.Node):
            return NoMatch("pad amounts are one tensor computed at run time; cannot probe")
        stand_in = [1 if isinstance(p, fx.Node) else p for p in pad]  # the kernel needs only
        if args:                                                       # their count
            args[0] = stand_in
        else:
            kwargs["pad"] = stand_in
        mode = _arg(node, 2, "mode", "constant")
        written = qinfo(node).original  # nn.ZeroPad2d ... that normalize rewrote into F.pad
        if isinstance(written, type):
            mode = f"{mode}; nn.{written.__name__}"
    else:
        mode = type(ctx.module).__name__
    return _same_op(ctx, node.target, tuple(args), kwargs, f"pad ({mode})")


def _has_node(args: tuple, kwargs: dict) -> bool:
    found = []
    fx.node.map_arg((args, kwargs), lambda n: found.append(n))
    return bool(found)


def lower_clamp(contiguous: bool) -> Callable[[LowerCtx], Lowered]:
    """clamp / clip / hardtanh_ (in place: lowered out of place, see check_inplace).
    ``contiguous``: qnnpack's clamp kernel is wrong on channels-last input (every quantized
    conv's output), so the input is made contiguous first."""
    def lower(ctx: LowerCtx) -> Lowered:
        node = ctx.node
        if node.op == "call_function" and node.target is F.hardtanh_:
            target, extra = F.hardtanh, (_arg(node, 1, "min_val", -1.0),
                                         _arg(node, 2, "max_val", 1.0))
        else:
            target, extra = torch.clamp, (_arg(node, 1, "min"), _arg(node, 2, "max"))
        err = ctx.probe(_checked(ctx, lambda qx: target(qx, *extra)))
        if err:
            return NoMatch(f"{target_name(target)} has no quantized kernel here: {err}")
        x = ctx.qinputs[0]
        if contiguous:
            x = ctx.gm.graph.call_method("contiguous", (x,))
            _helper(x, node, "contiguous copy (qnnpack clamp is wrong on channels-last input)")
        ctx.kernel = f"{target_name(target)} on the quantized tensor" + (
            " (made contiguous first: qnnpack)" if contiguous else "")
        return ctx.gm.graph.call_function(target, (x, *extra))
    return lower


# ---------------------------------------------------------------- the table
def activation_rules(clamp_needs_contiguous: bool = False) -> list[Rule]:
    """The rules of the native backends. ``clamp_needs_contiguous``: the engine's clamp kernel
    is wrong on channels-last input (qnnpack), so clamp's input is made contiguous first."""
    return (_activations() + _fixed_qparams() + _norms()
            + _resampling(clamp_needs_contiguous))


def _activations() -> list[Rule]:
    inplace = check_inplace
    return [
        Rule("hardswish", Op(*HARDSWISH), OWN, "quantized::hardswish", lower_hardswish,
             check=inplace, notes="own output qparams, as torch.ao"),
        Rule("elu", Op(*ELU), OWN, "quantized::elu", lower_elu, check=inplace,
             notes="own output qparams, as torch.ao"),
        Rule("selu", Op(*SELU), OWN, "quantized::elu", lower_selu, check=inplace,
             notes="quantized::elu with selu's alpha and output scale; torch.ao leaves it float"),
        Rule("celu", Op(*CELU), OWN, "quantized::celu", lower_celu, check=inplace,
             notes="own output qparams; torch.ao leaves it float"),
        Rule("leaky_relu", Op(*LEAKY_RELU), OWN, "quantized::leaky_relu", lower_leaky_relu,
             check=inplace, notes="own output qparams, as torch.ao"),
        Rule("prelu", Op(*PRELU), OWN, "quantized::prelu", lower_prelu, check=_prelu_weight,
             notes="weight quantized per-tensor affine (MinMax) to the activation dtype; "
                   "torch.ao's PReLU uses the conv weight observer and loses the slope"),
        Rule("gelu", Op(*GELU), SHARED, "aten::gelu (QuantizedCPU)", lower_gelu,
             notes="the quantized kernel keeps the input's qparams; torch.ao leaves GELU float"),
        Rule("silu", Op(*SILU), OWN, "quantized::sigmoid + quantized::mul", lower_silu,
             check=inplace, notes="x * sigmoid(x) on quantized kernels (no aten::silu kernel); "
                                  "torch.ao leaves SiLU float"),
    ]


def _fixed_qparams() -> list[Rule]:
    inplace = check_inplace
    return [
        Rule("sigmoid", Op(*SIGMOID), FIXED, "quantized::sigmoid", lower_sigmoid, fixed=UNIT,
             check=inplace, notes="output in [0, 1]: fixed scale 1/256, zero_point 0"),
        Rule("hardsigmoid", Op(*HARDSIGMOID), FIXED, "aten::hardsigmoid (QuantizedCPU)",
             _lower_fixed_aten(F.hardsigmoid, "aten::hardsigmoid (QuantizedCPU)"), fixed=UNIT,
             check=inplace, notes="output in [0, 1]: fixed scale 1/256, zero_point 0"),
        Rule("tanh", Op(*TANH), FIXED, "aten::tanh (QuantizedCPU)",
             _lower_fixed_aten(torch.tanh, "aten::tanh (QuantizedCPU)"), fixed=SIGNED_UNIT,
             check=inplace, notes="output in [-1, 1]: fixed scale 2/256, zero_point 128"),
        Rule("softmax", Op(*SOFTMAX), FIXED, "quantized::softmax", lower_softmax, fixed=UNIT,
             check=_softmax_dtype, notes="output in [0, 1]: fixed scale 1/256, zero_point 0; "
                                         "every spelling (torch.ao: nn.Softmax only)"),
    ]


def _norms() -> list[Rule]:
    return [
        Rule("layer_norm", Op(*LAYER_NORM), OWN, "quantized::layer_norm", lower_layer_norm,
             check=_tensor_args((2, "weight"), (3, "bias")),
             notes="float weight/bias, own output qparams"),
        Rule("group_norm", Op(*GROUP_NORM), OWN, "quantized::group_norm", lower_group_norm,
             check=_checks(_batched(2), _tensor_args((2, "weight"), (3, "bias"))),
             notes="float weight/bias, own output qparams"),
        Rule("instance_norm", Op(*INSTANCE_NORM), OWN,
             "quantized::instance_norm / quantized::batch_norm (running stats)",
             lower_instance_norm, check=_checks(_batched(3), _tensor_args(
                 (1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))),
             notes="with track_running_stats at inference it is batch norm with the running "
                   "stats (torch.ao ignores them)"),
        Rule("batch_norm", Op(*BATCH_NORM), OWN, "quantized::batch_norm1d/2d/3d",
             lower_batch_norm, check=_checks(_bn_eval, _tensor_args(
                 (1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))),
             notes="F.batch_norm / torch.batch_norm / nn.BatchNorm1d with running statistics"),
    ]


def _resampling(clamp_needs_contiguous: bool) -> list[Rule]:
    clamp = tuple(t for t in CLAMP if t not in CLAMP_FAMILY)  # the rest: the native table's
    return [
        Rule("interpolate", Op(*INTERPOLATE), SHARED, "aten::upsample_* (QuantizedCPU)",
             lower_interpolate, notes="nearest / nearest-exact 2d-3d, bilinear, area run "
                                      "quantized; other modes are probed and stay float"),
        Rule("pad", Op(*PAD), SHARED, "aten::constant_pad_nd / reflection_pad (QuantizedCPU)",
             lower_pad, notes="constant (any value: the shared observer sees it) and reflect "
                              "1d/2d run quantized; replicate / circular / reflect 3d stay float"),
        Rule("clamp", Op(*clamp), SHARED, "aten::clamp / hardtanh (QuantizedCPU)",
             lower_clamp(clamp_needs_contiguous), check=_checks(check_inplace, _clamp_bounds),
             notes="number bounds only; qnnpack: input made contiguous, min-and-max only"),
    ]
