from __future__ import annotations

from .base import GAIN_ARGS_DOC, ActiveOptimizer


class ActiveAdamW(ActiveOptimizer):
    __doc__ = r"""AdamW whose per-element learning rate ``lr * gain`` adapts once per epoch to the
    sign of the epoch's summed gradient (ActiveLR, Wadi et al.). With every gain at 1 (the first
    two epochs) it is ``torch.optim.AdamW``.

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay, amsgrad: as in ``torch.optim.AdamW``; weight decay is not
            scaled by the gain.""" + GAIN_ARGS_DOC

    optimizer_name = "adamw"

    def __init__(self, params, lr=1e-3, *, steps_per_epoch, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2, amsgrad=False, gain_inc=2.0, gain_dec=0.5, min_gain=0.0,
                 max_gain=float("inf"), maximize=False, backend="auto"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, gain_inc=gain_inc, gain_dec=gain_dec,
                        min_gain=min_gain, max_gain=max_gain, maximize=maximize)
        super().__init__(params, defaults, steps_per_epoch, backend)

    def _validate_hyperparameters(self, group: dict) -> None:
        super()._validate_hyperparameters(group)
        self._validate_betas_eps(group)
