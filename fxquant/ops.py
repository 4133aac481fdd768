"""Op spellings: the many ways users write one op, and the one spelling fxquant rewrites them to.

This table is data: ``normalize`` reads it, the README's supported-op table is generated from
it together with the backend tables.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Spelling:
    """One way of writing an op.

    ``canonical``: the call_function target it becomes. ``inplace``: the spelling mutates its
    first argument (later readers of that argument are re-pointed to the result).
    ``tensor_only``: only rewrite when the node produced a tensor (``x.size(0) + 1`` stays).
    ``module_args``: for module spellings, a function returning the extra args/kwargs the
    module's configuration stands for.
    """

    target: Any
    canonical: Callable[..., Any]
    inplace: bool = False
    tensor_only: bool = False
    module_args: Optional[Callable[[nn.Module], tuple[tuple[Any, ...], dict[str, Any]]]] = None


def _no_args(m: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (), {}


def _flatten_args(m: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (m.start_dim, m.end_dim), {}


def _relu_inplace(m: nn.Module) -> bool:
    return bool(getattr(m, "inplace", False))


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
