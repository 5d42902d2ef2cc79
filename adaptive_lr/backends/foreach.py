"""The foreach backend: ``torch._foreach_*`` ops over a whole bucket, for any device.

Portable but not fused: each op is one pass over the bucket, and some allocate param-sized
temporaries. It reads the step counts and found_inf on the host."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .bucket import Boundary, Bucket, state_dtype
from .scalars import bias_corrections, radam_rectification


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _apply_boundary(bucket: Bucket) -> None:
    h = bucket.hyper
    signs = torch._foreach_sign(bucket.grad_sums)
    if bucket.boundary == Boundary.UPDATE:
        same = torch._foreach_mul([s.float() for s in bucket.prev_signs], signs)
        same = torch._foreach_sign(same)
        torch._foreach_clamp_min_(same, 0.0)  # 1 where the sign persisted, else 0
        flipped = torch._foreach_neg(same)
        torch._foreach_add_(flipped, 1.0)
        # a 0/1 blend of the two candidates is exact: it picks one of them bit for bit
        increased = torch._foreach_add(bucket.gains, h["gain_inc"])
        torch._foreach_mul_(increased, same)
        decreased = torch._foreach_mul(bucket.gains, h["gain_dec"])
        torch._foreach_mul_(decreased, flipped)
        torch._foreach_add_(increased, decreased)
        torch._foreach_clamp_min_(increased, h["min_gain"])
        torch._foreach_clamp_max_(increased, h["max_gain"])
        torch._foreach_copy_(bucket.gains, increased)
    for prev_sign, sign in zip(bucket.prev_signs, signs):
        prev_sign.copy_(sign)
    torch._foreach_zero_(bucket.grad_sums)


def _sgd(theta, g, gammas, steps, state, h) -> None:
    bufs = state["momentum_buffer"]
    first = [i for i, t in enumerate(steps) if t == 1]
    later = [i for i, t in enumerate(steps) if t != 1]
    for i in first:
        bufs[i].copy_(g[i])
    if later:
        later_bufs = [bufs[i] for i in later]
        torch._foreach_mul_(later_bufs, h["momentum"])
        torch._foreach_add_(later_bufs, [g[i] for i in later], alpha=1 - h["dampening"])
    direction = torch._foreach_add(g, bufs, alpha=h["momentum"]) if h["nesterov"] else bufs
    update = torch._foreach_mul(gammas, h["lr"])
    torch._foreach_mul_(update, direction)
    torch._foreach_sub_(theta, update)


def _adam_moments(g, state, h) -> list[Tensor]:
    beta1, beta2 = h["betas"]
    torch._foreach_mul_(state["exp_avg"], beta1)
    torch._foreach_add_(state["exp_avg"], g, alpha=1 - beta1)
    torch._foreach_mul_(state["exp_avg_sq"], beta2)
    torch._foreach_addcmul_(state["exp_avg_sq"], g, g, value=1 - beta2)
    if h.get("amsgrad"):
        torch._foreach_maximum_(state["max_exp_avg_sq"], state["exp_avg_sq"])
        return state["max_exp_avg_sq"]
    return state["exp_avg_sq"]


def _scaled_momentum_step(theta, gammas, m, scales, denom=None) -> None:
    """theta -= scales[i] * gamma * m (/ denom)."""
    update = torch._foreach_mul(gammas, scales)
    torch._foreach_mul_(update, m)
    if denom is not None:
        torch._foreach_div_(update, denom)
    torch._foreach_sub_(theta, update)


def _adamw(theta, g, gammas, steps, state, h) -> None:
    v = _adam_moments(g, state, h)
    corrections = [bias_corrections(h["betas"], t) for t in steps]
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(bc2) for _, bc2 in corrections])
    torch._foreach_add_(denom, h["eps"])
    _scaled_momentum_step(theta, gammas, state["exp_avg"], [h["lr"] / bc1 for bc1, _ in corrections], denom)


def _split_by_rectification(steps, beta2):
    """Indices whose step is rectified (with r_t) and those that take the plain momentum step."""
    rects = [radam_rectification(beta2, t) for t in steps]
    rectified = [i for i, r in enumerate(rects) if r is not None]
    plain = [i for i, r in enumerate(rects) if r is None]
    return rects, rectified, plain


def _pick(values, indices):
    return [values[i] for i in indices]


def _radam(theta, g, gammas, steps, state, h) -> None:
    v = _adam_moments(g, state, h)
    corrections = [bias_corrections(h["betas"], t) for t in steps]
    rects, rectified, plain = _split_by_rectification(steps, h["betas"][1])
    m = state["exp_avg"]
    if plain:
        scales = [h["lr"] / corrections[i][0] for i in plain]
        _scaled_momentum_step(_pick(theta, plain), _pick(gammas, plain), _pick(m, plain), scales)
    if rectified:
        denom = torch._foreach_sqrt(_pick(v, rectified))
        torch._foreach_add_(denom, h["eps"])
        scales = [h["lr"] * rects[i] * math.sqrt(corrections[i][1]) / corrections[i][0] for i in rectified]
        _scaled_momentum_step(
            _pick(theta, rectified), _pick(gammas, rectified), _pick(m, rectified), scales, denom
        )


def _adabelief(theta, g, gammas, steps, state, h) -> None:
    beta1, beta2 = h["betas"]
    m, s = state["exp_avg"], state["exp_avg_var"]
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, g, alpha=1 - beta1)
    residual = torch._foreach_sub(g, m)
    torch._foreach_mul_(s, beta2)
    torch._foreach_addcmul_(s, residual, residual, value=1 - beta2)
    torch._foreach_add_(s, h["eps"])
    if h["amsgrad"]:
        torch._foreach_maximum_(state["max_exp_avg_var"], s)
        s = state["max_exp_avg_var"]
    corrections = [bias_corrections(h["betas"], t) for t in steps]
    if h["rectify"]:
        rects, rectified, plain = _split_by_rectification(steps, beta2)
    else:
        rects, rectified, plain = [1.0] * len(steps), list(range(len(steps))), []
    if plain:
        scales = [h["lr"] / corrections[i][0] for i in plain]
        _scaled_momentum_step(_pick(theta, plain), _pick(gammas, plain), _pick(m, plain), scales)
    if rectified:
        denom = torch._foreach_sqrt(_pick(s, rectified))
        torch._foreach_div_(denom, [math.sqrt(corrections[i][1]) for i in rectified])
        torch._foreach_add_(denom, h["eps"])
        scales = [h["lr"] * rects[i] / corrections[i][0] for i in rectified]
        _scaled_momentum_step(
            _pick(theta, rectified), _pick(gammas, rectified), _pick(m, rectified), scales, denom
        )


BASE_UPDATES = {"sgd": _sgd, "adamw": _adamw, "radam": _radam, "adabelief": _adabelief}


def step(bucket: Bucket) -> None:
    h = dict(bucket.hyper, lr=float(bucket.hyper["lr"]))
    if bucket.boundary != Boundary.NONE:
        _apply_boundary(bucket)
    if bucket.found_inf is not None and bool(bucket.found_inf.item()):
        return
    compute = state_dtype(bucket.dtype)
    torch._foreach_add_(bucket.steps, 1.0)
    steps = torch.stack(bucket.steps).tolist()  # one host read for the per-tensor scalars
    g = [grad.to(compute) for grad in bucket.grads]
    if bucket.grad_scale is not None:
        g = torch._foreach_div(g, bucket.grad_scale.to(compute))
    if h["maximize"]:
        g = torch._foreach_neg(g)
    torch._foreach_add_(bucket.grad_sums, g if compute == torch.float32 else [x.float() for x in g])
    low_precision = bucket.dtype != compute
    theta = [p.detach().to(compute) for p in bucket.params]
    if h["weight_decay"] != 0:
        torch._foreach_mul_(theta, 1 - h["lr"] * h["weight_decay"])
    gammas = bucket.gains if compute == torch.float32 else [x.to(compute) for x in bucket.gains]
    BASE_UPDATES[bucket.optimizer](theta, g, gammas, steps, bucket.state, h)
    if low_precision:
        torch._foreach_copy_([p.detach() for p in bucket.params], theta)
