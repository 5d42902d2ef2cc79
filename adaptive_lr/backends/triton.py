"""The Triton backend: one multi-tensor kernel launch per bucket (``adaptive_lr.kernels``).

Runs on CUDA tensors wherever triton imports, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported; slow, for tests). The step path never
synchronises with the host: lr, grad_scale, found_inf, the step counters and the hyperparameters
are read by the kernel from device memory (see docs/triton.md)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch

from .bucket import Bucket


@functools.lru_cache(maxsize=None)
def _kernels_reason(interpret: bool) -> str | None:
    """Why ``adaptive_lr.kernels`` cannot be used (None when it can); cached: resolve() asks
    on every step."""
    try:
        from adaptive_lr import kernels
        from adaptive_lr.kernels.active_step import active_step_kernel
    except ImportError as error:  # e.g. a broken triton install or a build that lacks kernels/
        return f"adaptive_lr.kernels cannot be imported: {error}"
    from triton.runtime.interpreter import InterpretedFunction

    if interpret and not isinstance(active_step_kernel, InterpretedFunction):
        return ("adaptive_lr.kernels was imported before TRITON_INTERPRET=1 was set; "
                "set it before anything imports triton")
    del kernels
    return None


def unavailable_reason(device: torch.device) -> str | None:
    if device.type not in ("cuda", "cpu"):
        return f"the Triton kernels target CUDA devices, not {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    from triton import knobs

    interpret = bool(knobs.runtime.interpret)  # TRITON_INTERPRET, parsed as triton parses it
    if device.type == "cpu" and not interpret:
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (the Triton interpreter)"
    return _kernels_reason(interpret)


def step(bucket: Bucket) -> None:
    from adaptive_lr import kernels

    rows = [bucket.params, bucket.grads, bucket.gains, bucket.grad_sums, bucket.prev_signs,
            bucket.steps]
    rows += [bucket.state[key] for key in bucket.spec.state_keys(bucket.hyper)]
    hyper = {f.name: getattr(bucket.hyper, f.name) for f in dataclasses.fields(bucket.hyper)}
    kernels.active_step(bucket.spec.kernel, rows, hyper, int(bucket.boundary),
                        bucket.grad_scale, bucket.found_inf)
