"""The fused CPU backend: one ``torch.ops.adaptive_lr.active_step_`` call per bucket runs the
multi-tensor C++ kernels of ``csrc/cpu`` (OpenMP threads, SIMD picked for the machine)."""

from __future__ import annotations

import functools

import torch

from . import layout
from .bucket import STATE_KEYS, Bucket


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


# hyperparameters the op takes as arguments of its own
_SHARED_HYPER = ("weight_decay", "maximize", "gain_inc", "gain_dec", "min_gain", "max_gain")
# each kernel's own hyperparameters, in the op's `hyper` order (csrc/include/adaptive_lr/math.h)
_KERNEL_HYPER = {
    "sgd": ("momentum", "dampening", "nesterov"),
    "adamw": ("beta1", "beta2", "eps", "amsgrad"),
    "radam": ("beta1", "beta2", "eps"),
    "adabelief": ("beta1", "beta2", "eps", "amsgrad", "rectify"),
}


def _lr_tensor(lr) -> torch.Tensor:
    """The op takes lr as a tensor (a 0-dim lr updated in place by a scheduler then needs no
    recompilation under torch.compile); a float lr is wrapped, as float64 to keep every bit."""
    if isinstance(lr, torch.Tensor):
        return lr
    return torch.tensor(lr, dtype=torch.float64)


def op_call(bucket: Bucket):
    """``torch.ops.adaptive_lr.active_step_`` and its keyword arguments for ``bucket``."""
    h = dict(bucket.hyper)
    if "betas" in h:
        h["beta1"], h["beta2"] = h["betas"]
    kwargs = dict(
        kernel=bucket.optimizer,
        params=bucket.params,
        grads=bucket.grads,
        gains=bucket.gains,
        grad_sums=bucket.grad_sums,
        prev_signs=bucket.prev_signs,
        steps=bucket.steps,
        # state-major: every tensor's first state, then every tensor's second, ...
        states=[t for key in STATE_KEYS[bucket.optimizer] for t in bucket.state.get(key, [])],
        lr=_lr_tensor(h["lr"]),
        hyper=[float(h[key]) for key in _KERNEL_HYPER[bucket.optimizer]],
        boundary=int(bucket.boundary),
        grad_scale=bucket.grad_scale,
        found_inf=bucket.found_inf,
        **{key: h[key] for key in _SHARED_HYPER},
    )
    return torch.ops.adaptive_lr.active_step_.default, kwargs


def step(bucket: Bucket) -> None:
    # resolve() returned this function only after unavailable_reason() loaded adaptive_lr._C (not
    # re-checked here: under torch.compile a cached-function call in the step is a warning a step)
    run_op(*op_call(bucket))


def run_op(op, kwargs: dict) -> None:
    """Calls one of the ops (any device) on a bucket's lists in any memory layout."""
    try:
        op(**kwargs)
    except NotImplementedError:
        # raised before anything is written, for a layout the kernels cannot index as flat arrays
        # (a strided view, a grad laid out unlike its param) or a tensor with no CPU kernel (sparse)
        lists = [name for name, value in kwargs.items() if isinstance(value, list) and value
                 and isinstance(value[0], torch.Tensor) and name != "steps"]
        if any(t.layout != torch.strided for name in lists for t in kwargs[name]):
            raise
        _step_on_flat_copies(op, kwargs, lists)


def _step_on_flat_copies(op, kwargs: dict, lists: list[str]) -> None:
    """Calls op with the tensors of every param the kernels cannot index as flat arrays replaced
    by contiguous copies, written back afterwards. The common layouts never get here: the op's
    own check is the only per-step cost."""
    n = len(kwargs["params"])
    # one row per list of n tensors; the state-major `states` holds one such row per state
    counts = {name: len(kwargs[name]) // n for name in lists}
    rows = [kwargs[name][k * n:(k + 1) * n] for name in lists for k in range(counts[name])]
    rows, writeback = layout.flat_rows(rows, lists.index("grads"))
    flat = iter(rows)
    op(**dict(kwargs, **{name: [t for _ in range(counts[name]) for t in next(flat)]
                         for name in lists}))
    for original, copy in writeback:
        original.copy_(copy)
