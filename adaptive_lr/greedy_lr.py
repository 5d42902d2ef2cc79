"""GreedyLR: a metric-driven scheduler that raises the learning rate while the metric keeps
improving and lowers it when the metric stalls (docs/greedy_lr.md)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, SupportsFloat

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["GreedyLR"]


# A ReduceLROnPlateau by type: that is how torch's SequentialLR (which refuses it at construction,
# since it cannot pass a metric), Lightning (which passes the monitored value to step()) and other
# tools recognise a scheduler whose step() takes the metric. No ReduceLROnPlateau behaviour is used.
class GreedyLR(ReduceLROnPlateau):
    r"""Greedily adapt every param group's learning rate to a monitored metric.

    Each :meth:`step` takes a metric (usually the training loss). It has *improved* when it beats
    the best value seen so far by more than ``threshold``:

    * ``threshold_mode="abs"``: ``x < best - threshold`` (``mode="min"``) or
      ``x > best + threshold`` (``mode="max"``);
    * ``threshold_mode="rel"``: ``x < best * (1 - threshold)`` or ``x > best * (1 + threshold)``.

    More than ``patience`` consecutive improvements multiply every group's lr by ``1 / factor``
    (capped at its ``max_lr``) and freeze the scheduler for ``warmup`` steps; more than
    ``patience`` consecutive non-improvements multiply it by ``factor`` (floored at its
    ``min_lr``) and freeze it for ``cooldown`` steps. Both counters restart after a change. While
    frozen the counters stay at zero and no lr changes, but ``best`` still follows improvements.

    A non-finite metric (NaN, ±inf) counts as a non-improvement and never enters ``best`` or the
    smoothing window. With ``torch.distributed`` initialised, the metric is averaged over all ranks
    before the decision, so every rank applies the same learning rates.

    Args:
        optimizer: Wrapped optimizer; its ``param_groups[i]["lr"]`` are updated in place (a 0-dim
            tensor lr with ``fill_``, so captured graphs and compiled steps keep seeing it).
        mode: ``"min"`` when lower metrics are better, ``"max"`` when higher are.
        factor: Multiplicative step of the lr, ``0 < factor < 1``.
        patience: Consecutive improvements (non-improvements) tolerated before an increase
            (decrease); the change happens on step ``patience + 1``.
        threshold: Margin by which the metric must beat ``best`` to count as an improvement.
        threshold_mode: ``"abs"`` or ``"rel"`` (see above).
        cooldown: Frozen steps after a decrease.
        warmup: Frozen steps after an increase.
        min_lr: Lower bound per group: a scalar, a list with one value per group, or ``None`` for
            each group's initial lr × 1e-3.
        max_lr: Upper bound per group: a scalar, a list with one value per group, or ``None`` for
            each group's initial lr × 10.
        smooth: Decide on the mean of the last ``window_size`` finite metrics instead of the raw
            metric.
        window_size: Length of the smoothing window (used only with ``smooth=True``).
        reset_start: After this many consecutive decreases that find every group already at its
            ``min_lr``, restore the initial lrs and forget ``best``, the counters and the window.
            ``0`` disables resets.
        sync_across_ranks: Average the metric over all ranks when ``torch.distributed`` is
            initialised (one scalar all-reduce per step).

    Example:
        >>> # xdoctest: +SKIP
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scheduler = GreedyLR(optimizer, patience=10, smooth=True)
        >>> for batch in loader:
        ...     loss = train_step(batch)
        ...     scheduler.step(loss.detach())
    """

    def __init__(
        self,
        optimizer: Optimizer,
        mode: Literal["min", "max"] = "min",
        factor: float = 0.95,
        patience: int = 10,
        threshold: float = 1e-6,
        threshold_mode: Literal["abs", "rel"] = "abs",
        cooldown: int = 0,
        warmup: int = 0,
        min_lr: float | list[float] | tuple[float, ...] | None = None,
        max_lr: float | list[float] | tuple[float, ...] | None = None,
        smooth: bool = False,
        window_size: int = 50,
        reset_start: int = 0,
        sync_across_ranks: bool = True,
    ) -> None:
        # Neither ReduceLROnPlateau.__init__ nor LRScheduler.__init__ is called: the first would
        # set up its own rule, the second would run step() once without a metric.
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("abs", "rel"):
            raise ValueError(f"threshold_mode must be 'abs' or 'rel', got {threshold_mode!r}")
        if not (isinstance(factor, numbers.Real) and 0.0 < factor < 1.0):
            raise ValueError(f"factor must satisfy 0 < factor < 1, got {factor!r}")
        if not (isinstance(threshold, numbers.Real) and 0.0 <= threshold < math.inf):
            raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
        for name, value in (
            ("patience", patience),
            ("cooldown", cooldown),
            ("warmup", warmup),
            ("reset_start", reset_start),
        ):
            _check_int(name, value, minimum=0)
        _check_int("window_size", window_size, minimum=1)

        self.optimizer = optimizer
        self.mode = mode
        self.factor = float(factor)
        self.patience = int(patience)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = int(cooldown)
        self.warmup = int(warmup)
        self.smooth = bool(smooth)
        self.window_size = int(window_size)
        self.reset_start = int(reset_start)
        self.sync_across_ranks = bool(sync_across_ranks)

        # Stored as Python floats so the state dict is plain data (loads with weights_only=True).
        # A scheduler built before (a warm-up) has scaled the lr and kept the configured one as
        # initial_lr: that is the base the bounds derive from.
        self.base_lrs: list[float] = [_lr(g, "initial_lr" if "initial_lr" in g else "lr")
                                      for g in optimizer.param_groups]
        self.min_lrs = self._bounds("min_lr", min_lr, [lr * 1e-3 for lr in self.base_lrs])
        self.max_lrs = self._bounds("max_lr", max_lr, [lr * 10.0 for lr in self.base_lrs])
        for i, (lo, lr, hi) in enumerate(zip(self.min_lrs, self.base_lrs, self.max_lrs)):
            if not lo <= lr <= hi:
                raise ValueError(
                    f"param group {i}: initial lr {lr} is outside [min_lr, max_lr] = [{lo}, {hi}]"
                )

        self.last_epoch = 0
        self._last_lr: list[float] = list(self.base_lrs)
        self._restart()

    # ------------------------------------------------------------------ public API

    def step(self, metrics: SupportsFloat | Tensor | None = None) -> None:  # type: ignore[override]
        """Feed one observation of the monitored metric and adapt the learning rates.

        Args:
            metrics: A float, int, numpy scalar or one-element tensor. NaN and ±inf are accepted
                and count as a non-improvement.
        """
        scalar = self._as_scalar(metrics)
        if len(self.optimizer.param_groups) != len(self.base_lrs):
            raise RuntimeError(
                f"the optimizer has {len(self.optimizer.param_groups)} param groups but GreedyLR "
                f"was built for {len(self.base_lrs)}; build a new scheduler after add_param_group"
            )
        value = self._synced(scalar)
        self.last_epoch += 1

        improved = False
        if math.isfinite(value):
            if self.smooth:
                self.window.append(value)
                del self.window[: -self.window_size]
                value = sum(self.window) / len(self.window)
            improved = self._is_better(value, self.best)
            if improved:
                self.best = value

        if self.frozen_steps > 0:
            self.frozen_steps -= 1
        elif improved:
            self.num_good += 1
            self.num_bad = 0
        else:
            self.num_bad += 1
            self.num_good = 0

        if self.num_good > self.patience:
            self._increase()
        elif self.num_bad > self.patience:
            self._decrease()

        self._last_lr = [_lr(g) for g in self.optimizer.param_groups]

    # ReduceLROnPlateau's public attributes that tools read (its in_cooldown reads
    # cooldown_counter), in GreedyLR's terms
    @property
    def cooldown_counter(self) -> int:
        """Steps the scheduler stays frozen (after a decrease: cooldown; an increase: warmup)."""
        return self.frozen_steps

    @property
    def num_bad_epochs(self) -> int:
        """Consecutive non-improvements so far."""
        return self.num_bad

    @property
    def eps(self) -> float:
        """ReduceLROnPlateau ignores lr changes smaller than eps; GreedyLR applies every one."""
        return 0.0

    @property
    def mode_worse(self) -> float:
        """The worst value of the metric: where ``best`` starts."""
        return math.inf if self.mode == "min" else -math.inf

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        """Return each param group's learning rate after the latest step, as floats."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Return every attribute except the optimizer: hyperparameters, initial lrs, bounds,
        ``best``, counters, frozen-window remainder, reset counter and smoothing window.

        Lists are copied, so the dict is a snapshot that later steps do not change.
        """
        return {k: _copy(v) for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Learning rates live in the optimizer's own state dict."""
        self.__dict__.update({k: _copy(v) for k, v in state_dict.items()})

    # ------------------------------------------------------------------ internals

    def _bounds(self, name: str, value: Any, default: list[float]) -> list[float]:
        n = len(self.base_lrs)
        if value is None:
            return default
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(
                    f"expected {n} values for {name} (one per param group), got {len(value)}"
                )
            bounds = [float(v) for v in value]
        else:
            bounds = [float(value)] * n
        for b in bounds:
            # max_lr may be inf (no upper bound); min_lr must be a finite floor.
            if math.isnan(b) or b < 0.0 or (name == "min_lr" and math.isinf(b)):
                raise ValueError(f"{name} values must be non-negative numbers, got {b}")
        return bounds

    def _restart(self) -> None:
        """Forget the metric history: the state of a freshly built scheduler."""
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_good = 0
        self.num_bad = 0
        self.frozen_steps = 0
        self.num_spent_decreases = 0
        self.window: list[float] = []

    def _is_better(self, x: float, best: float) -> bool:
        if math.isinf(best):  # nothing seen yet (and inf * (1 - threshold) may be NaN)
            return True
        t = self.threshold
        if self.mode == "min":
            return x < (best * (1.0 - t) if self.threshold_mode == "rel" else best - t)
        return x > (best * (1.0 + t) if self.threshold_mode == "rel" else best + t)

    def _increase(self) -> None:
        for group, hi in self._groups_to_set(self.max_lrs):
            lr = _lr(group)
            _set_lr(group, max(lr, min(lr / self.factor, hi)))  # never lowers an lr above max
        self.num_good = 0
        self.frozen_steps = self.warmup
        self.num_spent_decreases = 0

    def _decrease(self) -> None:
        lowered = False
        for group, lo in self._groups_to_set(self.min_lrs):
            old = _lr(group)
            _set_lr(group, min(old, max(old * self.factor, lo)))  # never raises one below min
            # Compare what was stored (a float32 tensor lr rounds), not what was computed.
            lowered |= _lr(group) < old
        self.num_bad = 0
        self.frozen_steps = self.cooldown
        # A decrease that could lower no group was spent with every group at its min_lr.
        self.num_spent_decreases = 0 if lowered else self.num_spent_decreases + 1
        if self.reset_start and self.num_spent_decreases >= self.reset_start:
            for group, lr in self._groups_to_set(self.base_lrs):
                _set_lr(group, lr)
            self._restart()

    def _groups_to_set(self, values: list[float]) -> list[tuple[dict, float]]:
        """(group, value) pairs, one per lr to set: groups that share one tensor lr (as a compiled
        or captured optimizer's groups may) have it set once, with the first group's value."""
        pairs, seen = [], set()
        for group, value in zip(self.optimizer.param_groups, values):
            lr = group["lr"]
            if isinstance(lr, Tensor):
                if id(lr) in seen:
                    continue
                seen.add(id(lr))
            pairs.append((group, value))
        return pairs

    @staticmethod
    def _as_scalar(metrics: Any) -> float | Tensor:
        if metrics is None:
            raise TypeError("GreedyLR.step() needs the monitored metric: call scheduler.step(loss)")
        if isinstance(metrics, Tensor):
            if metrics.numel() != 1:
                raise ValueError(
                    "GreedyLR.step() needs a scalar metric, "
                    f"got a tensor of shape {tuple(metrics.shape)}"
                )
            return metrics.detach()
        if isinstance(metrics, (str, bytes)) or not hasattr(metrics, "__float__"):
            raise TypeError(f"GreedyLR.step() needs a real number, got {type(metrics).__name__}")
        return float(metrics)

    def _synced(self, value: float | Tensor) -> float:
        """Average ``value`` over the ranks, so that every rank takes the same decision.

        A NaN or inf on any rank makes the sum non-finite (inf - inf = NaN), hence the step bad
        on every rank.
        """
        if not (self.sync_across_ranks and dist.is_available() and dist.is_initialized()):
            return float(value)
        # The parameters live where the process group's backend can communicate (e.g. CUDA for
        # NCCL), so the metric travels there.
        first = next((p for g in self.optimizer.param_groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(()).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / dist.get_world_size()


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _lr(group: dict[str, Any], key: str = "lr") -> float:
    """A group's lr as a float (a tensor lr may require grad: its value is read, detached)."""
    lr = group[key]
    return float(lr.detach() if isinstance(lr, Tensor) else lr)


def _set_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], Tensor):
        with torch.no_grad():  # in place, so a compiled step sees it; never part of a graph
            group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
