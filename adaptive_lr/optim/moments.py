"""Pieces the Adam-type optimizers' reference and foreach updates share.

Every reference and foreach update rounds each product and sum once, as the fused kernels do
(``m * beta + g * (1 - beta)``), never with torch's fused ``add_(alpha=)`` or ``addcmul_``: on the
CPU those are one FMA, whose one-ulp difference AdaBelief's ``g - m`` amplifies when it cancels."""

from __future__ import annotations

import torch
from torch import Tensor


def adam_moments(g: Tensor, state: dict, h, amsgrad: bool) -> Tensor:
    """One tensor: update exp_avg and exp_avg_sq; return the second moment the update uses."""
    beta1, beta2 = h.betas
    state["exp_avg"].mul_(beta1).add_(g * (1 - beta1))
    state["exp_avg_sq"].mul_(beta2).add_(g * (1 - beta2) * g)
    if amsgrad:
        torch.maximum(state["max_exp_avg_sq"], state["exp_avg_sq"], out=state["max_exp_avg_sq"])
        return state["max_exp_avg_sq"]
    return state["exp_avg_sq"]


def foreach_adam_moments(g: list[Tensor], state: dict, h, amsgrad: bool) -> list[Tensor]:
    """A bucket: as adam_moments."""
    beta1, beta2 = h.betas
    torch._foreach_mul_(state["exp_avg"], beta1)
    torch._foreach_add_(state["exp_avg"], torch._foreach_mul(g, 1 - beta1))
    torch._foreach_mul_(state["exp_avg_sq"], beta2)
    weighted = torch._foreach_mul(g, 1 - beta2)
    torch._foreach_mul_(weighted, g)
    torch._foreach_add_(state["exp_avg_sq"], weighted)
    if amsgrad:
        torch._foreach_maximum_(state["max_exp_avg_sq"], state["exp_avg_sq"])
        return state["max_exp_avg_sq"]
    return state["exp_avg_sq"]


def foreach_scaled_gains(gammas: list[Tensor], scales, dtype: torch.dtype) -> list[Tensor]:
    """gamma * scales[i] (or * scales, one number) in ``dtype``, the update's compute dtype:
    compact state's bfloat16 gains are widened (exactly) into the product's own buffers, so that a
    compact step allocates no float32 copy of its gains beside them."""
    if gammas[0].dtype == dtype:
        return torch._foreach_mul(gammas, scales)
    update = [gamma.to(dtype) for gamma in gammas]
    torch._foreach_mul_(update, scales)
    return update


def foreach_scaled_step(theta, gammas, m, scales, denom=None) -> None:
    """theta -= scales[i] * gamma * m (/ denom)."""
    update = foreach_scaled_gains(gammas, scales, theta[0].dtype)
    torch._foreach_mul_(update, m)
    if denom is not None:
        torch._foreach_div_(update, denom)
    torch._foreach_sub_(theta, update)


def pick(values, indices):
    return [values[i] for i in indices]
