"""The fused CPU backend: one ``torch.ops.adaptive_lr.active_step_`` call per bucket runs the
multi-tensor C++ kernels of ``csrc/cpu`` (OpenMP threads, SIMD picked for the machine)."""

from __future__ import annotations

import functools

import torch

from . import fused
from .bucket import Bucket
from .lr import lr_tensor


@functools.cache
def _import_error() -> str | None:
    """Loads ``adaptive_lr._C`` (registering its ops) on first use; the reason when it cannot."""
    try:
        from .. import _C  # noqa: F401
    except ImportError as error:
        return f"adaptive_lr._C is not built: {error}"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    if torch.device(device).type != "cpu":
        return f"the fused cpu backend runs on CPU tensors only, not on {device}"
    return _import_error()


def step(bucket: Bucket) -> None:
    # resolve() returned this function only after unavailable_reason() loaded adaptive_lr._C (not
    # re-checked here: under torch.compile a cached-function call in the step is a warning a step)
    fused.step(bucket, lr_tensor(bucket.hyper.lr, bucket.params[0]))
