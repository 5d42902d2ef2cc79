"""The foreach backend: ``torch._foreach_*`` ops over a whole bucket, for any device.

Portable but not fused: each op is one pass over the bucket, and some allocate param-sized
temporaries (compact state's roundings do not: they run in bounded batches, rounding.CHUNK; bfloat16
moments are updated in float32 copies, param-sized, then rounded so). It
reads the step counts and found_inf on the host. Each optimizer's own update is its spec's
``foreach`` function (adaptive_lr/optim/)."""

from __future__ import annotations

import dataclasses

import torch

from torch import Tensor

from ..gain_rule import GainRule, held_gain
from .bucket import Boundary, Bucket, sign_test_floors, state_dtype
from .rounding import (
    accumulate_stochastic, moment_key, rounding_key, store_stochastic, store_stochastic_gain,
)


def unavailable_reason(device: torch.device) -> str | None:
    return None


def apply_boundary(boundary: Boundary, gains: list[Tensor], grad_sums: list[Tensor],
                   prev_signs: list[Tensor], rule: GainRule, floors: list[Tensor] | None = None,
                   roundings: list[tuple[int, Tensor]] | None = None,
                   grad_sq_sums: list[Tensor] | None = None) -> None:
    """The epoch boundary of a list of params (reference.apply_boundary's, with foreach ops)."""
    signs = torch._foreach_sign(grad_sums)
    if floors is not None:  # the sign test: 1 where the sum is significant, else 0
        sums = [s.to(f.dtype) for s, f in zip(grad_sums, floors)]
        significant = torch._foreach_mul(sums, sums)
        torch._foreach_sub_(significant, floors)
        torch._foreach_sign_(significant)
        torch._foreach_clamp_min_(significant, 0.0)  # NaN (0 * inf) stays NaN: zeroed below
        torch._foreach_mul_(signs, [s.float().nan_to_num_(0.0) for s in significant])
    if boundary == Boundary.UPDATE:
        product = torch._foreach_mul([s.float() for s in prev_signs], signs)
        same = torch._foreach_clamp_min(product, 0.0)  # 1 where the sign persisted, else 0
        # 1 where the gain decreases: a flip, or (paper's rule) any product that is not 1
        flipped = torch._foreach_neg(product if rule.sign_threshold > 0 else same)
        if rule.sign_threshold > 0:
            torch._foreach_clamp_min_(flipped, 0.0)
        else:
            torch._foreach_add_(flipped, 1.0)
        held = torch._foreach_add(torch._foreach_add(same, flipped), -1.0)
        torch._foreach_neg_(held)  # 1 where neither (the sign test's "no evidence")
        # a 0/1 blend of the candidates is exact: it picks one of them bit for bit (in float32;
        # compact bfloat16 gains are rounded stochastically, after the clamp)
        gains32 = [gain.float() for gain in gains]
        increased = torch._foreach_add(gains32, rule.gain_inc)
        torch._foreach_mul_(increased, same)
        decreased = torch._foreach_mul(gains32, rule.gain_dec)
        torch._foreach_mul_(decreased, flipped)
        torch._foreach_add_(increased, decreased)
        held_gains = [held_gain(gain, rule) for gain in gains32]
        torch._foreach_add_(increased, torch._foreach_mul(held_gains, held))
        torch._foreach_clamp_min_(increased, rule.min_gain)
        torch._foreach_clamp_max_(increased, rule.max_gain)
        if roundings is None:
            torch._foreach_copy_(gains, increased)
        else:
            store_stochastic_gain(gains, increased, roundings)
    for prev_sign, sign in zip(prev_signs, signs):
        prev_sign.copy_(sign)
    torch._foreach_zero_(grad_sums)
    if grad_sq_sums is not None:
        torch._foreach_zero_(grad_sq_sums)


def step(bucket: Bucket) -> None:
    h = dataclasses.replace(bucket.hyper, lr=float(bucket.hyper.lr))
    # one host read for the per-tensor scalars: the step counts before and after this step's
    # increment (float32, as the counts themselves)
    counts = torch.stack(bucket.steps)
    before, steps = torch.stack([counts, counts + 1]).tolist()
    roundings = None
    if bucket.rounding_seeds is not None:  # compact: this step's keys (even a skipped one's)
        roundings = [(rounding_key(seed, step), param) for seed, step, param
                     in zip(bucket.rounding_seeds, steps, bucket.params)]
    if bucket.boundary != Boundary.NONE:
        floors = sign_test_floors(bucket, before)
        apply_boundary(bucket.boundary, bucket.gains, bucket.grad_sums, bucket.prev_signs,
                       h.gain_rule(), floors, roundings, bucket.grad_sq_sums)
    if bucket.found_inf is not None and bool(bucket.found_inf.item()):
        return
    compute = state_dtype(bucket.dtype)
    torch._foreach_add_(bucket.steps, 1.0)
    g = [grad.to(compute) for grad in bucket.grads]
    if bucket.grad_scale is not None:
        g = torch._foreach_div(g, bucket.grad_scale.to(compute))
    if h.maximize:
        g = torch._foreach_neg(g)
    g32 = g if compute == torch.float32 else [x.float() for x in g]
    if roundings is None:
        torch._foreach_add_(bucket.grad_sums, g32)
        if bucket.grad_sq_sums is not None:  # the product and the sum each rounded once (no FMA)
            torch._foreach_add_(bucket.grad_sq_sums, torch._foreach_mul(g32, g32))
    else:  # compact: rounded stochastically, in batches (no param-sized temporaries)
        accumulate_stochastic(bucket.grad_sums, g32, roundings, bucket.grad_sq_sums)
    low_precision = bucket.dtype != compute
    theta = [p.detach().to(compute) for p in bucket.params]
    if bucket.spec.decoupled_weight_decay(h) and h.weight_decay != 0:
        torch._foreach_mul_(theta, 1 - h.lr * h.weight_decay)
    # compact bfloat16 gains go in as they are: the update widens them (foreach_scaled_gains)
    state = bucket.state
    if bucket.bfloat16_moments:  # updated in float32, then rounded stochastically
        state = {key: [moment.float() for moment in moments] for key, moments in state.items()}
    bucket.spec.foreach(theta, g, bucket.gains, steps, state, h)
    if bucket.bfloat16_moments:
        for k, name in enumerate(state):
            store_stochastic(bucket.state[name], state[name],
                             [(moment_key(key, k), param) for key, param in roundings])
    if low_precision:
        torch._foreach_copy_([p.detach() for p in bucket.params], theta)
