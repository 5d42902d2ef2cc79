"""The Triton backend: one multi-tensor kernel launch per bucket (``adaptive_lr.kernels``).

Runs on CUDA tensors wherever triton imports, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported; slow, for tests). The step path never
synchronises with the host: lr, grad_scale, found_inf, the step counters and the hyperparameters
are read by the kernel from device memory (see docs/triton.md).

Supported: triton >= 3.4 (the triton that torch's CUDA wheels ship from torch 2.8 on; older ones
lack ``triton.knobs``). The Triton interpreter of triton < 3.7 also needs numpy < 2.4: it turns
one-element arrays into Python ints, which numpy 2.4 refuses (compiled GPU kernels are unaffected)."""

from __future__ import annotations

import dataclasses

import functools
import importlib.util

import torch

from . import layout
from .bucket import Bucket
from .lr import lr_tensor

MIN_TRITON = (3, 4)
# the first triton whose interpreter runs with numpy >= 2.4 (NUMPY_BREAKING_INTERPRETER)
INTERPRETER_FIXED_TRITON = (3, 7)
NUMPY_BREAKING_INTERPRETER = (2, 4)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0" or "3.4.0+git1234"."""
    return tuple(int(part) for part in version.split(".")[:2])


def version_reason(triton_version: str, numpy_version: str | None, interpret: bool) -> str | None:
    """Why these versions cannot run the kernels (None when they can); ``numpy_version`` is None
    when numpy is not installed."""
    if _release(triton_version) < MIN_TRITON:
        return (f"triton {triton_version} is older than 3.4, the oldest the kernels support "
                "(torch >= 2.8 ships a supported triton)")
    if not interpret:
        return None
    if numpy_version is None:
        return "the Triton interpreter needs numpy (pip install numpy)"
    if (_release(triton_version) < INTERPRETER_FIXED_TRITON
            and _release(numpy_version) >= NUMPY_BREAKING_INTERPRETER):
        return (f"the Triton interpreter of triton {triton_version} fails with numpy "
                f"{numpy_version}: use numpy < 2.4 or triton >= 3.7")
    return None


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
    import triton

    too_old = version_reason(triton.__version__, None, interpret=False)
    if too_old is not None:  # checked before importing knobs, which old tritons lack
        return too_old
    from triton import knobs

    interpret = bool(knobs.runtime.interpret)  # TRITON_INTERPRET, parsed as triton parses it
    if device.type == "cpu" and not interpret:
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (the Triton interpreter)"
    numpy_version = None
    if interpret and importlib.util.find_spec("numpy") is not None:
        import numpy

        numpy_version = numpy.__version__
    return version_reason(triton.__version__, numpy_version, interpret) or _kernels_reason(interpret)


def step(bucket: Bucket) -> None:
    from adaptive_lr import kernels

    h, spec = bucket.hyper, bucket.spec
    rows = [bucket.params, bucket.grads, bucket.gains, bucket.grad_sums, bucket.prev_signs,
            bucket.steps]
    rows += [bucket.state[key] for key in spec.state_keys(h)]
    if bucket.grad_sq_sums is not None:  # laid out with the others, then handed over apart
        rows.append(bucket.grad_sq_sums)
    contiguous = all(t.is_contiguous() for row in rows for t in row)
    # the kernel indexes every tensor as a flat array: other layouts run on copies
    rows, writeback = (rows, ()) if contiguous else layout.flat_rows(
        rows, kernels.ROWS.index("grad"), (kernels.ROWS.index("step"),))
    grad_sq_sums = None if bucket.grad_sq_sums is None else rows.pop()
    kernels.active_step(
        spec.kernel, rows, spec.kernel_hyper(h),
        lr=lr_tensor(h.lr, bucket.params[0]),
        weight_decay=h.weight_decay if spec.decoupled_weight_decay(h) else 0.0,
        gain_rule=dataclasses.astuple(h.gain_rule()), epoch_steps=bucket.epoch_steps,
        maximize=h.maximize, boundary=int(bucket.boundary), contiguous=contiguous,
        rounding_seeds=bucket.rounding_seeds, grad_sq_sums=grad_sq_sums,
        grad_scale=bucket.grad_scale, found_inf=bucket.found_inf,
    )
    for original, copy in writeback:
        original.copy_(copy)
