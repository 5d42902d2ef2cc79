"""Callbacks that set the Active optimizers' sign window at train start: in Hugging Face
``Trainer`` (:mod:`adaptive_lr.integrations.hf`) and in Lightning
(:mod:`adaptive_lr.integrations.lightning`); docs/integration.md shows both. Each submodule imports
its framework and this module imports neither, so adaptive_lr never requires them.

The *window* is the optimizer's ``steps_per_epoch``: the optimizer steps whose summed gradient's
sign ActiveLR compares with the previous window's. It is counted in optimizer steps, never in
micro-batches, and runs on across data epochs. The gains first change at the start of the third
window, so a window is worth choosing shorter than the data epoch when a run has few epochs (a
fine-tuning run of 1 to 3) or none (a stream)."""

from __future__ import annotations

import warnings
from typing import Iterable

from ..optim.clock import EpochClock, sign_test_min_steps

# One window per data epoch: ActiveLR's epoch, as in the paper and in every result so far. A study
# of shorter windows is pending; this is the one place its answer will change.
DEFAULT_WINDOWS_PER_EPOCH = 1


def check_window_args(window: int | None, windows_per_epoch: int | None) -> None:
    """A callback's arguments, checked when it is made: at most one of the two, a positive int."""
    if window is not None and windows_per_epoch is not None:
        raise ValueError("give either window (optimizer steps) or windows_per_epoch, not both")
    for name, value in (("window", window), ("windows_per_epoch", windows_per_epoch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _active(optimizer) -> EpochClock | None:
    """The Active optimizer in ``optimizer``, which may be a trainer's wrapper of it (Accelerate's
    ``AcceleratedOptimizer`` keeps it as ``.optimizer``), or None."""
    while not isinstance(optimizer, EpochClock):
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return optimizer


def set_window(optimizers: Iterable, *, window: int | None, windows_per_epoch: int | None,
               epoch_steps: int | None, total_steps: float | None) -> int:
    """Set the window of every Active optimizer among ``optimizers`` and return it.

    ``window`` (optimizer steps) wins; else the data epoch's ``epoch_steps`` (optimizer steps;
    None: unknown) is split into ``windows_per_epoch`` windows (default
    ``DEFAULT_WINDOWS_PER_EPOCH``). ``total_steps``: the run's optimizer steps (None or inf:
    unknown), to warn when the gains would never change."""
    optimizers = list(optimizers)
    actives = [opt for opt in map(_active, optimizers) if opt is not None]
    if not actives:
        raise ValueError("no Active optimizer to set the window of; the trainer's optimizers: "
                         + ", ".join(type(opt).__name__ for opt in optimizers))
    if window is None:
        if epoch_steps is None:
            raise ValueError(
                "the optimizer steps of a data epoch are unknown here (a dataset without a "
                "length, or Lightning's manual optimization): pass window=, in optimizer steps")
        per_epoch = windows_per_epoch or DEFAULT_WINDOWS_PER_EPOCH
        window = epoch_steps // per_epoch
        if window == 0:
            raise ValueError(f"windows_per_epoch={per_epoch} asks for more windows than the "
                             f"{epoch_steps} optimizer steps of a data epoch")
    for opt in actives:
        k, fewest = sign_test_min_steps(opt.param_groups)
        if window < fewest:
            raise ValueError(
                f"a window of {window} optimizer steps is too short for the sign test of "
                f"{type(opt).__name__} (sign_threshold={k:g}): a window's summed gradient counts "
                f"as a sign only where it stands {k:g} standard errors out of the noise, which "
                f"even a constant gradient does only over more than k² = {k * k:g} steps. Use a "
                f"window of at least {fewest} steps (or sign_threshold=0, the "
                "paper's rule)")
    if total_steps is not None and total_steps <= 2 * window:
        warnings.warn(
            f"the gains first change at the start of the third window (step {2 * window + 1}) "
            f"and this run has {total_steps} optimizer steps: the Active optimizer will step "
            "exactly as its base optimizer. Choose a shorter window (window= or "
            "windows_per_epoch=) or a longer run", stacklevel=2)
    for opt in actives:
        opt.set_steps_per_epoch(window)
    return window
