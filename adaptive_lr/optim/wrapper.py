"""Active(optimizer): ActiveLR's per-element gains on top of any torch.optim.Optimizer
(docs/active_wrapper.md)."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from .. import backends
from ..backends import Boundary, apply_boundary, rescale
from ..gain_rule import GAIN_KEYS, GainRule, check_gain_args, sign_test_factor
from .base import DEFAULT_SIGN_THRESHOLD
from .checkpoint import upgrade_saved_group
from .clock import (
    BOOKKEEPING_KEYS, CLOCK_KEYS, SIGN_KEYS, EpochClock, bookkeeping, boundary_kind, check_grad,
    check_steps_per_epoch, new_clock, record_boundary, sign_state,
)
from .gain_stats import GainStats

# the wrapper's epoch sum of g**2, kept where the sign test has no moment to read (MEAN_SQUARES)
SQUARES = "grad_sq_sum"
SIGN_DTYPES = {"gain": torch.float32, "grad_sum": torch.float32, "prev_sign": torch.int8,
               SQUARES: torch.float32}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class Active(GainStats, EpochClock, torch.optim.Optimizer):
    """Wraps ``optimizer`` (any ``torch.optim.Optimizer``): its step runs, then every element's
    step is scaled by the element's gain, ``θ ← θ_before + γ·(θ_after − θ_before)``, where ``γ``
    follows ActiveLR's gain rule once per epoch, as in the native Active optimizers.

    While every gain is 1 (the first two epochs) it steps exactly as ``optimizer``, bit for bit.
    ``param_groups`` are the inner optimizer's (a scheduler changes its lr); the gain arguments
    and the epoch clock are added to them, so a group may override the gain arguments.

    Args:
        optimizer: the optimizer to wrap (its param groups get the keys ``gain_inc``,
            ``gain_dec``, ``min_gain``, ``max_gain``, ``sign_threshold``, ``relax_gains``,
            ``epoch``,
            ``steps_in_epoch``, ``boundary_pending`` and ``epoch_steps``).
        steps_per_epoch (int or None): optimizer steps per epoch; ``None``: call
            :meth:`end_epoch` at each epoch's end instead.
        gain_inc, gain_dec, min_gain, max_gain: the gain rule, as in the native Active
            optimizers (2.0, 0.5, 0 and inf).
        sign_threshold (float): the sign test (2.0): an element's epoch sum G of gradients
            counts as a sign only where G**2 > sign_threshold**2 * (the epoch's gradient noise),
            and a gain with no counted sign to compare is held, not decreased. The noise is read
            from the inner optimizer's second moment where it keeps one (Adam, AdamW, NAdam,
            RAdam, RMSprop, Adadelta, Adagrad), else it is the epoch's sum of g**2, kept by
            Active (4 more bytes per element). 0: the paper's rule (every nonzero sum counts, a
            zero product decreases the gain), with no extra state.
        relax_gains (bool): under the sign test, a gain above 1 with no counted sign to compare
            moves toward 1, to ``1 + (gain - 1) * gain_dec``, instead of being held (False).
        backend (str): "auto", "reference", "foreach", "cpu", "cuda" or "triton" (the last two
            run the scaling pass with foreach ops).
    """

    # GradScaler then always calls step() with grad_scale/found_inf: an overflow step is counted
    # on the epoch clock and still applies a pending boundary, as in the native optimizers
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int | None,
                 gain_inc: float = 2.0, gain_dec: float = 0.5, min_gain: float = 0.0,
                 max_gain: float = math.inf, sign_threshold: float = DEFAULT_SIGN_THRESHOLD,
                 relax_gains: bool = False,
                 backend: str = "auto"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Active wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, EpochClock):
            raise TypeError(
                f"{type(optimizer).__name__} already has gains; wrap its base optimizer")
        refused = _REFUSED.get(type(optimizer))
        if refused:
            raise TypeError(f"Active cannot wrap {type(optimizer).__name__}: {refused}")
        check_steps_per_epoch(steps_per_epoch)
        _check(
            backend == "auto" or backend in backends.NAMES,
            f"unknown backend {backend!r}; choose one of {('auto',) + backends.NAMES}",
        )
        rule = GainRule(gain_inc=gain_inc, gain_dec=gain_dec, min_gain=min_gain,
                        max_gain=max_gain, sign_threshold=sign_threshold,
                        relax_gains=relax_gains)
        rule.validate()
        gains = asdict(rule)
        for i, group in enumerate(optimizer.param_groups):
            taken = sorted(set(group) & set(GAIN_KEYS + CLOCK_KEYS))
            _check(not taken, f"Active: param group {i} of the optimizer already has {taken} "
                              "(is it wrapped by another Active?)")
            for p in group["params"]:
                _check_param(p)
                rescale.resolve(backend, p.device)  # an unavailable backend fails here
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.backend = backend
        # Optimizer.__init__ would copy the groups; __setstate__ sets up the hooks and the step
        # profiling without touching them. The inner optimizer's defaults are there too: torch's
        # schedulers read them (OneCycleLR's cycle_momentum looks for momentum or betas).
        super().__setstate__({"defaults": {**optimizer.defaults, **gains},
                              "state": defaultdict(dict)})
        for group in optimizer.param_groups:
            group.update(gains, **new_clock())
        self._warn_if_epoch_too_short(stacklevel=3)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.optimizer.param_groups = groups

    def __getstate__(self) -> dict:
        return {"optimizer": self.optimizer, "defaults": self.defaults, "state": self.state,
                "steps_per_epoch": self.steps_per_epoch, "backend": self.backend}

    def __setstate__(self, state: dict) -> None:  # unpickling, and deepcopy
        super().__setstate__(state)
        for group in [self.defaults, *self.param_groups]:  # pickled before a gain key existed
            upgrade_saved_group(group)

    def __repr__(self) -> str:
        return f"Active({self.optimizer!r}, steps_per_epoch={self.steps_per_epoch})"

    def add_param_group(self, param_group: dict) -> None:
        """Adds the group to the inner optimizer, with the gain arguments (its own, else
        Active's) and the running epoch clock; checked before anything changes."""
        group = dict(param_group)
        for key in GAIN_KEYS:
            group.setdefault(key, self.defaults[key])
        check_gain_args(group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor):
                _check_param(p)
                rescale.resolve(self.backend, p.device)
        self.optimizer.add_param_group(dict(group, params=params, **self._clock()))

    # ---- step ---------------------------------------------------------------------------

    def _params_with_grad(self) -> list[tuple[dict, list[Tensor]]]:
        """Every (group, params with a grad), validated before anything is written."""
        work = []
        for i, group in enumerate(self.param_groups):
            missing = [k for k in GAIN_KEYS + CLOCK_KEYS if k not in group]
            if missing:
                raise RuntimeError(
                    f"Active: param group {i} has no {missing}: add param groups with "
                    "Active.add_param_group, not with the inner optimizer's"
                )
            params = [p for p in group["params"] if p.grad is not None]
            if params:  # a scheduler or the user may have changed the group since construction
                check_gain_args(group)
            for p in params:
                check_grad("Active", p)
            work.append((group, params))
        return work

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """The inner optimizer's step scaled by the gains (a due epoch boundary first updates
        them). A closure is evaluated once, before the inner step, which gets none."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler
        found_inf = getattr(self, "found_inf", None)
        work = self._params_with_grad()
        if found_inf is not None and found_inf.item() != 0:
            # an overflow step: nothing moves, but a pending boundary is applied (it reads no
            # gradient of this step), and the step counts on the clock
            crossing = []
            for group, params in work:
                for p, boundary in zip(params, self._prepare_states(group, params)):
                    if boundary != Boundary.NONE:
                        self._apply_boundary(boundary, p, group)
                        crossing.append(self.state[p])
            self._advance_clock(crossing)
            return loss
        if grad_scale is not None:
            _unscale([p.grad for _, params in work for p in params], grad_scale)
        # the grads as handed to this step, whatever the inner optimizer does with p.grad
        befores = [[(p.detach().clone(), p.grad) for p in params] for _, params in work]
        with _global_step_hooks_off():  # they ran for this step already, with Active
            self.optimizer.step()
        crossing = []
        for (group, params), group_befores in zip(work, befores):
            buckets: dict[tuple, list[int]] = defaultdict(list)
            for i, boundary in enumerate(self._prepare_states(group, params)):
                buckets[(params[i].device, params[i].dtype, boundary)].append(i)
            for (device, _, boundary), indices in buckets.items():
                states = [self.state[params[i]] for i in indices]
                rescale.resolve(self.backend, device)(rescale.RescaleBucket(
                    params=[params[i].detach() for i in indices],
                    befores=[group_befores[i][0] for i in indices],
                    grads=[group_befores[i][1] for i in indices],
                    gains=[s["gain"] for s in states],
                    grad_sums=[s["grad_sum"] for s in states],
                    prev_signs=[s["prev_sign"] for s in states],
                    rule=GainRule.from_group(group),
                    maximize=bool(group.get("maximize", False)),
                    boundary=boundary,
                    **self._sign_test_fields(group, [params[i] for i in indices], boundary),
                ))
                if boundary != Boundary.NONE:
                    crossing += states
        self._advance_clock(crossing)
        return loss

    def _prepare_states(self, group: dict, params: list[Tensor]) -> list[Boundary]:
        """Create the sign state of params stepped for the first time, apply the boundaries
        they missed but the last, and return the kind of that last one for each param."""
        for p in params:
            fresh = p not in self.state
            if fresh:
                self.state[p] = sign_state(p, group["epoch"])
            self._fit_squares(p, group, fresh)
        return [self._catch_up(p, self.state[p], group) for p in params]

    # ---- the sign test's noise ----------------------------------------------------------

    def _keeps_squares(self, group: dict) -> bool:
        """Whether the group's sign test needs the wrapper's own epoch sum of g**2."""
        return group["sign_threshold"] > 0 and type(self.optimizer) not in MEAN_SQUARES

    def _fit_squares(self, p: Tensor, group: dict, fresh: bool = False) -> None:
        """Keep param p's epoch sum of g**2 exactly while its group needs one (a sign threshold
        switched on or off mid-run creates or drops it). It must cover the steps the epoch sum
        G covers: one created beside a G already under way (not ``fresh``) starts at +inf, so
        that G is not tested (its gain is held) and the next boundary resets it to 0."""
        state = self.state[p]
        if not self._keeps_squares(group):
            state.pop(SQUARES, None)
        elif SQUARES not in state:
            state[SQUARES] = torch.full_like(p, 0.0 if fresh else math.inf, dtype=torch.float32)

    def _noise(self, p: Tensor, group: dict) -> tuple[Tensor, float]:
        """Param p's noise estimate at a boundary, and the factor that makes it the floor G**2
        is compared with: the epoch sum of g**2 (factor k**2), else the inner optimizer's
        moment (float32) with the factor of its MEAN_SQUARES entry."""
        state = self.state[p]
        k = group["sign_threshold"]
        if SQUARES in state:
            return state[SQUARES], k * k
        source = MEAN_SQUARES[type(self.optimizer)]
        inner = self.optimizer.state.get(p, {})
        if source.key not in inner:  # never stepped by it (only overflow steps): no estimate
            return torch.full_like(state["grad_sum"], math.inf), 1.0
        factor = source.factor(GainRule.from_group(group), group["epoch_steps"], group,
                               float(inner["step"]))
        return inner[source.key].float(), factor

    def _sign_test_fields(self, group: dict, params: list[Tensor], boundary: Boundary) -> dict:
        """RescaleBucket's sign-test fields for these params of group (none: the test is off)."""
        fields = {}
        if self._keeps_squares(group):
            fields["grad_sq_sums"] = [self.state[p][SQUARES] for p in params]
        if boundary != Boundary.NONE and group["sign_threshold"] > 0:
            noises, factors = zip(*(self._noise(p, group) for p in params))
            fields["sign_test_factors"] = list(factors)
            if "grad_sq_sums" not in fields:
                fields["moments"] = list(noises)
        return fields

    def _apply_boundary(self, boundary: Boundary, p: Tensor, group: dict) -> None:
        """A boundary applied outside the scaling pass (an overflow step, a missed boundary), as
        the pass applies it."""
        state = self.state[p]
        rule = GainRule.from_group(group)
        floor = None
        if rule.sign_threshold > 0:
            noise, factor = self._noise(p, group)
            floor = rescale.floor(noise, factor, p.dtype)
        apply_boundary(boundary, *(state[k] for k in SIGN_KEYS), rule, floor)
        if SQUARES in state:
            state[SQUARES].zero_()

    def _apply_missed_boundary(self, p: Tensor, group: dict) -> None:
        self._fit_squares(p, group)
        self._apply_boundary(boundary_kind(self.state[p]), p, group)
        record_boundary(self.state[p])

    # ---- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"inner": the inner optimizer's state dict (its groups hold the clock and the gain
        arguments), "state": {param index: gain, grad_sum, prev_sign, epoch, has_prev_sign, and
        grad_sq_sum where kept}}``, params numbered across groups as in torch's state dicts."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state_dict = {"inner": self.optimizer.state_dict(),
                      "state": {index[id(p)]: dict(state) for p, state in self.state.items()}}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an Active state dict; everything Active adds is checked, and the inner optimizer
        checks its own part, before anything changes: one that does not fit raises and leaves
        the optimizer as it was."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        _check(
            isinstance(state_dict, dict) and set(state_dict) == {"inner", "state"}
            and isinstance(state_dict["inner"], dict) and isinstance(state_dict["state"], dict)
            and isinstance(state_dict["inner"].get("param_groups"), list),
            "Active.load_state_dict expects Active.state_dict()'s {'inner': ..., 'state': ...}",
        )
        # the groups completed (a copy: the caller's state dict is not changed)
        saved_groups = [dict(saved) if isinstance(saved, dict) else saved
                        for saved in state_dict["inner"]["param_groups"]]
        for saved in saved_groups:
            if isinstance(saved, dict):
                upgrade_saved_group(saved)
        state_dict = dict(state_dict, inner=dict(state_dict["inner"], param_groups=saved_groups))
        _check(
            len(saved_groups) == len(self.param_groups),
            f"Active: the state dict has {len(saved_groups)} param groups, "
            f"the optimizer {len(self.param_groups)}",
        )
        params, epochs = [], []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            _check(isinstance(saved, dict) and isinstance(saved.get("params"), list)
                   and len(saved["params"]) == len(group["params"]),
                   f"Active: param group {i} of the state dict does not match the optimizer's "
                   f"{len(group['params'])} params")
            missing = [k for k in GAIN_KEYS + CLOCK_KEYS if k not in saved]
            _check(not missing, f"Active: param group {i} of the state dict has no {missing} "
                                "(not a state dict of Active?)")
            check_gain_args(saved)
            epoch = saved["epoch"]
            _check(type(epoch) is int and epoch >= 0,
                   f"Active: param group {i} of the state dict has epoch {epoch!r}")
            params += group["params"]
            epochs += [epoch] * len(group["params"])
        new_state = defaultdict(dict)
        for index, saved in state_dict["state"].items():
            _check(isinstance(index, int) and 0 <= index < len(params),
                   f"Active: the state dict has state for unknown param {index!r}")
            new_state[params[index]] = _loaded_sign_state(params[index], saved, index,
                                                          epochs[index])
        self.optimizer.load_state_dict(state_dict["inner"])
        self.state = new_state
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


# Optimizers whose step Active cannot scale, and why (refused when wrapped, not at their step).
_REFUSED = {
    torch.optim.LBFGS: "its step re-evaluates the closure many times, moving the params between "
                       "evaluations; one scaled step per call is not defined for it",
    torch.optim.SparseAdam: "it needs sparse gradients, and Active's epoch sums are dense",
}


@dataclass(frozen=True)
class _MeanSquare:
    """Where an inner optimizer keeps a running mean square of its gradient per element, for the
    sign test: the state key, and ``factor(rule, epoch_steps, group, t)`` (t: the param's step
    count), with which moment * factor = k**2 * S_e * (the per-step mean square)."""

    key: str
    factor: Callable[[GainRule, int, dict, float], float]


def _ema(decay: Callable[[dict], float]) -> Callable[[GainRule, int, dict, float], float]:
    """An EMA of g**2 started at 0 with decay β: its mean square is v / (1 - β**t), the native
    Adam family's test (also where the inner optimizer itself does not correct the bias, as
    RMSprop and Adadelta: uncorrected, v is too small in the first ~1/(1-β) steps)."""
    return lambda rule, epoch_steps, group, t: sign_test_factor(rule, epoch_steps, decay(group), t)


def _running_total(rule: GainRule, epoch_steps: int, group: dict, t: float) -> float:
    """Adagrad's sum of g**2 over all t steps: its mean square is sum / t (its
    initial_accumulator_value, ignored, makes the test stricter while it is not small beside the
    sum). t = 0: never stepped, the sum G is 0."""
    return rule.sign_threshold**2 * epoch_steps / t if t else math.inf


_ADAM = _MeanSquare("exp_avg_sq", _ema(lambda group: group["betas"][1]))
# By exact type: a subclass may keep its state otherwise. Adamax's exp_inf is a decayed max of
# |g|, not a mean square; these and every other optimizer get the wrapper's epoch sum of g**2.
MEAN_SQUARES = {
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.NAdam: _ADAM,
    torch.optim.RAdam: _ADAM,
    torch.optim.RMSprop: _MeanSquare("square_avg", _ema(lambda group: group["alpha"])),
    torch.optim.Adadelta: _MeanSquare("square_avg", _ema(lambda group: group["rho"])),
    torch.optim.Adagrad: _MeanSquare("sum", _running_total),
}


def _check_param(p: Any) -> None:
    # (complex params: the scaling pass and the sign state are real; refused, not truncated)
    if isinstance(p, Tensor) and not p.is_floating_point():
        raise TypeError(f"Active can only scale real floating-point params, got {p.dtype}")


@contextlib.contextmanager
def _global_step_hooks_off():
    """torch's global optimizer step hooks suspended: they run once per step, for Active, not a
    second time for the inner optimizer (its own instance hooks still run)."""
    hooks = (torch_optimizer._global_optimizer_pre_hooks,
             torch_optimizer._global_optimizer_post_hooks)
    saved = [dict(h) for h in hooks]
    for h in hooks:
        h.clear()
    try:
        yield
    finally:
        for h, entries in zip(hooks, saved):
            h.update(entries)


def _loaded_sign_state(p: Tensor, saved: Any, index: int, group_epoch: int) -> dict:
    keys = SIGN_KEYS + BOOKKEEPING_KEYS
    _check(isinstance(saved, dict) and set(saved) - {SQUARES} == set(keys),
           f"Active: the state of param {index} must have exactly {list(keys)}, and "
           f"{SQUARES!r} where it was kept")
    epoch, has_prev_sign = (saved[k].item() if isinstance(saved[k], Tensor) else saved[k]
                            for k in BOOKKEEPING_KEYS)
    _check(type(epoch) is int and 0 <= epoch <= group_epoch and type(has_prev_sign) is bool,
           f"Active: the state of param {index} has epoch={epoch!r} and has_prev_sign="
           f"{has_prev_sign!r}; expected an int in [0, {group_epoch}] and a bool")
    loaded = bookkeeping(epoch, has_prev_sign)
    for key in SIGN_KEYS + ((SQUARES,) if SQUARES in saved else ()):
        value = saved[key]
        _check(isinstance(value, Tensor) and value.shape == p.shape,
               f"Active: state {key!r} of param {index} must be a tensor of its param's shape "
               f"{tuple(p.shape)}")
        loaded[key] = torch.empty_like(p, dtype=SIGN_DTYPES[key]).copy_(value)
    return loaded


def _unscale(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide the grads by GradScaler's scale in place, as GradScaler.unscale_ does (same op,
    same float64 reciprocal), so that the inner optimizer sees what it would see without Active."""
    inv_scale = grad_scale.double().reciprocal().float()
    by_device_dtype = defaultdict(list)
    for g in grads:
        by_device_dtype[(g.device, g.dtype)].append(g)
    for (device, _), group in by_device_dtype.items():
        found_inf = torch.zeros((), device=device)  # known to be 0: found_inf was checked
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale.to(device))
