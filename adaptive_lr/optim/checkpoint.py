"""Checkpoint conversion for the Active optimizers (``ActiveOptimizer.load_state_dict`` and
``from_optimizer``): a state dict of the same optimizer, saved from any backend, device, state
precision or earlier version, or one of its base optimizer in ``torch.optim``, checked whole
before anything changes and converted into the loading optimizer's groups and state (its dtypes,
its params' devices and layouts, its state precision)."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from ..gain_rule import GAIN_KEYS
from .clock import (
    BOOKKEEPING_KEYS, CLOCK_KEYS, GRAD_SQ_SUM, SIGN_KEYS, RoundingSeeds, bookkeeping, new_clock,
    sign_state,
)
from .spec import GainHyper, check

ACTIVE_TENSOR_KEYS = ("step",) + SIGN_KEYS
# torch.optim's implementation switches, which mean nothing here
TORCH_ONLY_GROUP_KEYS = ("foreach", "fused", "capturable", "differentiable",
                         "decoupled_weight_decay")


def upgrade_saved_group(saved: dict) -> None:
    """A param group saved by an earlier version, completed in place: one without a sign test
    (any optimizer up to 0.1.0; ActiveSGD and ActiveLion until they had one) resumes with the
    rule it was saved with, the paper's (sign_threshold 0); versions up to 0.1.0 had no
    epoch_steps either (which only the sign test reads); a group saved before relax_gains held
    its gains (relax_gains False). Shared with ``Active(optimizer)``."""
    saved.setdefault("sign_threshold", 0.0)
    saved.setdefault("relax_gains", False)
    saved.setdefault("epoch_steps", 0)


def load_state_dict(opt, state_dict: dict) -> None:
    """``ActiveOptimizer.load_state_dict``: ``state_dict`` checked whole, converted into
    ``opt``'s groups and state, and loaded, its load hooks run."""
    name = type(opt).__name__
    check(
        isinstance(state_dict, dict),
        f"{name}.load_state_dict expects a dict, got {type(state_dict).__name__}",
    )
    state_dict = state_dict.copy()
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    saved_groups = state_dict.get("param_groups")
    saved_state = state_dict.get("state")
    check(
        isinstance(saved_groups, list) and isinstance(saved_state, dict)
        and all(isinstance(saved, dict) and "params" in saved for saved in saved_groups),
        f"{name}.load_state_dict expects a dict with 'state' and 'param_groups' (dicts with "
        "'params')",
    )
    check(
        len(saved_groups) == len(opt.param_groups),
        f"{name}: the state dict has {len(saved_groups)} param groups, "
        f"the optimizer {len(opt.param_groups)}",
    )
    saved_groups = copy.deepcopy(saved_groups)
    from_torch = _is_base_state_dict(saved_groups, saved_state)
    if from_torch:
        saved_groups = [_group_from_base(opt, i, group, saved)
                        for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups))]
    else:
        for saved in saved_groups:
            upgrade_saved_group(saved)
    seeds = RoundingSeeds(opt.param_groups)
    id_to_param = {}
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        _check_saved_group(opt, i, group, saved)
        for param_id, p in zip(saved["params"], group["params"]):
            id_to_param[param_id] = (p, saved)
    new_state = defaultdict(dict)
    rounded: dict[str, set[str]] = {}  # state loaded into bfloat16: its kind -> its saved dtypes
    for param_id, saved in saved_state.items():
        # a key of no param that is no param index (a hook's entry) is kept, as torch does;
        # keys are indices, or names under torch.distributed.checkpoint
        if param_id not in id_to_param and not isinstance(param_id, int):
            new_state[param_id] = saved
            continue
        check(param_id in id_to_param, f"{name}: the state dict has state for unknown param {param_id}")
        p, group = id_to_param[param_id]
        if from_torch:
            saved = _param_state_from_base(opt, p, saved, param_id, group)
        new_state[p] = _loaded_param_state(opt, p, saved, param_id, group, seeds)
        wider = {"gains and epoch sums": [saved.get("gain")] if opt._compact(p) else [],
                 "moments": ([saved.get(key) for key in opt.spec.state]
                             if opt._moment_dtype(p) == torch.bfloat16 else [])}
        for kind, values in wider.items():
            for value in values:
                if _wider_than_bfloat16(value):
                    rounded.setdefault(kind, set()).add(str(value.dtype).removeprefix("torch."))
    if rounded:
        what = " and ".join(f"{'/'.join(sorted(rounded[kind]))} {kind}" for kind in sorted(rounded))
        effects = {"gains and epoch sums": "no epoch sum changes sign, a gain may move by 0.2 %",
                   "moments": "a moment may move by 0.2 %"}
        warnings.warn(
            f"{name}: the state dict keeps {what}; this optimizer "
            f"(state_precision={opt.state_precision!r}) keeps them in bfloat16, so each value "
            "was rounded to the nearest bfloat16 (relative error at most 2**-9: "
            f"{'; '.join(effects[kind] for kind in sorted(rounded))}); everything else is "
            "loaded exactly",
            stacklevel=3,
        )
    opt.state = new_state
    opt.param_groups = [
        dict(saved, params=group["params"])
        | ({"param_names": group["param_names"]}
           if "param_names" in group and "param_names" not in saved else {})
        for group, saved in zip(opt.param_groups, saved_groups)
    ]
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def _wider_than_bfloat16(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.bfloat16


def from_optimizer(cls, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None,
                   kwargs: dict):
    """``cls.from_optimizer(optimizer, steps_per_epoch=..., **kwargs)``: an Active optimizer of
    class ``cls`` over ``optimizer``'s param groups (names too), its defaults where ``cls`` has
    them, then ``kwargs``, that loads ``optimizer``'s state dict."""
    groups = [
        {"params": list(zip(g["param_names"], g["params"])) if "param_names" in g
         else list(g["params"])}
        for g in optimizer.param_groups
    ]
    # its defaults where this class has them (lr, betas, amsgrad, ...), then the caller's
    hyperparameters = {f.name for f in dataclasses.fields(cls.spec.hyper)}
    defaults = {k: v for k, v in optimizer.defaults.items()
                if k in hyperparameters and k not in TORCH_ONLY_GROUP_KEYS}
    active = cls(groups, steps_per_epoch=steps_per_epoch, **(defaults | kwargs))
    active.load_state_dict(optimizer.state_dict())
    return active


def _group_from_base(opt, i: int, group: dict, saved: dict) -> dict:
    """A torch.optim base optimizer's saved group as this optimizer's: its hyperparameters,
    this optimizer's gain arguments, and a clock that starts now."""
    name = type(opt).__name__
    base = opt.spec.base
    check(
        base is not None and all(k in saved for k in base.required_keys)
        and not any(k in saved for k in base.foreign_keys),
        f"{name}: param group {i} of the state dict is neither an {name} nor a "
        f"{base.name if base else 'torch.optim'} one (a state dict of another optimizer?)",
    )
    converted = {k: v for k, v in saved.items()
                 if k not in TORCH_ONLY_GROUP_KEYS or k in opt.defaults}
    for key in GAIN_KEYS:
        converted[key] = group[key]
    for key, default in opt.defaults.items():
        converted.setdefault(key, default)
    converted.update(new_clock())
    weight_decay = saved.get("weight_decay", 0)
    decoupled = saved.get("decoupled_weight_decay", base.decoupled_by_default)
    if weight_decay and decoupled != opt.spec.decoupled_weight_decay(
            opt.spec.record(converted)):
        was, now = ("decoupled", "an L2 term of the gradient") if decoupled else (
            "an L2 term of the gradient", "decoupled (param *= 1 - lr * weight_decay)")
        warnings.warn(
            f"{name}: the state dict's weight_decay={weight_decay} was {was}; in {name} it "
            f"is {now}",
            stacklevel=5,
        )
    return converted


def _param_state_from_base(opt, p: Tensor, saved: dict, param_id, group: dict) -> dict:
    """A torch.optim base optimizer's per-param state with gains at 1 and no epoch history."""
    check(isinstance(saved, dict), f"{type(opt).__name__}: the state of param {param_id} is not a dict")
    state = {k: v for k, v in saved.items() if v is not None}
    if "step" not in state:  # torch's SGD keeps none: a saved buffer has seen a step
        state["step"] = float(any(k in state for k in opt.spec.state))
    for key in opt.spec.state_keys(opt.spec.record(group)):  # SGD without momentum: none
        state.setdefault(key, torch.zeros_like(p))
    return dict(state, **sign_state(p, 0, opt._sign_state_dtype(p)))


def _check_saved_group(opt, i: int, group: dict, saved: dict) -> None:
    name = type(opt).__name__
    missing = sorted((set(opt.defaults) | set(CLOCK_KEYS)) - set(saved))
    foreign = sorted(set(saved) & (_all_hyperparameters() - set(opt.defaults)))
    check(
        not missing and not foreign,
        f"{name}: param group {i} of the state dict is missing {missing} and has the "
        f"hyperparameters {foreign} of other optimizers (a state dict of another optimizer?)",
    )
    check(
        len(saved["params"]) == len(group["params"]),
        f"{name}: param group {i} has {len(group['params'])} params, "
        f"the state dict {len(saved['params'])}",
    )
    # amsgrad decides which state exists: resuming must not switch it silently
    check(
        saved.get("amsgrad") == group.get("amsgrad"),
        f"{name}: param group {i} of the state dict has amsgrad={saved.get('amsgrad')}, the "
        f"optimizer amsgrad={group.get('amsgrad')}; construct it with "
        f"amsgrad={saved.get('amsgrad')} to resume this state",
    )
    epoch = saved["epoch"]
    check(
        type(epoch) is int and epoch >= 0,
        f"{name}: param group {i} of the state dict has epoch {epoch!r}, expected an int >= 0",
    )


def _loaded_param_state(opt, p: Tensor, saved: dict, param_id, group: dict,
                        seeds: RoundingSeeds) -> dict:
    """One param's saved state, checked, in this optimizer's dtypes, layout and precision:
    float32 gains and epoch sums round to nearest for compact state (bfloat16 ones widen
    exactly for full state); a compact state's rounding seed is kept, or the param's own
    is given where the saved state has none."""
    name = type(opt).__name__
    check(isinstance(saved, dict), f"{name}: the state of param {param_id} is not a dict")
    base_keys = set(opt.spec.state)
    required = (set(ACTIVE_TENSOR_KEYS) | set(BOOKKEEPING_KEYS)
                | (base_keys - {opt.spec.amsgrad_state}))
    # Q, where the sign test reads one: a step creates or drops it as the group's test says
    optional = base_keys | {"rounding_seed"} | (
        {GRAD_SQ_SUM} if opt.spec.second_moment is None else set())
    missing = required - set(saved)
    unexpected = set(saved) - required - optional
    check(
        not missing and not unexpected,
        f"{name}: state of param {param_id} is missing {sorted(missing)} / has unexpected "
        f"{sorted(unexpected)} (a state dict of another optimizer?)",
    )
    # versions up to 0.1.0 saved the bookkeeping as a Python int and bool
    epoch, has_prev_sign = (_python_scalar(saved[key]) for key in BOOKKEEPING_KEYS)
    check(
        type(epoch) is int and 0 <= epoch <= group["epoch"] and type(has_prev_sign) is bool,
        f"{name}: state of param {param_id} has epoch={epoch!r} and has_prev_sign="
        f"{has_prev_sign!r}; expected an int in [0, {group['epoch']}] and a bool",
    )
    seed = _python_scalar(saved.get("rounding_seed", 0))
    check(
        type(seed) is int and 0 <= seed < 2**32,
        f"{name}: state of param {param_id} has rounding_seed={seed!r}; expected an int in "
        "[0, 2**32)",
    )
    loaded = bookkeeping(epoch, has_prev_sign)
    if opt._compact(p):
        loaded["rounding_seed"] = (torch.tensor(seed) if "rounding_seed" in saved
                                   else seeds.of(p))
    sign_dtype = opt._sign_state_dtype(p)
    dtypes = {"gain": sign_dtype, "grad_sum": sign_dtype, GRAD_SQ_SUM: sign_dtype,
              "prev_sign": torch.int8}
    for key, value in saved.items():
        if key in BOOKKEEPING_KEYS or key == "rounding_seed":
            continue
        if key == "step" and isinstance(value, numbers.Real):  # saved by an older torch
            value = torch.tensor(float(value))
        check(isinstance(value, Tensor), f"{name}: state {key!r} of param {param_id} is not a tensor")
        check(
            key == "prev_sign" or value.is_floating_point(),
            f"{name}: state {key!r} of param {param_id} has dtype {value.dtype}, expected a "
            "floating-point tensor",
        )
        shape_ok = value.numel() == 1 if key == "step" else value.shape == p.shape
        check(
            shape_ok,
            f"{name}: state {key!r} of param {param_id} has shape {tuple(value.shape)}, "
            f"its param {tuple(p.shape)}",
        )
        if key == "step":
            loaded[key] = value.reshape(()).to(device=p.device, dtype=torch.float32, copy=True)
        else:  # the param's layout: the fused kernels read a param and its state as one array
            dtype = dtypes.get(key, opt._moment_dtype(p))
            loaded[key] = torch.empty_like(p, dtype=dtype).copy_(value)
    return loaded


def _all_hyperparameters() -> set[str]:
    """Every Active optimizer's hyperparameter names (the fields of every record)."""
    records, names = [GainHyper], set()
    while records:
        record = records.pop()
        records += record.__subclasses__()
        names |= {f.name for f in dataclasses.fields(record)}
    return names


def _python_scalar(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


def _is_base_state_dict(saved_groups: list[dict], saved_state: dict) -> bool:
    """Whether a state dict is a torch.optim optimizer's: no epoch clock, no gains."""
    return not any(k in saved for saved in saved_groups for k in CLOCK_KEYS) and not any(
        isinstance(state, dict) and "gain" in state for state in saved_state.values())
