"""The one definition of an Active optimizer that every backend looks up: an ``OptimizerSpec``.

An optimizer is its hyperparameter record (typed, validated once when a param group is added),
its state keys, its reference and foreach updates, its mapping onto the fused kernels' arguments
(C++/CUDA op and Triton kernel: the same kernel name and hyperparameters, by name), and the
``torch.optim`` optimizer it equals while every gain is 1. Backends receive the spec and the
record in each bucket and never name an optimizer themselves (docs/algorithm.md, "Adding an
optimizer")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from ..gain_rule import GAIN_KEYS, GainRule


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class GainHyper(GainRule):
    """What every Active optimizer's param group holds besides its base optimizer's own
    hyperparameters: the gain rule (its fields, as ``GainRule`` declares them), lr, decoupled
    weight decay and maximize. The sign test's noise (``sign_threshold`` > 0) is the second
    moment of an optimizer that has one (``OptimizerSpec.second_moment``), else the epoch's sum
    of g**2 (state ``grad_sq_sum``)."""

    lr: float | Tensor
    weight_decay: float
    maximize: bool

    @classmethod
    def from_group(cls, group: dict) -> "GainHyper":
        """The record of a param group; every field must be there (no silent defaults)."""
        record = super().from_group(group)
        if isinstance(record.lr, Tensor) and record.lr.requires_grad:
            # the step reads its value, never differentiates through it (a detached view: a
            # scheduler's in-place change is still seen)
            record = dataclasses.replace(record, lr=record.lr.detach())
        return record

    def validate(self) -> None:
        """Checks of the values (the lr's type and shape are checked by the optimizer)."""
        # (a device tensor's value is not read: that would be a host sync every step)
        if not isinstance(self.lr, Tensor) or self.lr.device.type == "cpu":
            check(float(self.lr) >= 0, f"Invalid learning rate: {float(self.lr)}")
        check(self.weight_decay >= 0, f"Invalid weight_decay: {self.weight_decay}")
        super().validate()

    def gain_rule(self) -> GainRule:
        """The rule alone (the fields the epoch boundary reads; built field by field, which
        torch.compile traces inside a step without a graph break)."""
        return GainRule(**{key: getattr(self, key) for key in GAIN_KEYS})


@dataclass(frozen=True)
class AdamHyper(GainHyper):
    """The Adam family's moments, ``betas`` and ``eps``."""

    betas: tuple[float, float]
    eps: float

    def validate(self) -> None:
        super().validate()
        beta1, beta2 = self.betas
        check(0 <= beta1 < 1, f"Invalid beta parameter at index 0: {beta1}")
        check(0 <= beta2 < 1, f"Invalid beta parameter at index 1: {beta2}")
        check(self.eps >= 0, f"Invalid epsilon value: {self.eps}")


@dataclass(frozen=True)
class BaseOptimizer:
    """The torch.optim optimizer an Active optimizer equals while every gain is 1, as its state
    dict shows it: group keys it always has, keys that would make it another optimizer, and
    whether its weight decay is decoupled when the group does not say."""

    name: str
    required_keys: tuple[str, ...]
    foreign_keys: tuple[str, ...] = ()
    decoupled_by_default: bool = False


# reference(theta, g, gamma, step, state, h): one tensor, in place on theta and state[key]
ReferenceUpdate = Callable[[Tensor, Tensor, Tensor, float, dict, Any], None]
# foreach(theta, g, gammas, steps, state, h): lists of a bucket, state[key] a list; gammas are
# bfloat16 with compact state (moments.foreach_scaled_gains widens them)
ForeachUpdate = Callable[[list, list, list, list, dict, Any], None]


@dataclass(frozen=True)
class OptimizerSpec:
    """One Active optimizer, as every backend needs it.

    ``kernel`` names its fused kernels (the X-macro entry of csrc/include/adaptive_lr/math.h and
    the Triton update of adaptive_lr.kernels); ``kernel_hyper(h)`` is the kernels'
    hyperparameters by name (bools as 0/1): the names the C++ tag's ``kHyper`` and the Triton
    ``Update.hyper`` declare, each backend putting the values in its kernel's order. ``state``
    lists the base-optimizer state in the kernels' order (torch.optim's key names; the tag's
    ``kStates``, the update's ``state``); ``amsgrad_state`` is the key that exists only while the
    group's ``amsgrad`` is on. ``decoupled_weight_decay(h)``: whether every backend applies
    ``theta *= 1 - lr * weight_decay`` before the update (False: the update uses weight_decay
    itself, as Adam's L2 term). ``second_moment``: the state key of the second moment the sign
    test compares an epoch's sum with (its record then has ``betas``, its kernels ``beta2``);
    None: the sign test reads the epoch's sum of g**2 instead (``grad_sq_sum``, kept while the
    test is on: ``keeps_grad_sq_sum``).
    tests/test_kernel_metadata.py checks these names, the state order and the second moment
    against both kernels' declarations."""

    kernel: str
    hyper: type[GainHyper]
    state: tuple[str, ...]
    reference: ReferenceUpdate
    foreach: ForeachUpdate
    kernel_hyper: Callable[[Any], dict[str, float]]
    amsgrad_state: str | None = None
    second_moment: str | None = None
    base: BaseOptimizer | None = None
    decoupled_weight_decay: Callable[[Any], bool] = lambda h: True

    def record(self, group: dict) -> GainHyper:
        return self.hyper.from_group(group)

    def state_keys(self, h: GainHyper) -> tuple[str, ...]:
        """The state keys a group with record ``h`` uses, in the kernels' order."""
        return tuple(k for k in self.state if k != self.amsgrad_state or h.amsgrad)

    @property
    def offers_bfloat16_moments(self) -> bool:
        """Whether state_precision="bfloat16" is offered: the state is momenta (no second moment,
        whose effect in bfloat16 was not measured: docs/precision.md), as the kernels'
        kMomentsInBfloat16."""
        return self.second_moment is None

    def keeps_grad_sq_sum(self, h: GainHyper) -> bool:
        """Whether a group with record ``h`` keeps ``grad_sq_sum`` (Q, the epoch's sum of g**2):
        its sign test is on and it has no second moment to measure the noise with."""
        return self.second_moment is None and h.gain_rule().sign_threshold > 0
