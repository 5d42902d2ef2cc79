"""Calling the compiled fused ops from the cpu and cuda backends: ``active_step_`` (one call steps
a whole bucket, the optimizer named by its spec's kernel) and, through ``run``, any op that takes
per-tensor lists (Active(optimizer)'s ``active_rescale_``)."""

from __future__ import annotations

import torch

from . import layout
from .bucket import Bucket


def step(bucket: Bucket, lr: torch.Tensor) -> None:
    """One call of active_step_ for ``bucket``, its lr given as the tensor the kernels read."""
    run(torch.ops.adaptive_lr.active_step_.default, _op_kwargs(bucket, lr))


# Each kernel's hyperparameter names in the order its op takes them (the C++ tag's kHyper), asked
# of the op once per kernel (a dict, not functools.cache: torch.compile traces the step).
_HYPER_ORDER: dict[str, tuple[str, ...]] = {}


def kernel_hyper(spec, h) -> list[float]:
    """The op's ``hyper`` list: the spec's hyperparameters for record ``h``, by name, in the order
    its C++ kernel takes them."""
    names = _HYPER_ORDER.get(spec.kernel)
    if names is None:
        hyper, _, _ = torch.ops.adaptive_lr.kernel_signature(spec.kernel)
        names = _HYPER_ORDER[spec.kernel] = tuple(hyper)
    values = spec.kernel_hyper(h)
    if len(values) != len(names) or not all(name in values for name in names):
        raise ValueError(f"adaptive_lr: the spec of kernel {spec.kernel!r} names the "
                         f"hyperparameters {tuple(values)}, its C++ kernel takes {names}")
    return [values[name] for name in names]


def _op_kwargs(bucket: Bucket, lr: torch.Tensor) -> dict:
    """The op's arguments for ``bucket``, its lr given as the tensor the kernels read."""
    h, spec = bucket.hyper, bucket.spec
    return dict(
        kernel=spec.kernel,
        params=bucket.params,
        grads=bucket.grads,
        gains=bucket.gains,
        grad_sums=bucket.grad_sums,
        grad_sq_sums=bucket.grad_sq_sums or [],
        prev_signs=bucket.prev_signs,
        steps=bucket.steps,
        # state-major: state k of tensor i at k * len(params) + i
        states=[t for key in spec.state_keys(h) for t in bucket.state[key]],
        lr=lr,
        hyper=kernel_hyper(spec, h),
        weight_decay=h.weight_decay if spec.decoupled_weight_decay(h) else 0.0,
        maximize=h.maximize,
        gain_inc=h.gain_inc,
        gain_dec=h.gain_dec,
        min_gain=h.min_gain,
        max_gain=h.max_gain,
        sign_threshold=h.sign_threshold,
        relax_gains=h.relax_gains,
        epoch_steps=bucket.epoch_steps,
        rounding_seeds=bucket.rounding_seeds or [],
        boundary=int(bucket.boundary),
        grad_scale=bucket.grad_scale,
        found_inf=bucket.found_inf,
    )


def run(op, kwargs: dict) -> None:
    """Calls a fused op (any device) on a bucket's lists in any memory layout. ``kwargs`` holds
    the op's per-tensor lists (``params`` first; a list of k * len(params) tensors is k lists,
    state-major) and anything else it takes."""
    try:
        op(**kwargs)
    except NotImplementedError:
        # raised before anything is written, for a layout the kernels cannot index as flat arrays
        # (a strided view, a grad laid out unlike its param) or a tensor with no CPU kernel (sparse)
        lists = _tensor_lists(kwargs)
        if any(t.layout != torch.strided for name in lists for t in kwargs[name]):
            raise
        _run_on_flat_copies(op, kwargs, lists)


def _tensor_lists(kwargs: dict) -> list[str]:
    # steps: one-element counters, which need no layout
    return [name for name, value in kwargs.items() if name != "steps" and isinstance(value, list)
            and value and isinstance(value[0], torch.Tensor)]


def _run_on_flat_copies(op, kwargs: dict, lists: list[str]) -> None:
    """Calls op with the tensors of every param the kernels cannot index as flat arrays replaced
    by copies (in the param's layout where it is dense, else contiguous), written back
    afterwards. The common layouts never get here: the op's own check is the only per-step
    cost."""
    n = len(kwargs["params"])
    rows, names = [], []
    for name in lists:
        tensors = kwargs[name]
        for k in range(0, len(tensors), n):
            rows.append(tensors[k:k + n])
            names.append(name)
    rows, writeback = layout.flat_rows(rows, names.index("grads"))
    flat = {name: [t for row, row_name in zip(rows, names) if row_name == name for t in row]
            for name in lists}
    op(**dict(kwargs, **flat))
    for original, copy in writeback:
        original.copy_(copy)
