from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    torch.manual_seed(0)
    yield
    torch.backends.quantized.engine = engine
