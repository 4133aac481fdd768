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
    module's configuration stands for. ``convert``: for call spellings whose arguments differ
    from the canonical op's (order, varargs, an implied mode), ``(args, kwargs)`` of the
    written call to those of the canonical call, or None to leave the call as written.
    ``self_tensor``: a method spelling, rewritten only when it is called on a tensor
    (``name.split(".")`` on a string stays).
    """

    target: Any
    canonical: Callable[..., Any]
    inplace: bool = False
    tensor_only: bool = False
    module_args: Optional[Callable[[nn.Module], tuple[tuple[Any, ...], dict[str, Any]]]] = None
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
