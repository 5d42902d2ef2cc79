"""GreedyLR as docs/greedy_lr.md describes it: the worked examples, every decision,
argument validation and the torch scheduler conventions."""

import io
import math

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

from adaptive_lr.greedy_lr import GreedyLR

# The setting of the worked examples: SGD lr 0.1, factor 0.9, patience 3, min_lr 1e-6, max_lr 1.0.
ACCEPT = dict(factor=0.9, patience=3, min_lr=1e-6, max_lr=1.0)


def _make(lrs=(0.1,), **kwargs):
    groups = [{"params": [torch.zeros(2, requires_grad=True)], "lr": lr} for lr in lrs]
    opt = torch.optim.SGD(groups, lr=lrs[0])
    return opt, GreedyLR(opt, **{**ACCEPT, **kwargs})


def _feed(sched, metrics):
    """Step once per metric; return the first group's lr after each step."""
    lrs = []
    for m in metrics:
        sched.step(m)
        lrs.append(sched.get_last_lr()[0])
    return lrs


# ------------------------------------------------------------------ worked examples


def test_decrease_after_more_than_patience_bad_steps():
    opt, sched = _make()
    lrs = _feed(sched, [5.0, 10.0, 10.0, 10.0, 10.0])
    assert lrs[:4] == [0.1] * 4  # three bad steps are within patience
    assert lrs[4] == pytest.approx(0.09)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09)
    assert (sched.num_good, sched.num_bad) == (0, 0)  # counters restart after a change


def test_increase_after_more_than_patience_improvements():
    opt, sched = _make()
    lrs = _feed(sched, [4.0, 3.0, 2.0, 1.0])  # the first one improves on best = +inf
    assert lrs[:3] == [0.1] * 3
    assert lrs[3] == pytest.approx(0.1 / 0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 0.9)
    assert (sched.num_good, sched.num_bad) == (0, 0)


def test_cooldown_freezes_the_steps_after_a_decrease():
    _, sched = _make(cooldown=3)
    assert _feed(sched, [5.0] + [10.0] * 4)[-1] == pytest.approx(0.09)
    frozen = _feed(sched, [10.0] * 3)
    assert frozen == [pytest.approx(0.09)] * 3
    assert (sched.num_bad, sched.frozen_steps) == (0, 0)
    # Frozen steps did not count: a second decrease needs patience + 1 fresh bad steps.
    after = _feed(sched, [10.0] * 4)
    assert after[:3] == [pytest.approx(0.09)] * 3
    assert after[3] == pytest.approx(0.081)


def test_warmup_freezes_the_steps_after_an_increase():
    _, sched = _make(warmup=3)
    assert _feed(sched, [4.0, 3.0, 2.0, 1.0])[-1] == pytest.approx(0.1 / 0.9)
    frozen = _feed(sched, [0.9, 0.8, 0.7])
    assert frozen == [pytest.approx(0.1 / 0.9)] * 3
    assert sched.num_good == 0
    after = _feed(sched, [0.6, 0.5, 0.4, 0.3])
    assert after[:3] == [pytest.approx(0.1 / 0.9)] * 3
    assert after[3] == pytest.approx(0.1 / 0.81)


def test_mode_max_mirrors_mode_min():
    _, sched = _make(mode="max")
    assert _feed(sched, [5.0, 1.0, 1.0, 1.0, 1.0])[-1] == pytest.approx(0.09)
    _, sched = _make(mode="max")
    assert _feed(sched, [1.0, 2.0, 3.0, 4.0])[-1] == pytest.approx(0.1 / 0.9)

    # On any sequence, mode="max" on x takes exactly the decisions of mode="min" on -x.
    x = np.random.default_rng(0).normal(size=300).cumsum()
    _, up = _make(mode="max", threshold=0.05, cooldown=1, warmup=2)
    _, down = _make(mode="min", threshold=0.05, cooldown=1, warmup=2)
    up_lrs, down_lrs = _feed(up, x.tolist()), _feed(down, (-x).tolist())
    assert up_lrs == down_lrs
    assert len(set(up_lrs)) > 3  # the sequence exercised both directions, not a constant lr


def test_rel_threshold_needs_a_relative_margin():
    _, sched = _make(threshold_mode="rel", threshold=0.1)
    sched.step(10.0)
    sched.step(9.5)  # 5 % better, but 10 % is required
    assert (sched.num_good, sched.num_bad, sched.best) == (0, 1, 10.0)
    sched.step(8.9)  # 11 % better
    assert (sched.num_good, sched.num_bad, sched.best) == (1, 0, 8.9)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_first_finite_metric_improves_even_with_a_large_rel_threshold(mode):
    # best starts at ±inf, and inf * (1 - 1.0) would be NaN.
    _, sched = _make(mode=mode, threshold_mode="rel", threshold=1.0)
    sched.step(5.0)
    assert (sched.best, sched.num_good) == (5.0, 1)


def test_abs_threshold_needs_an_absolute_margin():
    _, sched = _make(threshold=0.1)
    sched.step(10.0)
    sched.step(9.95)
    assert (sched.num_bad, sched.best) == (1, 10.0)
    sched.step(9.85)
    assert (sched.num_good, sched.best) == (1, 9.85)


def test_improvement_is_measured_against_the_best_not_the_previous_value():
    _, sched = _make()
    # Each value beats its predecessor, but none beats the best (1.0).
    _feed(sched, [1.0, 5.0, 4.0, 3.0, 2.0])
    assert sched.get_last_lr()[0] == pytest.approx(0.09)


def test_two_groups_scale_together():
    opt, sched = _make(lrs=(0.1, 0.01))
    _feed(sched, [5.0] + [10.0] * 4)
    assert sched.get_last_lr() == [pytest.approx(0.09), pytest.approx(0.009)]
    _feed(sched, [4.0, 3.0, 2.0, 1.0])
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.01)]


def test_no_lr_ever_leaves_its_bounds():
    opt, sched = _make(lrs=(0.1, 0.01))
    rng = np.random.default_rng(1)
    # Long improving stretch (drives lrs to max_lr), long flat stretch (to min_lr), then noise.
    metrics = np.concatenate([np.linspace(1e3, 0.0, 300), np.zeros(700), rng.normal(size=1000)])
    seen = []
    for m in metrics:
        sched.step(float(m))
        lrs = [g["lr"] for g in opt.param_groups]
        assert all(1e-6 <= lr <= 1.0 for lr in lrs)
        assert lrs == sched.get_last_lr()
        seen.append(lrs)
    assert max(lr for lrs in seen for lr in lrs) == 1.0  # the bounds were reached, not just
    assert min(lr for lrs in seen for lr in lrs) == 1e-6  # approached


def test_per_group_bounds():
    opt, sched = _make(lrs=(0.1, 0.01), min_lr=[0.05, 1e-6], max_lr=[0.2, 1.0], factor=0.5,
                       patience=0)
    sched.step(1.0)  # patience 0: one improvement already doubles; group 0 hits its max_lr
    assert sched.get_last_lr() == [0.2, pytest.approx(0.02)]
    _feed(sched, [2.0] * 3)  # three halvings; group 0 stops at its min_lr
    assert sched.get_last_lr() == [0.05, pytest.approx(0.0025)]
    _feed(sched, [0.5, 0.4, 0.3, 0.2, 0.1])  # five doublings; the groups' ratio has changed
    assert sched.get_last_lr() == [0.2, pytest.approx(0.08)]


def test_smoothing_window_holds_the_last_window_size_metrics():
    _, sched = _make(smooth=True, window_size=3)
    _feed(sched, [10.0, 8.0, 6.0, 4.0])
    assert sched.window == [8.0, 6.0, 4.0]
    assert sched.best == pytest.approx(6.0)  # the mean decides, not the raw 4.0


def test_smoothing_changes_the_decision():
    # Raw: 10, 2 improve and 6 does not. Window 2: means 10, 6, 4 all improve.
    _, raw = _make(patience=2)
    _, smoothed = _make(patience=2, smooth=True, window_size=2)
    assert _feed(raw, [10.0, 2.0, 6.0])[-1] == 0.1
    assert _feed(smoothed, [10.0, 2.0, 6.0])[-1] == pytest.approx(0.1 / 0.9)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, torch.tensor(math.nan)],
                         ids=["nan", "inf", "-inf", "nan-tensor"])
def test_non_finite_metric_is_a_bad_step_that_touches_neither_best_nor_window(mode, bad):
    _, sched = _make(mode=mode, smooth=True, window_size=5)
    _feed(sched, [5.0, 4.0] if mode == "min" else [4.0, 5.0])
    best, window = sched.best, list(sched.window)
    sched.step(bad)  # never raises
    assert (sched.num_good, sched.num_bad) == (0, 1)
    assert (sched.best, sched.window) == (best, window)
    _feed(sched, [bad] * 3)
    assert sched.get_last_lr()[0] == pytest.approx(0.09)  # four bad steps > patience
    assert (sched.best, sched.window) == (best, window)


# ------------------------------------------------------------------ state dict


def test_state_dict_round_trip_mid_run_gives_an_identical_future():
    kwargs = dict(lrs=(0.1, 0.03), cooldown=2, warmup=1, smooth=True, window_size=4,
                  reset_start=3, min_lr=[1e-2, 1e-3])
    opt, sched = _make(**kwargs)
    rng = np.random.default_rng(2)
    metrics = (np.linspace(10.0, 0.0, 200) + rng.normal(scale=0.5, size=200)).tolist()
    metrics[40:60] = [math.nan] * 20
    step = 0
    while not (sched.frozen_steps > 0 and step > 30):  # save inside a frozen window
        sched.step(metrics[step])
        step += 1
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    snapshot = sched.state_dict()
    for key in ("best", "num_good", "num_bad", "window", "base_lrs", "min_lrs", "max_lrs",
                "frozen_steps", "num_spent_decreases", "last_epoch"):
        assert key in snapshot
    assert "optimizer" not in snapshot and snapshot["window"]

    future = [sched.step(m) or sched.get_last_lr() for m in metrics[step:]]
    assert len({tuple(lrs) for lrs in future}) > 3

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain data only
    # Restore from disk, then twice from the in-memory snapshot: neither state_dict() nor
    # load_state_dict() may alias lists that later steps mutate.
    for state in (saved["sched"], snapshot, snapshot):
        opt2, sched2 = _make(lrs=(0.5, 0.5), factor=0.5, patience=7)  # other hyperparameters
        opt2.load_state_dict(saved["opt"])
        sched2.load_state_dict(state)
        assert sched2.last_epoch == step
        assert sched2.get_last_lr() == [g["lr"] for g in opt2.param_groups]
        assert [sched2.step(m) or sched2.get_last_lr() for m in metrics[step:]] == future


# ------------------------------------------------------------------ decisions (docs/greedy_lr.md)


def test_best_is_updated_during_a_frozen_window():
    _, sched = _make(cooldown=3)
    _feed(sched, [5.0] + [10.0] * 4)  # decrease to 0.09, then 3 frozen steps
    _feed(sched, [1.0, 10.0, 10.0])
    assert sched.best == 1.0
    assert (sched.num_good, sched.num_bad) == (0, 0)
    # 2.0 beats the 5.0 seen before the window but not the 1.0 found in it: bad, not good.
    lrs = _feed(sched, [2.0] * 4)
    assert lrs[-1] == pytest.approx(0.081)


def test_reset_after_reset_start_spent_decreases_at_min_lr():
    # patience 0: every step changes the lr; max_lr 0.1 caps the first step's increase.
    opt, sched = _make(min_lr=0.08, max_lr=0.1, reset_start=2, patience=0, smooth=True,
                       window_size=3)
    lrs = _feed(sched, [5.0, 6.0, 6.0, 6.0])
    assert lrs == [0.1, pytest.approx(0.09), pytest.approx(0.081), 0.08]  # reached min_lr
    assert sched.num_spent_decreases == 0  # the decrease that reached min_lr lowered the lr
    sched.step(6.0)
    assert (sched.get_last_lr()[0], sched.num_spent_decreases) == (0.08, 1)
    sched.step(6.0)  # second spent decrease: full reset
    assert opt.param_groups[0]["lr"] == 0.1
    assert (sched.best, sched.num_good, sched.num_bad, sched.window) == (math.inf, 0, 0, [])
    assert (sched.frozen_steps, sched.num_spent_decreases) == (0, 0)
    sched.step(100.0)  # anything finite improves on the forgotten best
    assert sched.best == 100.0


def test_an_increase_breaks_the_streak_of_spent_decreases():
    _, sched = _make(min_lr=0.085, max_lr=0.1, reset_start=2, patience=0)
    _feed(sched, [5.0, 6.0, 6.0, 6.0])  # capped increase, 0.09, 0.085, one spent decrease
    assert (sched.get_last_lr()[0], sched.num_spent_decreases) == (0.085, 1)
    sched.step(1.0)  # increase
    assert sched.num_spent_decreases == 0
    _feed(sched, [2.0, 2.0])  # lowered to min_lr, then spent once: no reset yet
    assert (sched.get_last_lr()[0], sched.num_spent_decreases) == (0.085, 1)


def test_reset_is_off_by_default():
    _, sched = _make(min_lr=0.08, patience=0)
    assert sched.reset_start == 0
    assert _feed(sched, [5.0] + [6.0] * 50)[-1] == 0.08


def test_default_bounds_are_relative_to_each_initial_lr():
    opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1},
                           {"params": [torch.zeros(1)], "lr": 0.01}])
    sched = GreedyLR(opt, factor=0.5, patience=0)
    assert sched.min_lrs == [pytest.approx(1e-4), pytest.approx(1e-5)]
    assert sched.max_lrs == [pytest.approx(1.0), pytest.approx(0.1)]
    _feed(sched, [5.0] + [6.0] * 20)
    assert sched.get_last_lr() == sched.min_lrs
    _feed(sched, [-float(i) for i in range(20)])
    assert sched.get_last_lr() == sched.max_lrs


def test_no_absolute_eps_dead_band():
    # The reference skips changes below 1e-8 and so freezes lrs below ~2e-7.
    _, sched = _make(lrs=(5e-8,), min_lr=1e-12)
    assert _feed(sched, [5.0] + [6.0] * 4)[-1] == pytest.approx(4.5e-8)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs,message", [
    (dict(factor=0.0), "factor"),
    (dict(factor=1.0), "factor"),
    (dict(factor=1.5), "factor"),
    (dict(factor=-0.5), "factor"),
    (dict(patience=-1), "patience"),
    (dict(patience=2.5), "patience"),
    (dict(cooldown=-1), "cooldown"),
    (dict(warmup=-1), "warmup"),
    (dict(reset_start=-1), "reset_start"),
    (dict(window_size=0), "window_size"),
    (dict(mode="avg"), "mode"),
    (dict(threshold_mode="percent"), "threshold_mode"),
    (dict(threshold=-1e-3), "threshold"),
    (dict(min_lr=[1e-6, 1e-6]), "expected 1 values for min_lr"),
    (dict(max_lr=[1.0, 1.0]), "expected 1 values for max_lr"),
    (dict(min_lr=-1e-6), "min_lr"),
    (dict(max_lr=math.nan), "max_lr"),
    (dict(min_lr=0.2), "outside"),
    (dict(max_lr=0.05), "outside"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _make(**kwargs)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="not an Optimizer"):
        GreedyLR([torch.zeros(1)])


@pytest.mark.parametrize("metric,error", [
    (None, TypeError), ("1.0", TypeError), ([1.0], TypeError), (torch.ones(3), ValueError),
])
def test_invalid_metric(metric, error):
    _, sched = _make()
    with pytest.raises(error, match="GreedyLR.step"):
        sched.step(metric)
    with pytest.raises(TypeError, match="monitored metric"):
        sched.step()
    assert sched.last_epoch == 0


def test_param_group_added_after_construction():
    opt, sched = _make()
    opt.add_param_group({"params": [torch.zeros(1)], "lr": 0.1})
    with pytest.raises(RuntimeError, match="param groups"):
        sched.step(1.0)


# ------------------------------------------------------------------ torch conventions


def test_tensor_lr_is_updated_in_place():
    opt, sched = _make(min_lr=0.08, reset_start=1, patience=0, lrs=(torch.tensor(0.1),))
    lr = opt.param_groups[0]["lr"]
    seen = []
    for m in [5.0, 6.0, 1.0] + [6.0] * 5:  # increases, decreases, a spent decrease: reset
        sched.step(m)
        assert opt.param_groups[0]["lr"] is lr
        seen.append(lr.item())
    assert seen == pytest.approx([0.1 / 0.9, 0.1, 0.1 / 0.9, 0.1, 0.09, 0.081, 0.08, 0.1])
    assert all(type(x) is float for x in sched.get_last_lr())
    opt.step()  # the optimizer still accepts its (same) tensor lr


@pytest.mark.parametrize("convert", [
    int, np.float32, np.float64, np.int64, lambda x: np.array(x),
    torch.tensor, lambda x: torch.tensor(x, dtype=torch.float32, requires_grad=True),
    lambda x: torch.tensor([x]),
], ids=["int", "np.float32", "np.float64", "np.int64", "np.0d", "tensor", "tensor-grad",
        "tensor-1elem"])
def test_metric_types(convert):
    _, sched = _make()
    lrs = _feed(sched, [convert(v) for v in (5, 10, 10, 10, 10)])
    assert lrs[-1] == pytest.approx(0.09)
    assert type(sched.best) is float and sched.best == 5.0


def test_is_an_lr_scheduler_and_construction_consumes_no_metric():
    opt, sched = _make(lrs=(0.1, 0.01))
    assert isinstance(sched, LRScheduler)
    assert sched.last_epoch == 0
    assert (sched.best, sched.num_good, sched.num_bad) == (math.inf, 0, 0)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    _feed(sched, [3.0, 2.0, 1.0])
    assert sched.last_epoch == 3  # counts calls
    assert sched.num_good == 3  # three improvements, none consumed by the constructor


def test_get_last_lr_returns_one_float_per_group_as_a_copy():
    opt, sched = _make(lrs=(0.1, 0.01, 0.001))
    last = sched.get_last_lr()
    assert last == [0.1, 0.01, 0.001] and all(type(x) is float for x in last)
    last[0] = 123.0
    assert sched.get_last_lr()[0] == 0.1
    _feed(sched, [5.0] + [10.0] * 4)
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_reduce_lr_on_plateaus_public_attributes_answer():
    """Tools written for ReduceLROnPlateau read these; GreedyLR inherited them unset
    (AttributeError): they now say what GreedyLR's own state means."""
    _, sched = _make(cooldown=3, patience=1)
    assert (sched.in_cooldown, sched.cooldown_counter, sched.num_bad_epochs) == (False, 0, 0)
    assert sched.eps == 0.0 and sched.mode_worse == math.inf
    _feed(sched, [1.0, 2.0, 2.0])  # two non-improvements > patience 1: a decrease, 3 frozen
    assert (sched.in_cooldown, sched.cooldown_counter, sched.num_bad_epochs) == (True, 3, 0)
    _feed(sched, [2.0])
    assert sched.cooldown_counter == 2
    assert _make(mode="max")[1].mode_worse == -math.inf
