"""fxquant: graph-mode quantization compiler for PyTorch."""
