"""The fused CUDA backend: one ``torch.ops.adaptive_lr.active_step_`` call per bucket runs
the multi-tensor-apply kernels of ``csrc/cuda``, which ``setup.py`` builds into ``adaptive_lr._C``
when torch has CUDA and a CUDA toolkit is found (docs/cuda.md).

The step never synchronises with the host: lr, grad_scale, found_inf and every tensor's step
counter are read by the kernels from device memory, so a step can be captured in a CUDA graph."""

from __future__ import annotations

import functools
import sys

import torch

from . import extension, fused
from .bucket import Bucket
from .lr import lr_tensor


@functools.cache
def _build_reason() -> str | None:
    """Why the loaded kernels have no CUDA ones (None when they have); loads them on first use."""
    reason = extension.load_error()
    if reason is not None:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key("adaptive_lr::active_step_", "CUDA"):
        built = ("adaptive_lr._C was built without its CUDA kernels"
                 if sys.modules.get("adaptive_lr._C") is not None
                 else "adaptive_lr._C does not load, and the kernels compiled on first use are "
                 "CPU-only")
        return (
            f"{built} (setup.py builds them when torch has CUDA and a CUDA toolkit is found; this "
            f"torch {torch.__version__} has CUDA {torch.version.cuda})"
        )
    return None


# setup.py builds sm_80 and sm_90 code (plus compute_90 PTX): an older GPU has no kernel image,
# and "auto" must then pick triton instead of failing at the first step.
MIN_COMPUTE_CAPABILITY = (8, 0)


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"the fused cuda backend runs on CUDA tensors only, not on {device}"
    reason = _build_reason()
    if reason is None and not torch.cuda.is_available():
        return "no CUDA device is available"
    if reason is None and torch.cuda.get_device_capability(device) < MIN_COMPUTE_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        return (f"{device} has compute capability {major}.{minor}; the CUDA kernels are built for "
                "8.0 and newer (A100, H100, ...)")
    return reason


def step(bucket: Bucket) -> None:
    reason = _build_reason()
    if reason is not None:
        raise RuntimeError(reason)
    fused.step(bucket, lr_tensor(bucket.hyper.lr, bucket.params[0]))
