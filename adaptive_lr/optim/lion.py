from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (
    DEFAULT_GRAD_SQ_SUM_SIGN_THRESHOLD, GAIN_ARGS_DOC, NOISE_TEST_DOC, ActiveOptimizer,
)
from .moments import foreach_scaled_gains
from .spec import GainHyper, OptimizerSpec, check


@dataclass(frozen=True)
class LionHyper(GainHyper):
    betas: tuple[float, float]

    def validate(self) -> None:
        super().validate()
        for i, beta in enumerate(self.betas):
            check(0 <= beta <= 1, f"Invalid beta parameter at index {i}: {beta}")


def _reference(theta, g, gamma, step, state, h: LionHyper) -> None:
    beta1, beta2 = h.betas
    m = state["exp_avg"]
    direction = torch.sign(m * beta1 + g * (1 - beta1))
    theta.sub_(h.lr * gamma * direction)
    m.mul_(beta2).add_(g * (1 - beta2))


def _foreach(theta, g, gammas, steps, state, h: LionHyper) -> None:
    beta1, beta2 = h.betas
    m = state["exp_avg"]
    direction = torch._foreach_mul(m, beta1)
    torch._foreach_add_(direction, torch._foreach_mul(g, 1 - beta1))
    torch._foreach_sign_(direction)
    update = foreach_scaled_gains(gammas, h.lr, theta[0].dtype)
    torch._foreach_mul_(update, direction)
    torch._foreach_sub_(theta, update)
    torch._foreach_mul_(m, beta2)
    # g * (1 - beta2) in the update's buffers: one param-sized list fewer at the step's peak
    torch._foreach_copy_(update, g)
    torch._foreach_mul_(update, 1 - beta2)
    torch._foreach_add_(m, update)


LION = OptimizerSpec(
    kernel="lion",
    hyper=LionHyper,
    state=("exp_avg",),
    reference=_reference,
    foreach=_foreach,
    kernel_hyper=lambda h: {"beta1": h.betas[0], "beta2": h.betas[1]},
)


class ActiveLion(ActiveOptimizer):
    __doc__ = r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") whose
    per-element learning rate ``lr * gain`` adapts once per epoch to the sign of the epoch's
    summed gradient (ActiveLR, Wadi et al.). With every gain at 1 it is the ``lion-pytorch``
    package's ``Lion``: ``param *= 1 - lr * weight_decay``; ``param -= lr * gain *
    sign(beta1 * m + (1 - beta1) * g)``; ``m <- beta2 * m + (1 - beta2) * g``.

    Args:
        params: iterable of parameters or param groups.
        lr, betas, weight_decay: as in ``lion_pytorch.Lion`` (lr 1e-4, betas (0.9, 0.99));
            weight decay is not scaled by the gain.""" + GAIN_ARGS_DOC + NOISE_TEST_DOC

    spec = LION

    def __init__(self, params, lr=1e-4, *, steps_per_epoch, betas=(0.9, 0.99), weight_decay=0.0,
                 gain_inc=2.0, gain_dec=0.5, min_gain=0.0, max_gain=float("inf"),
                 sign_threshold=DEFAULT_GRAD_SQ_SUM_SIGN_THRESHOLD, relax_gains=False,
                 maximize=False, backend="auto",
                 state_precision="compact"):
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, gain_inc=gain_inc,
                        gain_dec=gain_dec, min_gain=min_gain, max_gain=max_gain,
                        maximize=maximize, sign_threshold=sign_threshold, relax_gains=relax_gains)
        super().__init__(params, defaults, steps_per_epoch, backend, state_precision)
