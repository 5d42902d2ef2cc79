from __future__ import annotations

import math

import torch

from ..backends.scalars import bias_corrections, radam_rectification
from .base import DEFAULT_SIGN_THRESHOLD, GAIN_ARGS_DOC, SIGN_TEST_DOC, ActiveOptimizer
from .moments import adam_moments, foreach_adam_moments, foreach_scaled_step, pick
from .spec import AdamHyper, BaseOptimizer, OptimizerSpec


def _reference(theta, g, gamma, step, state, h: AdamHyper) -> None:
    v = adam_moments(g, state, h, amsgrad=False)
    bc1, bc2 = bias_corrections(h.betas, step)
    m_hat = state["exp_avg"] / bc1
    rect = radam_rectification(h.betas[1], step)
    if rect is None:
        theta.sub_(h.lr * gamma * m_hat)
    else:
        theta.sub_(h.lr * gamma * rect * m_hat * math.sqrt(bc2) / (v.sqrt() + h.eps))


def split_by_rectification(steps, beta2):
    """Per-tensor r_t, and the indices whose step is rectified and those that take the plain
    momentum step."""
    rects = [radam_rectification(beta2, t) for t in steps]
    rectified = [i for i, r in enumerate(rects) if r is not None]
    plain = [i for i, r in enumerate(rects) if r is None]
    return rects, rectified, plain


def _foreach(theta, g, gammas, steps, state, h: AdamHyper) -> None:
    v = foreach_adam_moments(g, state, h, amsgrad=False)
    corrections = [bias_corrections(h.betas, t) for t in steps]
    rects, rectified, plain = split_by_rectification(steps, h.betas[1])
    m = state["exp_avg"]
    if plain:
        scales = [h.lr / corrections[i][0] for i in plain]
        foreach_scaled_step(pick(theta, plain), pick(gammas, plain), pick(m, plain), scales)
    if rectified:
        denom = torch._foreach_sqrt(pick(v, rectified))
        torch._foreach_add_(denom, h.eps)
        scales = [h.lr * rects[i] * math.sqrt(corrections[i][1]) / corrections[i][0]
                  for i in rectified]
        foreach_scaled_step(pick(theta, rectified), pick(gammas, rectified), pick(m, rectified),
                            scales, denom)


RADAM = OptimizerSpec(
    kernel="radam",
    hyper=AdamHyper,
    state=("exp_avg", "exp_avg_sq"),
    second_moment="exp_avg_sq",
    reference=_reference,
    foreach=_foreach,
    kernel_hyper=lambda h: {"beta1": h.betas[0], "beta2": h.betas[1], "eps": h.eps},
    base=BaseOptimizer("torch.optim.RAdam", ("lr", "betas", "eps"), ("amsgrad",)),
)


class ActiveRAdam(ActiveOptimizer):
    __doc__ = r"""RAdam (decoupled weight decay) whose per-element learning rate ``lr * gain`` adapts
    once per epoch to the sign of the epoch's summed gradient (ActiveLR, Wadi et al.). With every
    gain at 1 it is ``torch.optim.RAdam(decoupled_weight_decay=True)``; the rectification uses the
    current step's moments.

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay: as in ``torch.optim.RAdam``; weight decay is decoupled
            and not scaled by the gain.""" + GAIN_ARGS_DOC + SIGN_TEST_DOC

    spec = RADAM

    def __init__(self, params, lr=1e-3, *, steps_per_epoch, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, gain_inc=2.0, gain_dec=0.5, min_gain=0.0,
                 max_gain=float("inf"), sign_threshold=DEFAULT_SIGN_THRESHOLD, relax_gains=False,
                 maximize=False, backend="auto", state_precision="compact"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        gain_inc=gain_inc, gain_dec=gain_dec, min_gain=min_gain,
                        max_gain=max_gain, sign_threshold=sign_threshold, relax_gains=relax_gains,
                        maximize=maximize)
        super().__init__(params, defaults, steps_per_epoch, backend, state_precision)
