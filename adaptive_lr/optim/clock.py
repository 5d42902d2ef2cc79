"""The epoch clock every Active optimizer shares (docs/algorithm.md, "The epoch clock"): one clock
per optimizer, kept in its param groups, and each param's sign state (gain, grad_sum, prev_sign;
compact state's rounding seed) with the epoch that state belongs to, so that missed boundaries
are caught up.

A class using :class:`EpochClock` has ``param_groups`` (dicts holding ``CLOCK_KEYS`` and the
gain rule's ``GAIN_KEYS``, adaptive_lr/gain_rule.py), ``state`` (per-param dicts made by
:func:`sign_state`) and ``steps_per_epoch``, and applies a missed boundary its own way
(``_apply_missed_boundary``)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..backends import Boundary

# The epoch clock kept in every param group (identical in all of them: one clock per optimizer);
# epoch_steps: the length of the last epoch that ended (the sign test's S).
CLOCK_KEYS = ("epoch", "steps_in_epoch", "boundary_pending", "epoch_steps")
# Per-param bookkeeping: the epoch its grad_sum belongs to, and whether it has a previous sign.
# 0-dim CPU tensors (int64, bool), read on the host without a device sync: tools that walk
# optimizer state expect tensors there.
BOOKKEEPING_KEYS = ("epoch", "has_prev_sign")
BOOKKEEPING_DTYPES = {"epoch": torch.int64, "has_prev_sign": torch.bool}
SIGN_KEYS = ("gain", "grad_sum", "prev_sign")
# The sign test's epoch sum of g**2 (Q), of grad_sum's dtype, kept while the test of an optimizer
# without a second moment is on; reset with grad_sum.
GRAD_SQ_SUM = "grad_sq_sum"


def bookkeeping(epoch, has_prev_sign) -> dict:
    return {key: torch.tensor(value, dtype=BOOKKEEPING_DTYPES[key])
            for key, value in (("epoch", epoch), ("has_prev_sign", has_prev_sign))}


def sign_state(p: Tensor, epoch: int, dtype: torch.dtype = torch.float32) -> dict:
    """A param's fresh sign state: gains 1, an empty epoch sum (both of ``dtype``: float32, or
    bfloat16 for compact state), no previous sign yet."""
    like = dict(dtype=dtype, device=p.device)
    return dict(gain=torch.ones_like(p, **like), grad_sum=torch.zeros_like(p, **like),
                prev_sign=torch.zeros_like(p, dtype=torch.int8), **bookkeeping(epoch, False))


class RoundingSeeds:
    """A compact state's rounding seed: its param's index in the optimizer (as in the state
    dict), fixed when the state is made, so that every rank and every backend draws the same
    bits. The index is built on first use."""

    def __init__(self, param_groups: list[dict]):
        self._groups = param_groups
        self._index: dict[int, int] | None = None

    def of(self, p: Tensor) -> Tensor:
        if self._index is None:
            params = (q for group in self._groups for q in group["params"])
            self._index = {id(q): i for i, q in enumerate(params)}
        return torch.tensor(self._index[id(p)] & 0xFFFFFFFF, dtype=torch.int64)


def boundary_kind(state: dict) -> Boundary:
    """The kind of a param's next boundary: its first only rolls over (no sign to compare yet)."""
    return Boundary.UPDATE if state["has_prev_sign"] else Boundary.ROLL


def record_boundary(state: dict) -> None:
    state["epoch"].add_(1)
    state["has_prev_sign"].fill_(True)


def check_grad(name: str, p: Tensor) -> None:
    """A param's grad must be dense and match its param (checked before anything is written)."""
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
    if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
        raise RuntimeError(
            f"{name}: grad ({grad.dtype}, {tuple(grad.shape)}, {grad.device}) does not "
            f"match its param ({p.dtype}, {tuple(p.shape)}, {p.device})"
        )


def check_steps_per_epoch(steps_per_epoch) -> None:
    if steps_per_epoch is not None and not (
            isinstance(steps_per_epoch, int) and steps_per_epoch >= 1):
        raise ValueError(f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}")


def new_clock() -> dict:
    return {"epoch": 0, "steps_in_epoch": 0, "boundary_pending": False, "epoch_steps": 0}


def sign_test_min_steps(param_groups: list[dict]) -> tuple[float, int]:
    """The strictest group's ``sign_threshold`` k, and the fewest steps per epoch with which its
    sign test can count a sign at all: an epoch sum of S steps passes where G² > k²·S·(mean g²),
    which even a constant gradient (G² = S²·g²) does only with S > k²."""
    k = max((group["sign_threshold"] for group in param_groups), default=0.0)
    return k, math.floor(k * k) + 1


class EpochClock:
    """end_epoch, the clock's tick after a step, and the catch-up of missed boundaries."""

    def set_steps_per_epoch(self, steps_per_epoch: int | None) -> None:
        """Change the epoch's length in optimizer steps (the window whose summed gradient's sign
        is compared), or switch to manual mode with ``None``; checked as the constructor's
        argument. The epoch in progress ends once it has counted the new length: at the next step
        if it already has. Like the constructor's argument it is configuration, not state: a
        state dict does not hold it, and ``load_state_dict`` keeps the optimizer's."""
        check_steps_per_epoch(steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self._warn_if_epoch_too_short(stacklevel=3)

    def _warn_if_epoch_too_short(self, stacklevel: int) -> None:
        """An epoch too short for the sign test is legal (a test loop, a toy run) but makes the
        optimizer its base optimizer, so it is said once, where the epoch is set (``stacklevel``:
        the caller's frame, the line the user wrote)."""
        if self.steps_per_epoch is None:
            return
        k, fewest = sign_test_min_steps(self.param_groups)
        if self.steps_per_epoch < fewest:
            warnings.warn(
                f"{type(self).__name__}: steps_per_epoch={self.steps_per_epoch} is too short for "
                f"the sign test (sign_threshold={k:g} needs at least {fewest} steps per epoch): an "
                "epoch sum can count as a sign only by a rounding tie, so the gains stay 1 and it "
                "steps as its base optimizer. Use a longer epoch, or sign_threshold=0 (the "
                "paper's rule)",
                stacklevel=stacklevel)

    def end_epoch(self) -> None:
        """Mark an epoch boundary (manual mode). The gains change at the start of the next step."""
        if self.steps_per_epoch is not None:
            raise RuntimeError(
                f"{type(self).__name__} counts epochs itself (steps_per_epoch="
                f"{self.steps_per_epoch}); end_epoch() is for steps_per_epoch=None"
            )
        self._mark_boundary()

    def _clock(self) -> dict:
        """The clock a param group added now joins (every group holds the same one)."""
        if not self.param_groups:
            return new_clock()
        return {k: self.param_groups[0][k] for k in CLOCK_KEYS}

    def _mark_boundary(self) -> None:
        for group in self.param_groups:
            # A param whose grad was None for the whole epoch that ends now still holds the sum
            # of the epoch before: its boundary is applied now, while the clock still holds that
            # epoch's length (the sign test's S), as stepping with zero gradients would have.
            for p in group["params"]:
                state = self.state.get(p)
                if state and int(state["epoch"]) < group["epoch"]:
                    self._apply_missed_boundary(p, group)
            group["epoch"] += 1
            group["epoch_steps"] = group["steps_in_epoch"]
            group["steps_in_epoch"] = 0
            group["boundary_pending"] = True

    # torch.compile runs this eagerly: traced, the clock's ints became SymInt graph inputs
    @torch.compiler.disable
    def _advance_clock(self, crossed: list[dict]) -> None:
        """After every bucket has run: record the boundaries they fused, and tick the clock."""
        for state in crossed:
            record_boundary(state)
        for group in self.param_groups:
            group["boundary_pending"] = False
            group["steps_in_epoch"] += 1
        # >=: a checkpoint resumed with a shorter epoch (a bigger batch, more ranks), or from
        # manual mode, may already be past the end of its epoch, which then ends at this step
        if self.steps_per_epoch is not None:
            if self.param_groups[0]["steps_in_epoch"] >= self.steps_per_epoch:
                self._mark_boundary()

    def _apply_missed_boundary(self, p: Tensor, group: dict) -> None:
        """Param p's boundary, applied outside a step as a step would apply it (each optimizer
        with its own sign test and state), and recorded."""
        raise NotImplementedError

    def _catch_up(self, p: Tensor, state: dict, group: dict) -> Boundary:
        """The kind of boundary the backend fuses into this step of param p. It is recorded in
        the param's state by _advance_clock, once every bucket has run: a step that fails (an op
        rejecting its input) leaves it pending instead of losing it. _mark_boundary keeps every
        param at most one boundary behind; a checkpoint saved by an earlier version may hold params
        further behind, whose older boundaries are applied here (their epochs' lengths are
        lost: the sign test takes the last epoch's). ``state``: p's."""
        behind = group["epoch"] - int(state["epoch"])  # one host read: each applied boundary adds 1
        while behind > 1:
            self._apply_missed_boundary(p, group)
            behind -= 1
        return Boundary.NONE if behind == 0 else boundary_kind(state)
