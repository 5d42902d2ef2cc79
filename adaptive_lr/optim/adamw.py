from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.scalars import bias_corrections
from .base import DEFAULT_SIGN_THRESHOLD, GAIN_ARGS_DOC, SIGN_TEST_DOC, ActiveOptimizer
from .moments import adam_moments, foreach_adam_moments, foreach_scaled_step
from .spec import AdamHyper, BaseOptimizer, OptimizerSpec


@dataclass(frozen=True)
class AdamWHyper(AdamHyper):
    amsgrad: bool


def _reference(theta, g, gamma, step, state, h: AdamWHyper) -> None:
    v = adam_moments(g, state, h, h.amsgrad)
    bc1, bc2 = bias_corrections(h.betas, step)
    denom = v.sqrt() / math.sqrt(bc2) + h.eps
    theta.sub_((h.lr / bc1) * gamma * state["exp_avg"] / denom)


def _foreach(theta, g, gammas, steps, state, h: AdamWHyper) -> None:
    v = foreach_adam_moments(g, state, h, h.amsgrad)
    corrections = [bias_corrections(h.betas, t) for t in steps]
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(bc2) for _, bc2 in corrections])
    torch._foreach_add_(denom, h.eps)
    foreach_scaled_step(theta, gammas, state["exp_avg"], [h.lr / bc1 for bc1, _ in corrections],
                        denom)


ADAMW = OptimizerSpec(
    kernel="adamw",
    hyper=AdamWHyper,
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    second_moment="exp_avg_sq",
    amsgrad_state="max_exp_avg_sq",
    reference=_reference,
    foreach=_foreach,
    kernel_hyper=lambda h: {"beta1": h.betas[0], "beta2": h.betas[1], "eps": h.eps,
                            "amsgrad": float(h.amsgrad)},
    # before torch 2.6, AdamW's groups had no decoupled_weight_decay key
    base=BaseOptimizer("torch.optim.AdamW", ("lr", "betas", "eps", "amsgrad"),
                       decoupled_by_default=True),
)


class ActiveAdamW(ActiveOptimizer):
    __doc__ = r"""AdamW whose per-element learning rate ``lr * gain`` adapts once per epoch to the
    sign of the epoch's summed gradient (ActiveLR, Wadi et al.). With every gain at 1 (the first
    two epochs) it is ``torch.optim.AdamW``.

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay, amsgrad: as in ``torch.optim.AdamW``; weight decay is not
            scaled by the gain.""" + GAIN_ARGS_DOC + SIGN_TEST_DOC

    spec = ADAMW

    def __init__(self, params, lr=1e-3, *, steps_per_epoch, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2, amsgrad=False, gain_inc=2.0, gain_dec=0.5, min_gain=0.0,
                 max_gain=float("inf"), sign_threshold=DEFAULT_SIGN_THRESHOLD, relax_gains=False,
                 maximize=False, backend="auto", state_precision="compact"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, gain_inc=gain_inc, gain_dec=gain_dec,
                        min_gain=min_gain, max_gain=max_gain, sign_threshold=sign_threshold,
                        relax_gains=relax_gains,
                        maximize=maximize)
        super().__init__(params, defaults, steps_per_epoch, backend, state_precision)
