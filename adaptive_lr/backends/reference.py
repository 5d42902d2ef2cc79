"""The reference backend: a for-loop over params with plain torch ops, to be read beside
docs/algorithm.md. It defines correctness for every other backend, so it favours clarity over
speed (it syncs with the host to honour ``found_inf``). Each optimizer's own update is its
spec's ``reference`` function (adaptive_lr/optim/)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..gain_rule import GainRule, held_gain
from .bucket import Boundary, Bucket, sign_test_floors, state_dtype
from .rounding import (
    bfloat16_stochastic, bfloat16_stochastic_gain, bfloat16_stochastic_low_bits, element_index,
    moment_key, rounding_key,
)


def unavailable_reason(device: torch.device) -> str | None:
    return None


def apply_boundary(boundary: Boundary, gain: Tensor, grad_sum: Tensor, prev_sign: Tensor,
                   rule: GainRule, floor: Tensor | None = None,
                   rounding: tuple[int, Tensor] | None = None,
                   grad_sq_sum: Tensor | None = None) -> None:
    """The epoch-boundary update of one param's gain and sign state (docs/algorithm.md, "The
    gain rule"). ``floor``: the sign test's noise floor (bucket.sign_test_floors), given exactly
    when ``rule.sign_threshold`` > 0. ``rounding``: a compact (bfloat16) gain's rounding key
    and element indices. ``grad_sq_sum``: reset with grad_sum, where the param keeps one."""
    if boundary == Boundary.NONE:
        return
    sign = torch.sign(grad_sum)
    if floor is not None:  # the sign test: a sum within the gradient noise has no sign
        grad_sum_c = grad_sum.to(floor.dtype)
        sign = torch.where(grad_sum_c * grad_sum_c > floor, sign, 0)
    sign = sign.to(torch.int8)
    if boundary == Boundary.UPDATE:
        product = prev_sign.to(torch.int32) * sign.to(torch.int32)
        gain32 = gain.float()  # a compact (bfloat16) gain is computed in float32
        decreased = gain32 * rule.gain_dec
        if rule.sign_threshold > 0:  # no evidence either way: the gain is held (or relaxed)
            decreased = torch.where(product < 0, decreased, held_gain(gain32, rule))
        new_gain = torch.where(product > 0, gain32 + rule.gain_inc, decreased)
        new_gain.clamp_(rule.min_gain, rule.max_gain)
        if gain.dtype == torch.bfloat16:  # compact: rounded stochastically, after the clamp
            new_gain = bfloat16_stochastic_gain(new_gain, *rounding)
        gain.copy_(new_gain)
    prev_sign.copy_(sign)
    grad_sum.zero_()
    if grad_sq_sum is not None:
        grad_sq_sum.zero_()


def _accumulate(total: Tensor, value: Tensor, rounding: tuple[int, Tensor] | None,
                low_bits: bool = False) -> None:
    """total += value in float32; a compact (bfloat16) total is rounded stochastically with
    ``rounding``'s key and element indices: the hash's high bits (grad_sum), or its low bits
    (``low_bits``: grad_sq_sum)."""
    if rounding is None:
        total.add_(value)
    else:
        round_with = bfloat16_stochastic_low_bits if low_bits else bfloat16_stochastic
        total.copy_(round_with(total.float() + value, *rounding))


def step(bucket: Bucket) -> None:
    h = dataclasses.replace(bucket.hyper, lr=float(bucket.hyper.lr))
    skip = bucket.found_inf is not None and bool(bucket.found_inf.item())
    compute = state_dtype(bucket.dtype)
    floors = None
    if bucket.boundary != Boundary.NONE:
        floors = sign_test_floors(bucket, [step.item() for step in bucket.steps])
    for i, param in enumerate(bucket.params):
        gain, grad_sum = bucket.gains[i], bucket.grad_sums[i]
        grad_sq_sum = None if bucket.grad_sq_sums is None else bucket.grad_sq_sums[i]
        rounding = None
        if bucket.rounding_seeds is not None:  # the key of this step (even a skipped one)
            rounding = (rounding_key(bucket.rounding_seeds[i], bucket.steps[i] + 1),
                        element_index(param))
        apply_boundary(bucket.boundary, gain, grad_sum, bucket.prev_signs[i], h.gain_rule(),
                       None if floors is None else floors[i], rounding, grad_sq_sum)
        if skip:
            continue
        bucket.steps[i].add_(1)
        g = bucket.grads[i].to(compute)
        if bucket.grad_scale is not None:
            g = g / bucket.grad_scale.to(compute)
        if h.maximize:
            g = -g
        g32 = g.float()
        _accumulate(grad_sum, g32, rounding)
        if grad_sq_sum is not None:  # the product and the sum each rounded once (no FMA)
            _accumulate(grad_sq_sum, g32 * g32, rounding, low_bits=True)
        # low-precision params are updated in float32 and rounded once at the end
        theta = param.detach().to(compute)
        if bucket.spec.decoupled_weight_decay(h) and h.weight_decay != 0:
            theta.mul_(1 - h.lr * h.weight_decay)
        state = {key: values[i] for key, values in bucket.state.items()}
        stored = state
        if bucket.bfloat16_moments:  # updated in float32, then rounded stochastically
            state = {key: moment.float() for key, moment in stored.items()}
        bucket.spec.reference(theta, g, gain.to(compute), bucket.steps[i].item(), state, h)
        if bucket.bfloat16_moments:
            key, index = rounding
            for k, name in enumerate(stored):
                stored[name].copy_(bfloat16_stochastic(state[name], moment_key(key, k), index))
        param.detach().copy_(theta)
