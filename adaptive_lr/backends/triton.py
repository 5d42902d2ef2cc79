"""The Triton multi-tensor backend (adaptive_lr.kernels): not part of this build yet."""

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return "the Triton kernels are not part of this version of adaptive_lr"


def step(bucket) -> None:
    raise RuntimeError(unavailable_reason(bucket.device))
