"""Functional weighted ops (``F.linear``, ``F.conv1d/2d/3d``) whose weights are parameters of
the model are rewritten as the equivalent module, sharing the same Parameter objects, so that
fusion, qconfig propagation, observation, prepacking and QAT treat them exactly like modules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxquant.patterns import NoMatch


@dataclass(frozen=True)
class FunctionalWeighted:
    function: Callable[..., Any]
    module: type
    arg_names: tuple[str, ...]  # positional parameter names after (input, weight, bias)
    defaults: tuple[Any, ...]


FUNCTIONAL_WEIGHTED: tuple[FunctionalWeighted, ...] = (
    FunctionalWeighted(F.linear, nn.Linear, (), ()),
    FunctionalWeighted(F.conv1d, nn.Conv1d, ("stride", "padding", "dilation", "groups"),
                       (1, 0, 1, 1)),
    FunctionalWeighted(F.conv2d, nn.Conv2d, ("stride", "padding", "dilation", "groups"),
                       (1, 0, 1, 1)),
    FunctionalWeighted(F.conv3d, nn.Conv3d, ("stride", "padding", "dilation", "groups"),
                       (1, 0, 1, 1)),
)


def functional_entry(node: fx.Node) -> Optional[FunctionalWeighted]:
    if node.op != "call_function":
        return None
    for entry in FUNCTIONAL_WEIGHTED:
        if node.target is entry.function:
            return entry
    return None


def _tensor_attr(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def build_module(gm: fx.GraphModule, node: fx.Node, entry: FunctionalWeighted
                 ) -> "nn.Module | NoMatch":
    """The module equivalent to ``node`` (sharing its weight/bias tensors), or why not."""
    weight = _tensor_attr(gm, _argument(node, 1, "weight", None))
    if weight is None:
        return NoMatch("the weight is computed at run time, not a parameter of the model")
    bias_arg = _argument(node, 2, "bias", None)
    bias = _tensor_attr(gm, bias_arg)
    if bias_arg is not None and bias is None:
        return NoMatch("the bias is computed at run time, not a parameter of the model")
    hyper = {name: _argument(node, 3 + i, name, d)
             for i, (name, d) in enumerate(zip(entry.arg_names, entry.defaults))}
    if any(isinstance(v, fx.Node) for v in hyper.values()):
        return NoMatch("stride/padding/dilation/groups are only known at run time")
    module = _make(entry, weight, bias is not None, hyper)
    module.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, False)
    if bias is not None:
        module.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
    return module


def _make(entry: FunctionalWeighted, weight: torch.Tensor, has_bias: bool,
          hyper: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):
        if entry.module is nn.Linear:
            return nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        groups = hyper["groups"]
        return entry.module(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                            stride=hyper["stride"], padding=hyper["padding"],
                            dilation=hyper["dilation"], groups=groups, bias=has_bias)
