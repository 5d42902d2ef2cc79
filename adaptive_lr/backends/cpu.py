"""The fused CPU backend: one ``torch.ops.adaptive_lr.active_step_`` call per bucket runs the
multi-tensor C++ kernels of ``csrc/cpu`` (OpenMP threads, SIMD picked for the machine)."""

from __future__ import annotations

import torch

from . import extension, fused
from .bucket import Bucket
from .lr import lr_tensor


def unavailable_reason(device: torch.device) -> str | None:
    if torch.device(device).type != "cpu":
        return f"the fused cpu backend runs on CPU tensors only, not on {device}"
    return extension.load_error()


def step(bucket: Bucket) -> None:
    # resolve() returned this function only after unavailable_reason() loaded the kernels (not
    # re-checked here: under torch.compile a cached-function call in the step is a warning a step)
    fused.step(bucket, lr_tensor(bucket.hyper.lr, bucket.params[0]))
