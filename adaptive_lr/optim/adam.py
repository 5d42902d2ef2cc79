from __future__ import annotations

from dataclasses import dataclass

import torch

from .adamw import ADAMW
from .base import DEFAULT_SIGN_THRESHOLD, GAIN_ARGS_DOC, SIGN_TEST_DOC, ActiveOptimizer
from .spec import AdamHyper, BaseOptimizer, OptimizerSpec


@dataclass(frozen=True)
class AdamHyperL2(AdamHyper):
    amsgrad: bool
    decoupled_weight_decay: bool


def _l2(h: AdamHyperL2) -> float:
    """The weight decay the moments see: Adam's L2 term, unless it is decoupled (AdamW)."""
    return 0.0 if h.decoupled_weight_decay else h.weight_decay


def _reference(theta, g, gamma, step, state, h: AdamHyperL2) -> None:
    if _l2(h) != 0:  # the moments see it; the epoch sum does not
        g = g + _l2(h) * theta
    ADAMW.reference(theta, g, gamma, step, state, h)


def _foreach(theta, g, gammas, steps, state, h: AdamHyperL2) -> None:
    if _l2(h) != 0:
        g = torch._foreach_add(g, torch._foreach_mul(theta, _l2(h)))
    ADAMW.foreach(theta, g, gammas, steps, state, h)


ADAM = OptimizerSpec(
    kernel="adam",
    hyper=AdamHyperL2,
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    second_moment="exp_avg_sq",
    amsgrad_state="max_exp_avg_sq",
    reference=_reference,
    foreach=_foreach,
    kernel_hyper=lambda h: dict(ADAMW.kernel_hyper(h), weight_decay=_l2(h)),
    base=BaseOptimizer("torch.optim.Adam", ("lr", "betas", "eps", "amsgrad")),
    decoupled_weight_decay=lambda h: h.decoupled_weight_decay,
)


class ActiveAdam(ActiveOptimizer):
    __doc__ = r"""Adam (weight decay as an L2 term of the gradient) whose per-element learning rate
    ``lr * gain`` adapts once per epoch to the sign of the epoch's summed gradient (ActiveLR,
    Wadi et al.). With every gain at 1 (the first two epochs) it is ``torch.optim.Adam``.

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay: as in
            ``torch.optim.Adam``: ``g + weight_decay * param`` feeds the moments (the epoch sum
            that moves the gains is of ``g`` alone); with ``decoupled_weight_decay=True`` it is
            ActiveAdamW's decoupled decay instead.""" + GAIN_ARGS_DOC + SIGN_TEST_DOC

    spec = ADAM

    def __init__(self, params, lr=1e-3, *, steps_per_epoch, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, amsgrad=False, decoupled_weight_decay=False, gain_inc=2.0,
                 gain_dec=0.5, min_gain=0.0, max_gain=float("inf"), sign_threshold=DEFAULT_SIGN_THRESHOLD,
                 relax_gains=False,
                 maximize=False, backend="auto", state_precision="compact"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay,
                        gain_inc=gain_inc, gain_dec=gain_dec,
                        min_gain=min_gain, max_gain=max_gain, sign_threshold=sign_threshold,
                        relax_gains=relax_gains,
                        maximize=maximize)
        super().__init__(params, defaults, steps_per_epoch, backend, state_precision)
