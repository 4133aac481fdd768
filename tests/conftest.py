from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite's tensors are tiny: torch's intra-op threads only add latency, and contend on
    a busy 2-core machine (aminmax(dim=1) ran ~200x slower with 2 busy threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    torch.manual_seed(0)
    yield
    torch.backends.quantized.engine = engine


@pytest.fixture(autouse=True)
def _restore_backend_registry():
    """A test that registers a backend (an extension, a deliberately wrong rule) must not leak
    it into later tests: the op-table test checks every registered backend is a built-in one."""
    from fxquant.backends import registry

    registry.registered_backends()  # the built-ins are loaded before the snapshot
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def pytest_report_header(config: pytest.Config) -> str:
    """The CPU's int8 class at the top of every run: which tolerances the kernels allow."""
    from fxquant.backends.cpu import cpu_features, full_range_activations_safe

    safe = ", ".join(f"{e}={full_range_activations_safe(e)}" for e in ("fbgemm", "x86", "onednn"))
    return f"fxquant cpu_features: {cpu_features()} (full-range activations exact: {safe})"
