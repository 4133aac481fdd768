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
from fxquant.passes.swap_qat_modules import SwapQATModules

__all__ = ["Annotate", "Cleanup", "Convert", "Fuse", "InsertObservers", "LowerToBackend",
           "Normalize", "PropagateQConfig", "SwapQATModules", "fuse_pipeline", "prepare_pipeline",
           "prepare_qat_pipeline",
           "convert_pipeline", "reference_pipeline"]


def fuse_pipeline() -> tuple:
    return (Normalize(), Fuse())


def prepare_pipeline() -> tuple:
    return (Normalize(), Fuse(), PropagateQConfig(), Annotate(), InsertObservers())


def prepare_qat_pipeline() -> tuple:
    """Quantization-aware training: as prepare, then the weighted modules become QAT modules
    (run with options ``is_qat=True`` so fuse keeps BatchNorm for simulated folding)."""
    return (Normalize(), Fuse(), PropagateQConfig(), Annotate(), InsertObservers(),
            SwapQATModules())


def reference_pipeline() -> tuple:
    return (Convert(), Cleanup())


def convert_pipeline() -> tuple:
    return (Convert(), LowerToBackend(), Cleanup())
