from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.scalars import bias_corrections, radam_rectification
from .base import DEFAULT_SIGN_THRESHOLD, GAIN_ARGS_DOC, SIGN_TEST_DOC, ActiveOptimizer
from .moments import foreach_scaled_step, pick
from .radam import split_by_rectification
from .spec import AdamHyper, OptimizerSpec


@dataclass(frozen=True)
class AdaBeliefHyper(AdamHyper):
    amsgrad: bool
    rectify: bool


def _reference(theta, g, gamma, step, state, h: AdaBeliefHyper) -> None:
    beta1, beta2 = h.betas
    m, s = state["exp_avg"], state["exp_avg_var"]
    m.mul_(beta1).add_(g * (1 - beta1))
    residual = g - m
    s.mul_(beta2).add_(residual * (1 - beta2) * residual).add_(h.eps)
    if h.amsgrad:
        torch.maximum(state["max_exp_avg_var"], s, out=state["max_exp_avg_var"])
        s = state["max_exp_avg_var"]
    bc1, bc2 = bias_corrections(h.betas, step)
    rect = radam_rectification(beta2, step) if h.rectify else 1.0
    if rect is None:
        theta.sub_(h.lr * gamma * m / bc1)
    else:
        denom = s.sqrt() / math.sqrt(bc2) + h.eps
        theta.sub_((h.lr * rect / bc1) * gamma * m / denom)


def _foreach(theta, g, gammas, steps, state, h: AdaBeliefHyper) -> None:
    beta1, beta2 = h.betas
    m, s = state["exp_avg"], state["exp_avg_var"]
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, torch._foreach_mul(g, 1 - beta1))
    residual = torch._foreach_sub(g, m)
    torch._foreach_mul_(s, beta2)
    weighted = torch._foreach_mul(residual, 1 - beta2)
    torch._foreach_mul_(weighted, residual)
    torch._foreach_add_(s, weighted)
    del residual, weighted  # freed before the update's lists: two fewer at the step's peak
    torch._foreach_add_(s, h.eps)
    if h.amsgrad:
        torch._foreach_maximum_(state["max_exp_avg_var"], s)
        s = state["max_exp_avg_var"]
    corrections = [bias_corrections(h.betas, t) for t in steps]
    if h.rectify:
        rects, rectified, plain = split_by_rectification(steps, beta2)
    else:
        rects, rectified, plain = [1.0] * len(steps), list(range(len(steps))), []
    if plain:
        scales = [h.lr / corrections[i][0] for i in plain]
        foreach_scaled_step(pick(theta, plain), pick(gammas, plain), pick(m, plain), scales)
    if rectified:
        denom = torch._foreach_sqrt(pick(s, rectified))
        torch._foreach_div_(denom, [math.sqrt(corrections[i][1]) for i in rectified])
        torch._foreach_add_(denom, h.eps)
        scales = [h.lr * rects[i] / corrections[i][0] for i in rectified]
        foreach_scaled_step(pick(theta, rectified), pick(gammas, rectified), pick(m, rectified),
                            scales, denom)


ADABELIEF = OptimizerSpec(
    kernel="adabelief",
    hyper=AdaBeliefHyper,
    state=("exp_avg", "exp_avg_var", "max_exp_avg_var"),
    second_moment="exp_avg_var",
    amsgrad_state="max_exp_avg_var",
    reference=_reference,
    foreach=_foreach,
    kernel_hyper=lambda h: {"beta1": h.betas[0], "beta2": h.betas[1], "eps": h.eps,
                            "amsgrad": float(h.amsgrad), "rectify": float(h.rectify)},
)


class ActiveAdaBelief(ActiveOptimizer):
    __doc__ = r"""AdaBelief (decoupled weight decay) whose per-element learning rate ``lr * gain``
    adapts once per epoch to the sign of the epoch's summed gradient (ActiveLR, Wadi et al.).

    ``s <- beta2 * s + (1 - beta2) * (g - m)**2 + eps`` (eps accumulates inside s, as in
    AdaBelief). ``rectify=True`` applies RAdam's rectification with RAdam's threshold (rho_t > 5)
    and a bias-corrected momentum step below it.

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay, amsgrad, rectify: as in the ``adabelief-pytorch`` package
            with ``weight_decouple=True``; weight decay is not scaled by the gain.""" + GAIN_ARGS_DOC + SIGN_TEST_DOC

    spec = ADABELIEF

    def __init__(self, params, lr=1e-3, *, steps_per_epoch, betas=(0.9, 0.999), eps=1e-16,
                 weight_decay=0.0, amsgrad=False, rectify=True, gain_inc=2.0, gain_dec=0.5,
                 min_gain=0.0, max_gain=float("inf"), sign_threshold=DEFAULT_SIGN_THRESHOLD,
                 relax_gains=False,
                 maximize=False, backend="auto", state_precision="compact"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, rectify=rectify, gain_inc=gain_inc, gain_dec=gain_dec,
                        min_gain=min_gain, max_gain=max_gain, sign_threshold=sign_threshold,
                        relax_gains=relax_gains,
                        maximize=maximize)
        super().__init__(params, defaults, steps_per_epoch, backend, state_precision)
