from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (
    DEFAULT_GRAD_SQ_SUM_SIGN_THRESHOLD, GAIN_ARGS_DOC, NOISE_TEST_DOC, ActiveOptimizer,
)
from .moments import foreach_scaled_gains
from .spec import BaseOptimizer, GainHyper, OptimizerSpec, check


@dataclass(frozen=True)
class SgdHyper(GainHyper):
    momentum: float
    dampening: float
    nesterov: bool

    def validate(self) -> None:
        super().validate()
        check(self.momentum >= 0, f"Invalid momentum value: {self.momentum}")
        check(0 <= self.dampening <= 1, f"Invalid dampening value: {self.dampening}")
        check(
            not self.nesterov or (self.momentum > 0 and self.dampening == 0),
            "Nesterov momentum requires a momentum and zero dampening",
        )


def _reference(theta, g, gamma, step, state, h: SgdHyper) -> None:
    buf = state["momentum_buffer"]
    if step == 1:
        buf.copy_(g)
    else:
        buf.mul_(h.momentum).add_(g * (1 - h.dampening))
    direction = g + buf * h.momentum if h.nesterov else buf
    theta.sub_(h.lr * gamma * direction)


def _foreach(theta, g, gammas, steps, state, h: SgdHyper) -> None:
    bufs = state["momentum_buffer"]
    first = [i for i, t in enumerate(steps) if t == 1]
    later = [i for i, t in enumerate(steps) if t != 1]
    for i in first:
        bufs[i].copy_(g[i])
    if later:
        later_bufs = [bufs[i] for i in later]
        torch._foreach_mul_(later_bufs, h.momentum)
        torch._foreach_add_(later_bufs, torch._foreach_mul([g[i] for i in later], 1 - h.dampening))
    direction = torch._foreach_add(g, torch._foreach_mul(bufs, h.momentum)) if h.nesterov else bufs
    update = foreach_scaled_gains(gammas, h.lr, theta[0].dtype)
    torch._foreach_mul_(update, direction)
    torch._foreach_sub_(theta, update)


SGD = OptimizerSpec(
    kernel="sgd",
    hyper=SgdHyper,
    state=("momentum_buffer",),
    reference=_reference,
    foreach=_foreach,
    kernel_hyper=lambda h: {"momentum": h.momentum, "dampening": h.dampening,
                            "nesterov": float(h.nesterov)},
    base=BaseOptimizer("torch.optim.SGD", ("lr", "momentum", "dampening", "nesterov")),
)


class ActiveSGD(ActiveOptimizer):
    __doc__ = r"""SGD with momentum whose per-element learning rate ``lr * gain`` adapts once per
    epoch to the sign of the epoch's summed gradient (ActiveLR, Wadi et al.).

    ``b <- g`` on the first step, then ``b <- momentum * b + (1 - dampening) * g``; the step is
    ``param -= lr * gain * (g + momentum * b if nesterov else b)``. Weight decay is decoupled and
    not scaled by the gain: ``param *= 1 - lr * weight_decay``.

    Args:
        params: iterable of parameters or param groups.
        lr (float): base learning rate (a scheduler such as GreedyLR may change it).
        momentum (float): 0.9 by default, unlike ``torch.optim.SGD`` (0): ActiveLR's SGD is SGD
            with momentum, as in the paper. Pass ``momentum=0`` for plain SGD.
        dampening, nesterov: as in ``torch.optim.SGD``, except that dampening also applies
            with ``momentum=0`` (the buffer is then ``(1 - dampening) * g``).
        weight_decay (float): decoupled, as above (``torch.optim.SGD`` adds it to the
            gradient as an L2 term).""" + GAIN_ARGS_DOC + NOISE_TEST_DOC

    spec = SGD

    def __init__(self, params, lr, steps_per_epoch, momentum=0.9, dampening=0.0, nesterov=False,
                 weight_decay=0.0, gain_inc=2.0, gain_dec=0.5, min_gain=0.0,
                 max_gain=float("inf"), maximize=False, backend="auto", state_precision="compact",
                 sign_threshold=DEFAULT_GRAD_SQ_SUM_SIGN_THRESHOLD, relax_gains=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, gain_inc=gain_inc, gain_dec=gain_dec,
                        min_gain=min_gain, max_gain=max_gain, maximize=maximize,
                        sign_threshold=sign_threshold, relax_gains=relax_gains)
        super().__init__(params, defaults, steps_per_epoch, backend, state_precision)
