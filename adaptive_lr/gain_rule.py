"""The gain rule's arguments, declared once (docs/algorithm.md, "The gain rule" and "The sign
test"): ``GainRule``, whose fields are the param-group keys every Active optimizer and
``Active(optimizer)`` hold, their checks, and the sign test's noise floor. The optimizers
(adaptive_lr/optim/) and the backends (adaptive_lr/backends/) both take the rule from here."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GainRule:
    """The epoch boundary's arguments. ``sign_threshold`` k > 0 turns the sign test on: an epoch
    sum counts as a sign only where it stands out of the gradient's noise (a second moment, or
    the epoch's sum of g**2); 0 is the paper's rule. ``relax_gains``: under the sign test, a gain
    above 1 with no evidence either way moves toward 1 (``1 + (gain - 1) * gain_dec``) instead of
    being held."""

    gain_inc: float
    gain_dec: float
    min_gain: float
    max_gain: float
    sign_threshold: float
    relax_gains: bool

    @classmethod
    def from_group(cls, group: dict) -> "GainRule":
        """The record of a param group (this class's fields, a subclass's too); every field must
        be there (no silent defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in group]
        if missing:
            raise ValueError(f"{cls.__name__}: the param group has no {missing}")
        return cls(**{name: group[name] for name in names})

    def validate(self) -> None:
        """The rule's values, checked as a TypeError or ValueError naming the value."""
        for key in GAIN_KEYS:
            value = getattr(self, key)
            if key == "relax_gains":
                if not isinstance(value, bool):
                    raise TypeError(f"relax_gains must be a bool, got {value!r:.40}")
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{key} must be a real number, got {value!r:.40}")
        if not self.gain_inc >= 0:
            raise ValueError(f"gain_inc must be >= 0, got {self.gain_inc}")
        if not 0 < self.gain_dec <= 1:
            raise ValueError(f"gain_dec must be in (0, 1], got {self.gain_dec}")
        if not 0 <= self.min_gain <= 1 <= self.max_gain:
            raise ValueError("gains need 0 <= min_gain <= 1 <= max_gain, got "
                             f"min_gain={self.min_gain}, max_gain={self.max_gain}")
        if not 0 <= self.sign_threshold < math.inf:
            raise ValueError(f"sign_threshold must be finite and >= 0, got {self.sign_threshold}")
        if self.relax_gains and self.sign_threshold == 0:
            raise ValueError("relax_gains needs the sign test (sign_threshold > 0): the paper's "
                             "rule (sign_threshold=0) holds no gain; set relax_gains=False "
                             "where sign_threshold is 0")


# the gain rule's keys in a param group
GAIN_KEYS = tuple(f.name for f in dataclasses.fields(GainRule))


def check_gain_args(group: dict) -> None:
    """The gain arguments of a param group (or of a constructor), all present and valid."""
    GainRule.from_group(group).validate()


def held_gain(gain32: Tensor, rule: GainRule) -> Tensor:
    """What the sign test makes of a float32 gain with no evidence either way: the gain itself,
    or with ``relax_gains`` a gain above 1 moved toward 1, ``(gain - 1) * gain_dec + 1`` (each op
    rounded once in float32, as the kernels do)."""
    if not rule.relax_gains:
        return gain32
    return torch.where(gain32 > 1, (gain32 - 1) * rule.gain_dec + 1, gain32)


def sign_test_factor(rule: GainRule, epoch_steps: int, beta2: float, step: float) -> float:
    """The per-tensor factor of the sign test: a sum G counts where G**2 > factor * v, with
    factor = k**2 * epoch_steps / (1 - beta2**step) (every backend computes it so, in double).
    A param that never stepped (step 0) has v = 0 and G = 0: its factor is never used."""
    bias_correction = 1 - beta2**step
    numerator = rule.sign_threshold * rule.sign_threshold * epoch_steps
    return numerator / bias_correction if bias_correction != 0 else math.inf


def sign_test_floor(v: Tensor, step: float, rule: GainRule, epoch_steps: int,
                    beta2: float) -> Tensor:
    """One tensor's factor * v (v its second moment, ``step`` its count before this step)."""
    return v * sign_test_factor(rule, epoch_steps, beta2, step)


def grad_sq_sum_floor(grad_sq_sum: Tensor, rule: GainRule, compute: torch.dtype) -> Tensor:
    """The noise floor of an optimizer without a second moment: k**2 * Q (Q the epoch's sum of
    g**2, the same g as grad_sum's), in the compute dtype as the kernels compare."""
    return grad_sq_sum.to(compute) * (rule.sign_threshold * rule.sign_threshold)
