"""The one object every backend receives: one optimizer step's work for one (device, dtype) group
of tensors, with the scalars that are the same for all of them.

A backend is a callable ``backend(bucket) -> None`` that performs, in place and for every tensor
index ``i`` of the bucket, exactly the per-element step of docs/algorithm.md:

1. the epoch boundary named by ``bucket.boundary`` (uniform across the bucket):
   ``ROLL``   prev_sign <- sign(grad_sum); grad_sum <- 0
   ``UPDATE`` gain <- clamp(gain + gain_inc if prev_sign * sign(grad_sum) > 0 else gain * gain_dec,
                            min_gain, max_gain); then as ROLL
   The boundary is applied even when ``found_inf`` is set (it never reads this step's gradient).
2. if ``found_inf`` is given and non-zero: nothing else (no accumulation, no update, step unchanged);
3. g = grad / grad_scale (if given), negated when ``maximize``; grad_sum += g (float32);
   step += 1;
4. the base optimizer's update of param and its state with the per-element lr ``lr * gain``:
   ``bucket.spec`` (the optimizer's one definition, adaptive_lr/optim/spec.py) says how, for
   every backend, with ``bucket.hyper`` its typed hyperparameter record.

State dtypes: gain and grad_sum float32, prev_sign int8, step a float32 0-dim tensor on the
param's device; moments float64 for float64 params, else float32 (also for bf16/fp16 params,
whose math runs in float32).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class Boundary(enum.IntEnum):
    """What the first step of an epoch does before its own update (docs/algorithm.md)."""

    NONE = 0  # mid-epoch step
    ROLL = 1  # the param's first boundary: no previous sign to compare with, only roll over
    UPDATE = 2  # compare signs, update the gain, then roll over


@dataclass(frozen=True)
class GainRule:
    """The epoch boundary's arguments (what every optimizer's hyperparameter record also has)."""

    gain_inc: float
    gain_dec: float
    min_gain: float
    max_gain: float

    @classmethod
    def of(cls, group: dict) -> "GainRule":
        return cls(group["gain_inc"], group["gain_dec"], group["min_gain"], group["max_gain"])


@dataclass
class Bucket:
    spec: Any  # adaptive_lr.optim.spec.OptimizerSpec (a backend never imports the optim layer)
    params: list[Tensor]
    grads: list[Tensor]
    gains: list[Tensor]
    grad_sums: list[Tensor]
    prev_signs: list[Tensor]
    steps: list[Tensor]
    # base state lists by key, in spec.state_keys(hyper) order
    state: dict[str, list[Tensor]]
    # the param group's typed hyperparameter record (lr may be a float or a 1-element tensor)
    hyper: Any
    boundary: Boundary = Boundary.NONE
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Moments are float64 for float64 params, float32 otherwise (low-precision params too)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32
