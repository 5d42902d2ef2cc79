from __future__ import annotations

from .base import GAIN_ARGS_DOC, ActiveOptimizer


class ActiveAdaBelief(ActiveOptimizer):
    __doc__ = r"""AdaBelief (decoupled weight decay) whose per-element learning rate ``lr * gain``
    adapts once per epoch to the sign of the epoch's summed gradient (ActiveLR, Wadi et al.).

    ``s <- beta2 * s + (1 - beta2) * (g - m)**2 + eps`` (eps accumulates inside s, as in
    AdaBelief). ``rectify=True`` applies RAdam's rectification with RAdam's threshold (rho_t > 5)
    and a bias-corrected momentum step below it.

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay, amsgrad, rectify: as in the ``adabelief-pytorch`` package
            with ``weight_decouple=True``; weight decay is not scaled by the gain.""" + GAIN_ARGS_DOC

    optimizer_name = "adabelief"

    def __init__(self, params, lr=1e-3, *, steps_per_epoch, betas=(0.9, 0.999), eps=1e-16,
                 weight_decay=0.0, amsgrad=False, rectify=True, gain_inc=2.0, gain_dec=0.5,
                 min_gain=0.0, max_gain=float("inf"), maximize=False, backend="auto"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, rectify=rectify, gain_inc=gain_inc, gain_dec=gain_dec,
                        min_gain=min_gain, max_gain=max_gain, maximize=maximize)
        super().__init__(params, defaults, steps_per_epoch, backend)

    def _validate_hyperparameters(self, group: dict) -> None:
        super()._validate_hyperparameters(group)
        self._validate_betas_eps(group)
