"""What the Active optimizers share: the epoch clock (from clock.py), lazy state, bucketing by
(device, dtype, boundary) and validation before mutation; a dtype-preserving state load, and the
switch from a torch.optim optimizer, from checkpoint.py."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .. import backends
from ..backends import Boundary, Bucket, apply_boundary, state_dtype
from ..backends.rounding import catch_up_key, element_index
from ..gain_rule import grad_sq_sum_floor, sign_test_floor
from . import checkpoint
from .clock import (
    GRAD_SQ_SUM, SIGN_KEYS, EpochClock, RoundingSeeds, boundary_kind, check_grad,
    check_steps_per_epoch, record_boundary, sign_state,
)
from .gain_stats import GainStats
from .spec import OptimizerSpec, check

GAIN_ARGS_DOC = """
    steps_per_epoch (int or None): optimizer steps per epoch (usually ``len(train_loader)``;
        with gradient accumulation, count optimizer steps). ``None``: call :meth:`end_epoch`
        at each epoch's end instead.
    gain_inc (float): additive gain increase when an element's epoch-gradient sign persists (2.0).
    gain_dec (float): multiplicative gain decrease when it flips or is zero (0.5).
    min_gain, max_gain (float): clamp of every gain (0 and inf: off, as in the paper).
    relax_gains (bool): under the sign test, a gain above 1 with no significant sign to compare
        moves toward 1, to ``1 + (gain - 1) * gain_dec``, instead of being held (False).
    maximize (bool): maximize the objective instead of minimizing it.
    backend (str): "auto" (fastest available), "reference", "foreach", "cpu", "cuda" or "triton".
    state_precision (str): "compact" (default): bfloat16 gains and epoch sums (rounded
        stochastically, unbiased), 5 bytes per param beside the base optimizer's
        state; float64 params keep float32 ones. "full": float32 gains and epoch sums, 9 bytes
        per param (docs/algorithm.md, "Compact state"; docs/RESULTS.md §4). "bfloat16"
        (ActiveSGD and ActiveLion): compact, and the momentum in bfloat16 too, rounded
        stochastically at every step (2 bytes per param instead of 4; docs/precision.md).
"""

STATE_PRECISIONS = ("full", "compact", "bfloat16")

# The default sign tests (docs/algorithm.md, "The sign test"); 0 is the paper's rule. The Adam
# family's (on its second moment) was chosen by the study of docs/RESULTS.md §3; SGD's and Lion's
# (on the epoch's sum of g**2) by §5.
DEFAULT_SIGN_THRESHOLD = 2.0
DEFAULT_GRAD_SQ_SUM_SIGN_THRESHOLD = 2.0

SIGN_TEST_DOC = """    sign_threshold (float): the sign test: an element's epoch sum G counts as a sign only where
        |G| > sign_threshold * sqrt(steps_in_epoch * v_hat) (v_hat: the bias-corrected second
        moment), and a gain with no counted sign to compare is held, not decreased. 0: the
        paper's rule (every nonzero sum counts; a zero product decreases the gain).
"""

NOISE_TEST_DOC = """    sign_threshold (float): the sign test: an element's epoch sum G counts as a sign only where
        G**2 > sign_threshold**2 * Q (Q: the epoch's sum of g**2, kept as ``grad_sq_sum`` while
        the test is on: 4 more bytes per param, 2 with compact state), and a gain with no counted
        sign to compare is held, not decreased. 0: the paper's rule (every nonzero sum counts; a
        zero product decreases the gain), with no Q.
"""


def _check_lr(lr: Any, device: torch.device | None) -> None:
    """A tensor lr must be what every backend reads (without reading its value: no host sync)."""
    if not isinstance(lr, Tensor):
        if not isinstance(lr, numbers.Real) or isinstance(lr, bool):
            raise TypeError(f"lr must be a real number or a 1-element tensor, got {lr!r:.40}")
        return
    if lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")  # torch's words
    check(
        lr.dtype in (torch.float32, torch.float64),
        f"a tensor lr must be float32 or float64, got {lr.dtype}",
    )
    check(
        device is None or lr.device.type == "cpu" or lr.device == device,
        f"a tensor lr must be on the CPU or on its params' device {device}, got {lr.device}",
    )


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2): the step is elementwise and each state tensor is
    sharded like its param (created with ``*_like``), so the backends step plain local shards."""
    return t.to_local() if isinstance(t, DTensor) else t


def _placement(t: Tensor):
    return (t.device_mesh, t.placements) if isinstance(t, DTensor) else None


class ActiveOptimizer(GainStats, EpochClock, torch.optim.Optimizer):
    """Base class; a subclass sets ``spec``, its optimizer's one definition (optim/spec.py)."""

    spec: OptimizerSpec
    # GradScaler hands grad_scale/found_inf to step() instead of unscaling: every backend
    # honours them itself, so the epoch clock counts the same step() calls everywhere.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, steps_per_epoch: int | None, backend: str,
                 state_precision: str):
        check_steps_per_epoch(steps_per_epoch)
        check(
            backend == "auto" or backend in backends.NAMES,
            f"unknown backend {backend!r}; choose one of {('auto',) + backends.NAMES}",
        )
        check(
            state_precision in STATE_PRECISIONS,
            f"unknown state_precision {state_precision!r}; choose one of {STATE_PRECISIONS}",
        )
        check(
            state_precision != "bfloat16" or self.spec.offers_bfloat16_moments,
            f"state_precision='bfloat16' keeps the momentum in bfloat16, which "
            f"{type(self).__name__} does not offer: its state has a second moment, and only a "
            "momentum's effect in bfloat16 was measured (docs/precision.md); choose 'compact' "
            "or 'full'",
        )
        self.steps_per_epoch = steps_per_epoch
        self.backend = backend
        self.state_precision = state_precision
        super().__init__(params, defaults)
        self._warn_if_epoch_too_short(stacklevel=4)  # via the optimizer's own __init__

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles (and so deep-copies) only defaults, state and param_groups
        return {**super().__getstate__(), "steps_per_epoch": self.steps_per_epoch,
                "backend": self.backend, "state_precision": self.state_precision}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("state_precision", "full")  # pickled before compact state existed
        super().__setstate__(state)
        for group in [self.defaults, *self.param_groups]:  # pickled before a gain key existed
            checkpoint.upgrade_saved_group(group)

    def _compact(self, p: Tensor) -> bool:
        """Whether param p keeps compact state (never a float64 param: its math is float64)."""
        return self.state_precision != "full" and p.dtype != torch.float64

    def _moment_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype of param p's moments: bfloat16 under state_precision="bfloat16" (never for a
        float64 param), else the dtype its math runs in."""
        if self.state_precision == "bfloat16" and p.dtype != torch.float64:
            return torch.bfloat16
        return state_dtype(p.dtype)

    def _sign_state_dtype(self, p: Tensor) -> torch.dtype:
        return torch.bfloat16 if self._compact(p) else torch.float32

    # ---- construction -------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group`` (params may be any iterable, a generator
        too, of tensors or of ``(name, tensor)`` pairs), validated before anything changes."""
        name = type(self).__name__
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(
                f"{name}: params must be an ordered collection (a list), not a set: the order of "
                "a set changes between runs, and with it the order of the state dict"
            )
        # consumed once, here: torch's add_param_group receives the list, not a spent generator
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = params
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        for p in tensors:
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise TypeError(f"{name} can only optimize floating-point tensors, got {p!r:.80}")
        # torch only warns and steps such a param twice; the fused kernels would race on it
        check(
            len({id(p) for p in tensors}) == len(tensors),
            f"{name}: a param group lists the same tensor twice; list each param once",
        )
        devices = {p.device for p in tensors}
        check(len(devices) <= 1, f"{name}: all params of one group must be on one device, got {devices}")
        group = {k: v for k, v in param_group.items() if k != "params"}
        for key, default in self.defaults.items():
            group.setdefault(key, default)
        for device in devices:
            _check_lr(group["lr"], device)
            backends.resolve(self.backend, device)  # an unavailable backend fails here, not mid-run
        self.spec.record(group).validate()
        # a group added later joins the optimizer's one clock
        param_group.update(self._clock())
        super().add_param_group(param_group)

    # ---- state --------------------------------------------------------------------------

    def _init_state(self, p: Tensor, state: dict, group: dict, keys: tuple[str, ...],
                    seeds: RoundingSeeds) -> None:
        """Param p's lazy state (``state``: its entry in self.state)."""
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state.update(sign_state(p, group["epoch"], self._sign_state_dtype(p)))
            if self._compact(p):
                state["rounding_seed"] = seeds.of(p)
        for key in keys:  # amsgrad may be switched on for a group later
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self._moment_dtype(p))

    def _grad_sq_sum(self, p: Tensor, state: dict, kept: bool,
                     fresh: bool = False) -> Tensor | None:
        """Param p's Q (``state``: p's) where its group keeps one (``spec.keeps_grad_sq_sum``),
        else None. Q must cover the steps the epoch sum G covers: a param stepped for the first
        time (``fresh``) starts it at 0; one whose sign test is switched on mid-run starts it at
        +inf, so that the G under way counts as no sign (its gain is held) and the next boundary
        resets Q to 0 (as Active(...) does). Switched off, Q is dropped (one kept would be stale
        when the test comes back)."""
        if not kept:
            state.pop(GRAD_SQ_SUM, None)
            return None
        if GRAD_SQ_SUM not in state:
            state[GRAD_SQ_SUM] = torch.full_like(p, 0.0 if fresh else math.inf,
                                                 dtype=self._sign_state_dtype(p))
        return state[GRAD_SQ_SUM]

    # ---- step ---------------------------------------------------------------------------

    def _params_with_grad(self) -> list[tuple[dict, list[Tensor]]]:
        """Every (group, params with a grad), validated before anything is written."""
        name = type(self).__name__
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:  # a scheduler or the user may have changed the group since construction
                _check_lr(group["lr"], params[0].device)
                self.spec.record(group).validate()
            for p in params:
                check_grad(name, p)
                if isinstance(p, DTensor) and _placement(p.grad) != _placement(p):
                    raise RuntimeError(
                        f"{name}: the grad of a DTensor param must be sharded like it, "
                        f"param {_placement(p)}, grad {_placement(p.grad)}"
                    )
            work.append((group, params))
        return work

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step (the epoch boundary, if due, is fused into it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan, crossing = self._plan_step()
        for backend_step, bucket in plan:
            backend_step(bucket)
        self._advance_clock(crossing)
        return loss

    # torch.compile runs the host-side bookkeeping eagerly (one graph break before the buckets,
    # one after): traced, the clock's Python ints became SymInt graph inputs and outputs, which
    # recompiled on new clock patterns and made inductor emit code that fails (docs/integration.md).
    @torch.compiler.disable
    def _plan_step(self) -> tuple[list[tuple[Callable[[Bucket], None], Bucket]], list[dict]]:
        """Validate every grad, create lazy state, apply missed boundaries, and group the params
        into buckets, each with the backend step function that runs it. Also returns the states
        of the params whose buckets fuse an epoch boundary (for _advance_clock to record)."""
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler
        found_inf = getattr(self, "found_inf", None)
        plan, crossing = [], []
        seeds = RoundingSeeds(self.param_groups)
        for group, params in self._params_with_grad():  # all validated before any is touched
            hyper = self.spec.record(group)
            keys = self.spec.state_keys(hyper)
            keeps_grad_sq_sum = self.spec.keeps_grad_sq_sum(hyper)
            # (param, its state) by bucket: one lookup of each param's state per step
            buckets: dict[tuple, list[tuple[Tensor, dict]]] = defaultdict(list)
            for p in params:
                state = self.state[p]
                fresh = not state
                self._init_state(p, state, group, keys, seeds)
                self._grad_sq_sum(p, state, keeps_grad_sq_sum, fresh)
                buckets[(p.device, p.dtype, self._catch_up(p, state, group))].append((p, state))
            for (device, _, boundary), members in buckets.items():
                bucket = self._make_bucket(group, hyper, keys, members, boundary, grad_scale,
                                           found_inf)
                plan.append((backends.resolve(self.backend, device), bucket))
                if boundary != Boundary.NONE:
                    crossing += [state for _, state in members]
        return plan, crossing

    def _apply_missed_boundary(self, p: Tensor, group: dict) -> None:
        hyper = self.spec.record(group)
        rule = hyper.gain_rule()
        state = self.state[p]
        grad_sq_sum = self._grad_sq_sum(p, state, self.spec.keeps_grad_sq_sum(hyper))
        floor = None
        if grad_sq_sum is not None:
            grad_sq_sum = _local(grad_sq_sum)
            floor = grad_sq_sum_floor(grad_sq_sum, rule, state_dtype(p.dtype))
        elif rule.sign_threshold != 0:
            floor = sign_test_floor(_local(state[self.spec.second_moment]), state["step"].item(),
                                    rule, group["epoch_steps"], hyper.betas[1])
        rounding = None
        if "rounding_seed" in state:  # compact: drawn under a key of its own (no step's)
            rounding = (catch_up_key(int(state["rounding_seed"]), state["step"].item()),
                        element_index(_local(p)))
        apply_boundary(boundary_kind(state), *(_local(state[k]) for k in SIGN_KEYS), rule, floor,
                       rounding, grad_sq_sum)
        record_boundary(state)

    def _make_bucket(self, group, hyper, keys, members, boundary, grad_scale,
                     found_inf) -> Bucket:
        """``members``: the bucket's (param, state) pairs."""
        params = [p for p, _ in members]
        states = [s for _, s in members]
        device = params[0].device
        # a plain param's state is plain: only DTensor params need their local shards
        sharded = any(isinstance(p, DTensor) for p in params)

        def local(tensors) -> list[Tensor]:
            return [_local(t) for t in tensors] if sharded else list(tensors)

        return Bucket(
            spec=self.spec,
            params=local(params),
            grads=local(p.grad for p in params),
            gains=local(s["gain"] for s in states),
            grad_sums=local(s["grad_sum"] for s in states),
            prev_signs=local(s["prev_sign"] for s in states),
            steps=[s["step"] for s in states],
            state={k: local(s[k] for s in states) for k in keys},
            hyper=hyper,
            boundary=boundary,
            epoch_steps=group["epoch_steps"],
            # a bucket holds one dtype: all of its params keep compact state, or none
            rounding_seeds=([int(s["rounding_seed"]) for s in states] if self._compact(params[0])
                            else None),
            grad_sq_sums=(local(s[GRAD_SQ_SUM] for s in states)
                          if self.spec.keeps_grad_sq_sum(hyper) else None),
            grad_scale=None if grad_scale is None else grad_scale.to(device),
            found_inf=None if found_inf is None else found_inf.to(device),
        )

    # ---- checkpoints --------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of the same optimizer type, saved from any backend or device, or one
        of its base optimizer in ``torch.optim`` (see :meth:`from_optimizer`).

        Everything is checked before anything changes: a state dict that does not fit raises a
        ValueError and leaves the optimizer as it was. The optimizer keeps its own backend. State
        keeps its dtypes (torch's loader would cast fp32 gains and int8 signs to a bf16 param's
        dtype) and takes its param's device and memory layout. As in torch, the saved groups'
        values replace the optimizer's (keys a scheduler added, such as ``initial_lr``, too), the
        optimizer keeps its ``param_names`` where the state dict has none, and load hooks run."""
        checkpoint.load_state_dict(self, state_dict)

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int | None,
                       **kwargs) -> "ActiveOptimizer":
        """Switch a running job to ActiveLR: an Active optimizer over ``optimizer``'s param groups
        (names too) that continues from its state (moments, step counts) and hyperparameters.

        ``optimizer`` is this class's base in ``torch.optim`` (AdamW, SGD or RAdam); ``kwargs``
        are the gain arguments. Every gain starts at 1 and the epoch clock at the switch, so the
        next two epochs step exactly as the base optimizer would. Loading the base optimizer's
        state dict into an Active optimizer does the same."""
        return checkpoint.from_optimizer(cls, optimizer, steps_per_epoch, kwargs)

