"""Op spellings: the many ways users write one op, and the one spelling fxquant rewrites them to.

This table is data: ``normalize`` reads it, the README's supported-op table is generated from
it together with the backend tables.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Spelling:
    """One way of writing an op.

    ``canonical``: the call_function target it becomes. ``inplace``: the spelling mutates its
    first argument (later readers of that argument are re-pointed to the result).
    ``tensor_only``: only rewrite when the node produced a tensor (``x.size(0) + 1`` stays).
    ``module_args``: for module spellings, a function returning the extra args/kwargs the
    module's configuration stands for, or None to keep that module as written (its function
    form would change what it computes). ``convert``: for call spellings whose arguments differ
    from the canonical op's (order, varargs, an implied mode), ``(args, kwargs)`` of the
    written call to those of the canonical call, or None to leave the call as written.
    ``self_tensor``: a method spelling, rewritten only when it is called on a tensor
    (``name.split(".")`` on a string stays).
    """

    target: Any
    canonical: Callable[..., Any]
    inplace: bool = False
    tensor_only: bool = False
    module_args: Optional[Callable[[nn.Module],
                                   Optional[tuple[tuple[Any, ...], dict[str, Any]]]]] = None
    convert: Optional[Callable[[tuple[Any, ...], dict[str, Any]],
                               Optional[tuple[tuple[Any, ...], dict[str, Any]]]]] = None
    self_tensor: bool = False


Args = tuple[tuple[Any, ...], dict[str, Any]]


def _no_args(m: nn.Module) -> Args:
    return (), {}


def _flatten_args(m: nn.Module) -> Args:
    return (m.start_dim, m.end_dim), {}


def _relu_inplace(m: nn.Module) -> bool:
    return bool(getattr(m, "inplace", False))


def _attrs(*names: str) -> Callable[[nn.Module], Args]:
    """A stateless module's configuration as the positional arguments of its function, in the
    order its ``forward`` passes them (``nn.ELU(alpha)`` → ``F.elu(x, alpha)``)."""
    def read(m: nn.Module) -> Args:
        return tuple(getattr(m, n) for n in names), {}
    return read


def _gelu_args(m: nn.Module) -> Args:
    return (), ({"approximate": m.approximate} if m.approximate != "none" else {})


def _softmax_module_args(m: nn.Module) -> Optional[Args]:
    """``nn.Softmax(dim)`` → ``F.softmax(x, dim)`` (``nn.LogSoftmax``: ``F.log_softmax``);
    ``nn.Softmax()`` (dim None: torch's legacy dim chosen from the input's rank at each call)
    stays a module."""
    if isinstance(m, nn.Softmax2d):
        return (-3,), {}
    return None if m.dim is None else ((m.dim,), {})


def _upsample_args(m: nn.Module) -> Args:
    """``nn.Upsample`` / ``nn.UpsamplingNearest2d`` / ``nn.UpsamplingBilinear2d`` →
    ``F.interpolate`` with the module's size, scale_factor, mode and align_corners (and
    recompute_scale_factor when set), as its forward passes them."""
    kw = {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode,
          "align_corners": m.align_corners}
    if getattr(m, "recompute_scale_factor", None) is not None:
        kw["recompute_scale_factor"] = m.recompute_scale_factor
    return (), kw


def _pad_args(mode: str) -> Callable[[nn.Module], Args]:
    """``nn.ZeroPad2d`` / ``nn.ConstantPad2d`` / ``nn.ReflectionPad2d`` ... → ``F.pad(x,
    padding, mode=..., value=...)``."""
    def read(m: nn.Module) -> Args:
        kw: dict[str, Any] = {"mode": mode}
        if mode == "constant":
            kw["value"] = float(m.value)
        return (tuple(m.padding),), kw
    return read


def _max_pool_args(m: nn.Module) -> Args:
    """``nn.MaxPool2d`` → ``F.max_pool2d(x, kernel_size, stride, padding, dilation,
    ceil_mode=..., return_indices=...)``, as its forward passes them. ``return_indices=True``
    is rewritten too: F.max_pool2d then returns the same (values, indices) tuple."""
    return ((m.kernel_size, m.stride, m.padding, m.dilation),
            {"ceil_mode": m.ceil_mode, "return_indices": m.return_indices})


def _avg_pool_args(m: nn.Module) -> Args:
    """``nn.AvgPool2d`` → ``F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode,
    count_include_pad, divisor_override)`` (``nn.AvgPool1d`` has no divisor_override)."""
    args = (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
    return (args + (m.divisor_override,) if hasattr(m, "divisor_override") else args), {}


def _adaptive_max_pool_args(m: nn.Module) -> Args:
    """``nn.AdaptiveMaxPool2d`` → ``F.adaptive_max_pool2d(x, output_size, return_indices)``:
    the same tensor, or the same (values, indices) tuple."""
    return (m.output_size, m.return_indices), {}


def _pools(canonical: str, module_args: Callable[[nn.Module], Any], cls: str
           ) -> tuple[Spelling, ...]:
    """``nn.MaxPool1d/2d/3d`` ... → ``F.max_pool1d/2d/3d`` ... (``canonical``/``cls`` with
    ``{d}`` for the rank)."""
    return tuple(s for d in (1, 2, 3)
                 for s in _modules(getattr(F, canonical.format(d=d)), module_args,
                                   cls.format(d=d)))


def _modules(canonical: Callable[..., Any], module_args: Callable[[nn.Module], Any],
             *names: str) -> tuple[Spelling, ...]:
    """Stateless module classes of this torch build (by name) → ``canonical``."""
    return tuple(Spelling(getattr(nn, n), canonical, module_args=module_args)
                 for n in names if getattr(nn, n, None) is not None)


# ---------------------------------------------------------------- argument converters
def _binary(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[Args]:
    """``a - b`` / ``a / b`` → ``torch.sub(a, b)`` / ``torch.div(a, b)``: only with a tensor
    first operand (``1 - x`` has no torch.sub form) and without ``out=``."""
    if len(args) != 2 or not isinstance(args[0], fx.Node) or "out" in kwargs:
        return None
    return args, kwargs


def _softmax(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[Args]:
    """``torch.softmax(x, dim, dtype)`` / ``x.softmax(dim, dtype)`` → ``F.softmax(x, dim,
    dtype=dtype)`` (F.softmax's third parameter is ``_stacklevel``)."""
    kw = dict(kwargs)
    if len(args) > 2:
        kw["dtype"] = args[2]
    return tuple(args[:2]), kw


def _dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[Args]:
    """``x.reshape(2, -1)`` / ``x.permute(0, 2, 1)`` / ``x.flip(0)`` (varargs) → one sequence
    argument, as the torch function takes it. A single graph value of unknown kind (an int or a
    shape?) leaves the call as written."""
    if len(args) != 2:
        return ((args[0], tuple(args[1:])), kwargs) if len(args) > 2 else (args, kwargs)
    dims = args[1]
    if isinstance(dims, (list, tuple)):
        return args, kwargs
    if isinstance(dims, int):
        return (args[0], (dims,)), kwargs
    from fxquant.meta import qinfo

    value = qinfo(dims).value if isinstance(dims, fx.Node) else None
    if value is None:
        return None
    if value.python_type == "int":
        return (args[0], (dims,)), kwargs
    return (args, kwargs) if value.python_type in ("Size", "tuple", "list") else None


def _drop_from(index: int, name: str) -> Callable[[tuple[Any, ...], dict[str, Any]],
                                                  Optional[Args]]:
    """``torch.layer_norm`` / ``torch.group_norm``: F's form without the trailing cudnn flag."""
    def convert(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[Args]:
        return tuple(args[:index]), {k: v for k, v in kwargs.items() if k != name}
    return convert


def _reorder_norm(flag: str) -> Callable[[tuple[Any, ...], dict[str, Any]], Optional[Args]]:
    """``torch.batch_norm`` / ``torch.instance_norm`` (input, weight, bias, running_mean,
    running_var, flag, momentum, eps, cudnn_enabled) → ``F.*`` (input, running_mean,
    running_var, weight, bias, flag, momentum, eps)."""
    written = ("input", "weight", "bias", "running_mean", "running_var", flag, "momentum",
               "eps", "cudnn_enabled")
    wanted = ("input", "running_mean", "running_var", "weight", "bias", flag, "momentum", "eps")

    def convert(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[Args]:
        bound = {**dict(zip(written, args)), **kwargs}
        if not set(wanted) <= set(bound) or not set(bound) <= set(written):
            return None
        return tuple(bound[n] for n in wanted), {}
    return convert


def _upsample(mode: str, align_corners: Optional[bool]
              ) -> Callable[[tuple[Any, ...], dict[str, Any]], Optional[Args]]:
    """``F.upsample_nearest`` / ``F.upsample_bilinear`` (input, size, scale_factor) →
    ``F.interpolate`` with the mode (and align_corners) they imply."""
    def convert(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[Args]:
        kw = {**kwargs, "mode": mode}
        if align_corners is not None:
            kw["align_corners"] = align_corners
        return tuple(args[:3]), kw
    return convert


def _constant_pad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[Args]:
    """``torch.constant_pad_nd(x, pad, value)`` → ``F.pad(x, pad, mode="constant", value=v)``."""
    bound = {**dict(zip(("input", "pad", "value"), args)), **kwargs}
    if "input" not in bound or "pad" not in bound:
        return None
    return (bound["input"], bound["pad"]), {"mode": "constant", "value": bound.get("value", 0)}


def _aliases(canonical: Callable[..., Any], *targets: Any, inplace: bool = False,
             convert: Any = None, tensor_only: bool = False) -> tuple[Spelling, ...]:
    """Spellings of ``canonical``: each target that exists in this torch build, once (several
    names of one object, ``torch.special.expit`` is ``torch._C._special.special_expit``)."""
    out: list[Spelling] = []
    for t in targets:
        if t is None or t is canonical or any(t is s.target for s in out):
            continue
        out.append(Spelling(t, canonical, inplace=inplace, convert=convert,
                            tensor_only=tensor_only, self_tensor=isinstance(t, str)))
    return tuple(out)


def _methods(*names: str) -> tuple[Spelling, ...]:
    """``x.name(...)`` → ``torch.name(x, ...)``: same arguments, same result."""
    return tuple(Spelling(n, getattr(torch, n), self_tensor=True) for n in names)


SPELLINGS: tuple[Spelling, ...] = (
    # relu
    Spelling(nn.ReLU, F.relu, module_args=_no_args),
    Spelling(F.relu, F.relu),
    Spelling(torch.relu, F.relu),
    Spelling(torch.relu_, F.relu, inplace=True),
    Spelling(F.relu_, F.relu, inplace=True),
    Spelling("relu", F.relu),
    Spelling("relu_", F.relu, inplace=True),
    # add
    Spelling(operator.add, torch.add, tensor_only=True),
    Spelling(operator.iadd, torch.add, inplace=True, tensor_only=True),
    Spelling(torch.add, torch.add, tensor_only=True),
    Spelling("add", torch.add, tensor_only=True),
    Spelling("add_", torch.add, inplace=True, tensor_only=True),
    # mul
    Spelling(operator.mul, torch.mul, tensor_only=True),
    Spelling(operator.imul, torch.mul, inplace=True, tensor_only=True),
    Spelling(torch.mul, torch.mul, tensor_only=True),
    Spelling("mul", torch.mul, tensor_only=True),
    Spelling("mul_", torch.mul, inplace=True, tensor_only=True),
    # cat
    Spelling(torch.cat, torch.cat),
    Spelling(torch.concat, torch.cat),
    Spelling(torch.concatenate, torch.cat),
    # flatten
    Spelling(nn.Flatten, torch.flatten, module_args=_flatten_args),
    Spelling(torch.flatten, torch.flatten),
    Spelling("flatten", torch.flatten),
    # arithmetic and matmul (a @ b; torch.bmm is torch.matmul on the 3-d tensors it accepts)
    *_aliases(torch.sub, operator.sub, torch.subtract, "sub", convert=_binary, tensor_only=True),
    *_aliases(torch.sub, operator.isub, "sub_", inplace=True, convert=_binary, tensor_only=True),
    *_aliases(torch.div, operator.truediv, torch.divide, "div", convert=_binary,
              tensor_only=True),
    *_aliases(torch.div, operator.itruediv, "div_", inplace=True, convert=_binary,
              tensor_only=True),
    *_aliases(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm", tensor_only=True),
    *_aliases(torch.mean, "mean"),
    # activations and fixed-qparams ops
    *_aliases(torch.sigmoid, F.sigmoid, getattr(torch.special, "expit", None),
              getattr(getattr(torch._C, "_special", None), "special_expit", None), "sigmoid"),
    *_aliases(torch.sigmoid, torch.sigmoid_, "sigmoid_", inplace=True),
    *_aliases(torch.tanh, F.tanh, "tanh"),
    *_aliases(torch.tanh, torch.tanh_, "tanh_", inplace=True),
    *_aliases(F.softmax, torch.softmax, getattr(torch.special, "softmax", None), "softmax",
              convert=_softmax),
    *_aliases(F.log_softmax, torch.log_softmax, getattr(torch.special, "log_softmax", None),
              "log_softmax", convert=_softmax),
    *_aliases(F.hardtanh, F.hardtanh_, inplace=True),
    # (x.clamp_ / torch.clamp_ / clip_ stay as written, their readers re-pointed: the backends'
    # rule for them checks at annotate time that the bounds are numbers, which the rule for
    # the out-of-place clamp leaves to lowering's probe)
    *_aliases(torch.clamp, torch.clip, "clamp", "clip"),
    *_aliases(F.elu, F.elu_, inplace=True),
    *_aliases(F.leaky_relu, F.leaky_relu_, inplace=True),
    *_aliases(F.selu, torch.selu),
    *_aliases(F.selu, torch.selu_, inplace=True),
    *_aliases(F.celu, torch.celu),
    *_aliases(F.celu, torch.celu_, inplace=True),
    *_aliases(F.prelu, torch.prelu, "prelu"),
    # normalizations
    *_aliases(F.layer_norm, torch.layer_norm, convert=_drop_from(5, "cudnn_enable")),
    *_aliases(F.group_norm, torch.group_norm, convert=_drop_from(5, "cudnn_enabled")),
    *_aliases(F.batch_norm, torch.batch_norm, convert=_reorder_norm("training")),
    *_aliases(F.instance_norm, torch.instance_norm, convert=_reorder_norm("use_input_stats")),
    # resampling and padding
    *_aliases(F.interpolate, F.upsample),
    *_aliases(F.interpolate, F.upsample_nearest, convert=_upsample("nearest", None)),
    *_aliases(F.interpolate, F.upsample_bilinear, convert=_upsample("bilinear", True)),
    *_aliases(F.pad, torch.constant_pad_nd, convert=_constant_pad),
    # ops that move values without changing them (methods → the torch function)
    *_aliases(torch.reshape, "reshape", convert=_dims),
    *_aliases(torch.permute, "permute", convert=_dims),
    *_aliases(torch.flip, "flip", convert=_dims),
    *_aliases(torch.transpose, "transpose", torch.swapaxes, "swapaxes"),
    *_aliases(torch.movedim, "movedim"),
    *_methods("squeeze", "unsqueeze", "t", "narrow", "unflatten", "chunk", "split", "unbind",
              "tensor_split"),
    # stateless modules → their function, the module's configuration as its arguments; the
    # node keeps the module's path (module_name rules, reports) and its class (object_type
    # rules: qinfo's ``original``). Modules with state (conv, linear, norms, prelu, embedding,
    # rnn) stay modules, and so do nn.Softmax() / nn.LogSoftmax() with dim None (implicit,
    # rank-dependent dim)
    # and nn.LPPool* (no table, quantized or float export, names lp_pool in either form).
    *_modules(F.relu6, _no_args, "ReLU6"),
    *_modules(F.hardtanh, _attrs("min_val", "max_val"), "Hardtanh"),
    *_modules(F.hardswish, _no_args, "Hardswish"),
    *_modules(F.elu, _attrs("alpha"), "ELU"),
    *_modules(F.selu, _no_args, "SELU"),
    *_modules(F.celu, _attrs("alpha"), "CELU"),
    *_modules(F.leaky_relu, _attrs("negative_slope"), "LeakyReLU"),
    *_modules(F.gelu, _gelu_args, "GELU"),
    *_modules(F.silu, _no_args, "SiLU"),
    *_modules(torch.sigmoid, _no_args, "Sigmoid"),
    *_modules(F.hardsigmoid, _no_args, "Hardsigmoid"),
    *_modules(torch.tanh, _no_args, "Tanh"),
    *_modules(F.softmax, _softmax_module_args, "Softmax", "Softmax2d"),
    *_modules(F.log_softmax, _softmax_module_args, "LogSoftmax"),
    *_modules(F.interpolate, _upsample_args, "Upsample", "UpsamplingNearest2d",
              "UpsamplingBilinear2d"),
    *_modules(F.pad, _pad_args("constant"), "ZeroPad1d", "ZeroPad2d", "ZeroPad3d",
              "ConstantPad1d", "ConstantPad2d", "ConstantPad3d"),
    *_modules(F.pad, _pad_args("reflect"), "ReflectionPad1d", "ReflectionPad2d",
              "ReflectionPad3d"),
    *_modules(F.pad, _pad_args("replicate"), "ReplicationPad1d", "ReplicationPad2d",
              "ReplicationPad3d"),
    *_modules(F.pad, _pad_args("circular"), "CircularPad1d", "CircularPad2d", "CircularPad3d"),
    *_modules(F.pixel_shuffle, _attrs("upscale_factor"), "PixelShuffle"),
    *_modules(F.pixel_unshuffle, _attrs("downscale_factor"), "PixelUnshuffle"),
    *_modules(torch.unflatten, _attrs("dim", "unflattened_size"), "Unflatten"),
    *_pools("max_pool{d}d", _max_pool_args, "MaxPool{d}d"),
    *_pools("avg_pool{d}d", _avg_pool_args, "AvgPool{d}d"),
    *_pools("adaptive_avg_pool{d}d", _attrs("output_size"), "AdaptiveAvgPool{d}d"),
    *_pools("adaptive_max_pool{d}d", _adaptive_max_pool_args, "AdaptiveMaxPool{d}d"),
)

# Ops that are the identity at inference: removed by normalize when the model is not training.
DROPOUT_MODULES: tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                     nn.AlphaDropout)
DROPOUT_FUNCTIONS: tuple[Any, ...] = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                      F.alpha_dropout, "dropout")
IDENTITY_MODULES: tuple[type, ...] = (nn.Identity,)


def spelling_for(node_op: str, target: Any, module: Optional[nn.Module]) -> Optional[Spelling]:
    key: Any = type(module) if node_op == "call_module" else target
    for s in SPELLINGS:
        if node_op == "call_module" and isinstance(s.target, type) and key is s.target:
            return s
        if node_op == "call_function" and not isinstance(s.target, (str, type)) and key is s.target:
            return s
        if node_op == "call_method" and isinstance(s.target, str) and key == s.target:
            return s
    return None


def module_is_inplace(module: Optional[nn.Module]) -> bool:
    return module is not None and _relu_inplace(module)
