"""fxquant's passes (installed as ``fxquant.passes``) and the default pipelines.

Each pipeline is an explicit ordered tuple; users build their own from the same pieces (and
their own :class:`fxquant.Pass` objects) and run it with :class:`fxquant.PassManager`.
"""
from __future__ import annotations

from fxquant.passes.annotate import Annotate
from fxquant.passes.cleanup import Cleanup
from fxquant.passes.convert import Convert
from fxquant.passes.fuse import Fuse
from fxquant.passes.insert_observers import InsertObservers
from fxquant.passes.lower_to_backend import LowerToBackend
from fxquant.passes.normalize import Normalize
from fxquant.passes.propagate_qconfig import PropagateQConfig

__all__ = ["Annotate", "Cleanup", "Convert", "Fuse", "InsertObservers", "LowerToBackend",
           "Normalize", "PropagateQConfig", "fuse_pipeline", "prepare_pipeline",
           "convert_pipeline", "reference_pipeline"]


def fuse_pipeline() -> tuple:
    return (Normalize(), Fuse())


def prepare_pipeline() -> tuple:
    return (Normalize(), Fuse(), PropagateQConfig(), Annotate(), InsertObservers())


def reference_pipeline() -> tuple:
    return (Convert(), Cleanup())


def convert_pipeline() -> tuple:
    return (Convert(), LowerToBackend(), Cleanup())
