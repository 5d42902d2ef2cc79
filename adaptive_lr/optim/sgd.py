from __future__ import annotations

from .base import GAIN_ARGS_DOC, ActiveOptimizer, _check


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
            gradient as an L2 term).""" + GAIN_ARGS_DOC

    optimizer_name = "sgd"

    def __init__(self, params, lr, steps_per_epoch, momentum=0.9, dampening=0.0, nesterov=False,
                 weight_decay=0.0, gain_inc=2.0, gain_dec=0.5, min_gain=0.0,
                 max_gain=float("inf"), maximize=False, backend="auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, gain_inc=gain_inc, gain_dec=gain_dec,
                        min_gain=min_gain, max_gain=max_gain, maximize=maximize)
        super().__init__(params, defaults, steps_per_epoch, backend)

    def _validate_hyperparameters(self, group: dict) -> None:
        super()._validate_hyperparameters(group)
        _check(group["momentum"] >= 0, f"Invalid momentum value: {group['momentum']}")
        _check(0 <= group["dampening"] <= 1, f"Invalid dampening value: {group['dampening']}")
        _check(
            not group["nesterov"] or (group["momentum"] > 0 and group["dampening"] == 0),
            "Nesterov momentum requires a momentum and zero dampening",
        )
