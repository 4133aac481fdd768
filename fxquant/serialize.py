"""Safe model files: :func:`save` / :func:`load`. (Work in progress.)"""
from __future__ import annotations

import torch.fx as fx

PREPARED_STATE_KEY = "fxquant_prepared_state"


def remember_prepared(gm: fx.GraphModule) -> None:
    """Called by ``convert`` on the prepared model it starts from: keep its state (weights,
    observer / fake-quant statistics: plain tensors) in ``gm.meta`` for :func:`save`."""
    gm.meta[PREPARED_STATE_KEY] = {k: v.detach().clone() for k, v in gm.state_dict().items()}
