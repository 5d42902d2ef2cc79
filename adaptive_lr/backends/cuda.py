"""The CUDA multi-tensor-apply backend (csrc/cuda): not part of this build yet."""

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return "the CUDA kernels are not built in this version of adaptive_lr"


def step(bucket) -> None:
    raise RuntimeError(unavailable_reason(bucket.device))
