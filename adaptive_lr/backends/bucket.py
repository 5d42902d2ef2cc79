"""The one object every backend receives: one optimizer step's work for one (device, dtype) group
of tensors, with the scalars that are the same for all of them.

A backend is a callable ``backend(bucket) -> None`` that performs, in place and for every tensor
index ``i`` of the bucket, exactly the per-element step of docs/algorithm.md:

1. the epoch boundary named by ``bucket.boundary`` (uniform across the bucket):
   ``ROLL``   prev_sign <- sign(grad_sum); grad_sum <- 0
   ``UPDATE`` gain <- clamp(gain + gain_inc if prev_sign * sign(grad_sum) > 0 else gain * gain_dec,
                            min_gain, max_gain); then as ROLL
   (the rule's arguments: ``bucket.hyper.gain_rule()``, a ``GainRule``, adaptive_lr/gain_rule.py)
   With the sign test (``sign_threshold`` k > 0), an element's sign(grad_sum) counts only where
   grad_sum**2 > k**2 * epoch_steps * v / (1 - beta2**step) (the Adam family: v its second
   moment, step its count, both before this step), or grad_sum**2 > k**2 * grad_sq_sum (an
   optimizer without a second moment), else it is 0; and a gain whose signs' product is 0 is
   held instead of decreased, or with ``relax_gains`` becomes 1 + (gain - 1) * gain_dec where it
   is above 1 (docs/algorithm.md, "The sign test"). ``grad_sq_sums`` is reset with grad_sum.
   The boundary is applied even when ``found_inf`` is set (it never reads this step's gradient).
2. if ``found_inf`` is given and non-zero: nothing else (no accumulation, no update, step unchanged);
3. g = grad / grad_scale (if given), negated when ``maximize``; grad_sum += g (float32);
   grad_sq_sum += g32 * g32 (g32 the float32 value grad_sum adds; the product and the sum each
   rounded once, in float32); step += 1;
4. the base optimizer's update of param and its state with the per-element lr ``lr * gain``:
   ``bucket.spec`` (the optimizer's one definition, adaptive_lr/optim/spec.py) says how, for
   every backend, with ``bucket.hyper`` its typed hyperparameter record.

State dtypes: gain, grad_sum and grad_sq_sum float32, prev_sign int8, step a float32 0-dim
tensor on the param's device; moments float64 for float64 params, else float32 (also for
bf16/fp16 params, whose math runs in float32). Compact state (``rounding_seeds`` given; not for
float64 params): gain, grad_sum and grad_sq_sum bfloat16; a new gain is rounded stochastically
after its clamp, and in step 3 grad_sum <- bfloat16_stochastic(float32(grad_sum) + g) with the
param's rounding key, grad_sq_sum likewise with bfloat16_stochastic_low_bits (the same hash's
other half; adaptive_lr/backends/rounding.py). bfloat16 moments (``bfloat16_moments``, with compact
state, for an optimizer whose state is momenta): every state tensor is bfloat16, the update runs
in float32, and each moment k is stored as bfloat16_stochastic under moment_key(key, k).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..gain_rule import grad_sq_sum_floor, sign_test_floor


class Boundary(enum.IntEnum):
    """What the first step of an epoch does before its own update (docs/algorithm.md)."""

    NONE = 0  # mid-epoch step
    ROLL = 1  # the param's first boundary: no previous sign to compare with, only roll over
    UPDATE = 2  # compare signs, update the gain, then roll over


def sign_test_floors(bucket: "Bucket", steps: list[float]) -> list[Tensor] | None:
    """Per tensor of the bucket, the sum's noise floor: where grad_sum**2 exceeds it the sum's
    sign counts. ``steps``: the tensors' step counts before this step. None when the sign test
    is off."""
    rule = bucket.hyper.gain_rule()
    if rule.sign_threshold == 0:
        return None
    if bucket.grad_sq_sums is not None:
        compute = state_dtype(bucket.dtype)
        return [grad_sq_sum_floor(q, rule, compute) for q in bucket.grad_sq_sums]
    beta2 = bucket.hyper.betas[1]
    return [sign_test_floor(v, step, rule, bucket.epoch_steps, beta2)
            for v, step in zip(bucket.state[bucket.spec.second_moment], steps)]


@dataclass
class Bucket:
    spec: Any  # adaptive_lr.optim.spec.OptimizerSpec (a backend never imports the optim layer)
    params: list[Tensor]
    grads: list[Tensor]
    gains: list[Tensor]
    grad_sums: list[Tensor]
    prev_signs: list[Tensor]
    steps: list[Tensor]
    # base state lists by key, in spec.state_keys(hyper) order
    state: dict[str, list[Tensor]]
    # the param group's typed hyperparameter record (lr may be a float or a 1-element tensor)
    hyper: Any
    boundary: Boundary = Boundary.NONE
    # the length in steps of the epoch that ended at the boundary (the sign test's S)
    epoch_steps: int = 0
    # compact state (bfloat16 gain and grad_sum): each param's rounding seed; None: float32
    rounding_seeds: list[int] | None = None
    # the sign test of an optimizer without a second moment (spec.keeps_grad_sq_sum): each
    # param's Q, of grad_sum's dtype; None: not kept
    grad_sq_sums: list[Tensor] | None = None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)
    # state_precision="bfloat16": the moments are bfloat16 too (rounded stochastically), named by
    # their dtype, as the fused kernels name it
    bfloat16_moments: bool = field(init=False)

    def __post_init__(self) -> None:
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.bfloat16_moments = any(t.dtype == torch.bfloat16 for ts in self.state.values()
                                    for t in ts[:1])


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a param's math runs in, and its moments' unless they are bfloat16: float64 for
    float64 params, float32 otherwise (low-precision params too)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32
