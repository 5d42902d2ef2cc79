"""Triton multi-tensor kernels of adaptive_lr (imported as adaptive_lr.kernels)."""
