"""The call of the fused op ``torch.ops.adaptive_lr.active_step_`` shared by the cpu and cuda
backends: one call steps a whole bucket, the optimizer named by its spec's kernel."""

from __future__ import annotations

import torch

from . import layout
from .bucket import Bucket


def op_kwargs(bucket: Bucket, lr: torch.Tensor) -> dict:
    """The op's arguments for ``bucket``, its lr given as the tensor the kernels read."""
    h, spec = bucket.hyper, bucket.spec
    return dict(
        kernel=spec.kernel,
        params=bucket.params,
        grads=bucket.grads,
        gains=bucket.gains,
        grad_sums=bucket.grad_sums,
        prev_signs=bucket.prev_signs,
        steps=bucket.steps,
        # state-major: state k of tensor i at k * len(params) + i
        states=[t for key in spec.state_keys(h) for t in bucket.state[key]],
        lr=lr,
        hyper=spec.kernel_hyper(h),
        weight_decay=h.weight_decay if spec.decoupled_weight_decay(h) else 0.0,
        maximize=h.maximize,
        gain_inc=h.gain_inc,
        gain_dec=h.gain_dec,
        min_gain=h.min_gain,
        max_gain=h.max_gain,
        boundary=int(bucket.boundary),
        grad_scale=bucket.grad_scale,
        found_inf=bucket.found_inf,
    )


def run(kwargs: dict) -> None:
    """Calls the op (any device) on a bucket's lists in any memory layout."""
    op = torch.ops.adaptive_lr.active_step_.default
    try:
        op(**kwargs)
    except NotImplementedError:
        # raised before anything is written, for a layout the kernels cannot index as flat arrays
        # (a strided view, a grad laid out unlike its param) or a tensor with no CPU kernel (sparse)
        if any(t.layout != torch.strided for name in _LISTS for t in kwargs[name]):
            raise
        _run_on_flat_copies(op, kwargs)


# the per-tensor lists of the op, params first; states is state-major (n tensors per state)
_LISTS = ("params", "grads", "gains", "grad_sums", "prev_signs", "states")


def _run_on_flat_copies(op, kwargs: dict) -> None:
    """Calls op with the tensors of every param the kernels cannot index as flat arrays replaced
    by contiguous copies, written back afterwards. The common layouts never get here: the op's
    own check is the only per-step cost."""
    n = len(kwargs["params"])
    states = kwargs["states"]
    rows = [kwargs[name] for name in _LISTS[:-1]]
    rows += [states[k:k + n] for k in range(0, len(states), n)]
    rows, writeback = layout.flat_rows(rows, _LISTS.index("grads"))
    flat = dict(zip(_LISTS[:-1], rows), states=[t for row in rows[len(_LISTS) - 1:] for t in row])
    op(**dict(kwargs, **flat))
    for original, copy in writeback:
        original.copy_(copy)
