"""The reference backend: a for-loop over params with plain torch ops, to be read beside
``docs/algorithm.md``. It defines correctness for every other backend, so it favours clarity
over speed (it syncs with the host to honour ``found_inf``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .bucket import Boundary, Bucket, state_dtype
from .scalars import bias_corrections, radam_rectification


def unavailable_reason(device: torch.device) -> str | None:
    return None


def apply_boundary(
    boundary: Boundary, gain: Tensor, grad_sum: Tensor, prev_sign: Tensor, hyper: dict
) -> None:
    """The epoch-boundary update of one param's gain and sign state (docs/algorithm.md)."""
    if boundary == Boundary.NONE:
        return
    sign = torch.sign(grad_sum).to(torch.int8)
    if boundary == Boundary.UPDATE:
        same_sign = (prev_sign.to(torch.int32) * sign.to(torch.int32)) > 0
        new_gain = torch.where(same_sign, gain + hyper["gain_inc"], gain * hyper["gain_dec"])
        gain.copy_(new_gain.clamp_(hyper["min_gain"], hyper["max_gain"]))
    prev_sign.copy_(sign)
    grad_sum.zero_()


def _sgd(param, g, gamma, step, state, h) -> None:
    buf = state["momentum_buffer"]
    if step == 1:
        buf.copy_(g)
    else:
        buf.mul_(h["momentum"]).add_(g, alpha=1 - h["dampening"])
    direction = g + h["momentum"] * buf if h["nesterov"] else buf
    param.sub_(h["lr"] * gamma * direction)


def _adam_moments(g, state, h) -> Tensor:
    """Update exp_avg and exp_avg_sq; return the second moment the update uses."""
    beta1, beta2 = h["betas"]
    state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if h.get("amsgrad"):
        torch.maximum(state["max_exp_avg_sq"], state["exp_avg_sq"], out=state["max_exp_avg_sq"])
        return state["max_exp_avg_sq"]
    return state["exp_avg_sq"]


def _adamw(param, g, gamma, step, state, h) -> None:
    v = _adam_moments(g, state, h)
    bc1, bc2 = bias_corrections(h["betas"], step)
    denom = v.sqrt() / math.sqrt(bc2) + h["eps"]
    param.sub_((h["lr"] / bc1) * gamma * state["exp_avg"] / denom)


def _radam(param, g, gamma, step, state, h) -> None:
    v = _adam_moments(g, state, h)
    bc1, bc2 = bias_corrections(h["betas"], step)
    m_hat = state["exp_avg"] / bc1
    rect = radam_rectification(h["betas"][1], step)
    if rect is None:
        param.sub_(h["lr"] * gamma * m_hat)
    else:
        param.sub_(h["lr"] * gamma * rect * m_hat * math.sqrt(bc2) / (v.sqrt() + h["eps"]))


def _adabelief(param, g, gamma, step, state, h) -> None:
    beta1, beta2 = h["betas"]
    m, s = state["exp_avg"], state["exp_avg_var"]
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    residual = g - m
    s.mul_(beta2).addcmul_(residual, residual, value=1 - beta2).add_(h["eps"])
    if h["amsgrad"]:
        torch.maximum(state["max_exp_avg_var"], s, out=state["max_exp_avg_var"])
        s = state["max_exp_avg_var"]
    bc1, bc2 = bias_corrections(h["betas"], step)
    rect = radam_rectification(beta2, step) if h["rectify"] else 1.0
    if rect is None:
        param.sub_(h["lr"] * gamma * m / bc1)
    else:
        denom = s.sqrt() / math.sqrt(bc2) + h["eps"]
        param.sub_((h["lr"] * rect / bc1) * gamma * m / denom)


BASE_UPDATES = {"sgd": _sgd, "adamw": _adamw, "radam": _radam, "adabelief": _adabelief}


def step(bucket: Bucket) -> None:
    h = dict(bucket.hyper, lr=float(bucket.hyper["lr"]))
    skip = bucket.found_inf is not None and bool(bucket.found_inf.item())
    base_update = BASE_UPDATES[bucket.optimizer]
    compute = state_dtype(bucket.dtype)
    for i, param in enumerate(bucket.params):
        gain, grad_sum = bucket.gains[i], bucket.grad_sums[i]
        apply_boundary(bucket.boundary, gain, grad_sum, bucket.prev_signs[i], h)
        if skip:
            continue
        bucket.steps[i].add_(1)
        g = bucket.grads[i].to(compute)
        if bucket.grad_scale is not None:
            g = g / bucket.grad_scale.to(compute)
        if h["maximize"]:
            g = -g
        grad_sum.add_(g.float())
        # low-precision params are updated in float32 and rounded once at the end
        theta = param.detach().to(compute)
        if h["weight_decay"] != 0:
            theta.mul_(1 - h["lr"] * h["weight_decay"])
        state = {key: values[i] for key, values in bucket.state.items()}
        base_update(theta, g, gain.to(compute), bucket.steps[i].item(), state, h)
        param.detach().copy_(theta)
