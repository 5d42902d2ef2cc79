"""The fused CPU backend: one ``torch.ops.adaptive_lr.active_<optimizer>_`` call per bucket runs the
multi-tensor C++ kernels of ``csrc/cpu`` (OpenMP threads, SIMD picked for the machine)."""

from __future__ import annotations

import torch

from . import extension, layout
from .bucket import Bucket


def unavailable_reason(device: torch.device) -> str | None:
    if torch.device(device).type != "cpu":
        return f"the fused cpu backend runs on CPU tensors only, not on {device}"
    return extension.load_error()


# hyperparameters every op takes under the same name
_SHARED_HYPER = ("weight_decay", "maximize", "gain_inc", "gain_dec", "min_gain", "max_gain")


def _lr_tensor(lr) -> torch.Tensor:
    """The ops take lr as a tensor (a 0-dim lr updated in place by a scheduler then needs no
    recompilation under torch.compile); a float lr is wrapped, as float64 to keep every bit."""
    if isinstance(lr, torch.Tensor):
        return lr
    return torch.tensor(lr, dtype=torch.float64)


def op_call(bucket: Bucket):
    """The ``torch.ops.adaptive_lr`` op that steps ``bucket``, and its keyword arguments."""
    h, state = bucket.hyper, bucket.state
    kwargs = dict(
        params=bucket.params,
        grads=bucket.grads,
        gains=bucket.gains,
        grad_sums=bucket.grad_sums,
        prev_signs=bucket.prev_signs,
        steps=bucket.steps,
        lr=_lr_tensor(h["lr"]),
        boundary=int(bucket.boundary),
        grad_scale=bucket.grad_scale,
        found_inf=bucket.found_inf,
        **{key: h[key] for key in _SHARED_HYPER},
    )
    ops = torch.ops.adaptive_lr
    if bucket.optimizer == "sgd":
        kwargs.update(
            momentum_buffers=state["momentum_buffer"],
            momentum=h["momentum"],
            dampening=h["dampening"],
            nesterov=h["nesterov"],
        )
        return ops.active_sgd_.default, kwargs
    beta1, beta2 = h["betas"]
    kwargs.update(exp_avgs=state["exp_avg"], beta1=beta1, beta2=beta2, eps=h["eps"])
    if bucket.optimizer == "adamw":
        kwargs.update(
            exp_avg_sqs=state["exp_avg_sq"],
            max_exp_avg_sqs=state.get("max_exp_avg_sq", []),
            amsgrad=h["amsgrad"],
        )
        return ops.active_adamw_.default, kwargs
    if bucket.optimizer == "radam":
        kwargs.update(exp_avg_sqs=state["exp_avg_sq"])
        return ops.active_radam_.default, kwargs
    if bucket.optimizer == "adabelief":
        kwargs.update(
            exp_avg_vars=state["exp_avg_var"],
            max_exp_avg_vars=state.get("max_exp_avg_var", []),
            amsgrad=h["amsgrad"],
            rectify=h["rectify"],
        )
        return ops.active_adabelief_.default, kwargs
    raise ValueError(f"the cpu backend has no kernel for optimizer {bucket.optimizer!r}")


def step(bucket: Bucket) -> None:
    # resolve() returned this function only after unavailable_reason() loaded the kernels (not
    # re-checked here: under torch.compile a cached-function call in the step is a warning a step)
    run_op(*op_call(bucket))


def run_op(op, kwargs: dict) -> None:
    """Calls one of the ops (any device) on a bucket's lists in any memory layout."""
    try:
        op(**kwargs)
    except NotImplementedError:
        # raised before anything is written, for a layout the kernels cannot index as flat arrays
        # (a strided view, a grad laid out unlike its param) or a tensor with no CPU kernel (sparse)
        lists = [name for name, value in kwargs.items()
                 if isinstance(value, list) and value and name != "steps"]
        if any(t.layout != torch.strided for name in lists for t in kwargs[name]):
            raise
        _step_on_flat_copies(op, kwargs, lists)


def _step_on_flat_copies(op, kwargs: dict, lists: list[str]) -> None:
    """Calls op with the tensors of every param the kernels cannot index as flat arrays replaced
    by contiguous copies, written back afterwards. The common layouts never get here: the op's
    own check is the only per-step cost."""
    rows, writeback = layout.flat_rows([kwargs[name] for name in lists], lists.index("grads"))
    op(**dict(kwargs, **dict(zip(lists, rows))))
    for original, copy in writeback:
        original.copy_(copy)
