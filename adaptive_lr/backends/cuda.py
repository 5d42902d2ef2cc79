"""The fused CUDA backend: one ``torch.ops.adaptive_lr.active_<optimizer>_`` call per bucket runs
the multi-tensor-apply kernels of ``csrc/cuda``, which ``setup.py`` builds into ``adaptive_lr._C``
when torch has CUDA and a CUDA toolkit is found (docs/cuda.md).

The step never synchronises with the host: lr, grad_scale, found_inf and every tensor's step
counter are read by the kernels from device memory, so a step can be captured in a CUDA graph."""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import cpu, extension
from .bucket import Bucket


@functools.cache
def _build_reason() -> str | None:
    """Why the loaded kernels have no CUDA ones (None when they have); loads them on first use."""
    reason = extension.load_error()
    if reason is not None:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key("adaptive_lr::active_adamw_", "CUDA"):
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


# The device tensor a float lr is read from, per bucket (keyed by its first param, which belongs
# to one param group), refreshed by fill_ (a kernel, no transfer, no host sync) only when the value
# changes. It lives as long as that param, so a CUDA graph that captured its address never reads
# freed memory while the model exists (an LRU cache would free it under a graph that never calls
# back into Python).
_FLOAT_LRS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):  # the stream the op will use: that device's current one
        return torch.cuda.is_current_stream_capturing()


def device_lr(lr, first_param: Tensor) -> Tensor:
    """``lr`` as a one-element tensor on ``first_param``'s device, for the kernels to read."""
    device = first_param.device
    if isinstance(lr, Tensor):  # read in the kernel: in-place changes need no host work at all
        return lr.to(device)
    lr = float(lr)
    entry = _FLOAT_LRS.get(first_param)
    if (entry is None or entry[0] != lr) and _capturing(device):
        # work enqueued during a capture runs only on replay: the cached value would be stale
        raise RuntimeError(
            "adaptive_lr: a float lr that the step before the capture did not use cannot be set "
            "inside a CUDA graph capture; pass lr as a device tensor and change it in place"
        )
    if entry is None:
        entry = _FLOAT_LRS[first_param] = [lr, torch.full((), lr, dtype=torch.float64,
                                                            device=device)]
    elif entry[0] != lr:
        entry[1].fill_(lr)
        entry[0] = lr
    return entry[1]


def step(bucket: Bucket) -> None:
    reason = _build_reason()
    if reason is not None:
        raise RuntimeError(reason)
    op, kwargs = cpu.op_call(bucket)
    kwargs["lr"] = device_lr(bucket.hyper["lr"], bucket.params[0])
    cpu.run_op(op, kwargs)
