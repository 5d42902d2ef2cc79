"""The sign window: EpochClock.set_steps_per_epoch, and how adaptive_lr.integrations picks and
checks a window (the callbacks themselves run under the real frameworks in
tests/test_integrations.py)."""

import copy

import pytest
import torch

from adaptive_lr import Active, ActiveAdamW, ActiveSGD


def _steps(opt, params, n):
    for _ in range(n):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("make", [
    lambda params, s: ActiveAdamW(params, steps_per_epoch=s),
    lambda params, s: Active(torch.optim.Adam(params), steps_per_epoch=s),
], ids=["native", "wrapper"])
def test_a_shorter_epoch_set_mid_epoch_ends_the_epoch_at_the_next_step(make):
    params = _params()
    opt = make(params, 10)
    _steps(opt, params, 6)
    opt.set_steps_per_epoch(4)
    assert opt.param_groups[0]["epoch"] == 0  # nothing changes until the next step
    _steps(opt, params, 1)
    assert (opt.param_groups[0]["epoch"], opt.param_groups[0]["epoch_steps"]) == (1, 7)
    _steps(opt, params, 4)
    assert (opt.param_groups[0]["epoch"], opt.param_groups[0]["epoch_steps"]) == (2, 4)


def test_manual_mode_switched_to_counted_and_back():
    params = _params()
    opt = ActiveSGD(params, lr=0.1, steps_per_epoch=None)
    opt.set_steps_per_epoch(2)
    _steps(opt, params, 2)
    assert opt.param_groups[0]["epoch"] == 1
    with pytest.raises(RuntimeError, match="counts epochs itself"):
        opt.end_epoch()
    opt.set_steps_per_epoch(None)
    _steps(opt, params, 3)
    opt.end_epoch()
    assert (opt.param_groups[0]["epoch"], opt.param_groups[0]["epoch_steps"]) == (2, 3)


@pytest.mark.parametrize("bad", [0, -1, 2.0, "8"])
def test_a_bad_steps_per_epoch_raises_and_changes_nothing(bad):
    opt = ActiveAdamW(_params(), steps_per_epoch=8)
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive int or None"):
        opt.set_steps_per_epoch(bad)
    assert opt.steps_per_epoch == 8


def test_the_window_is_configuration_not_state():
    """load_state_dict keeps the optimizer's window (a resumed run sets its own, as it passes its
    own steps_per_epoch to the constructor); a copy keeps it."""
    params = _params()
    opt = ActiveAdamW(params, steps_per_epoch=None)
    opt.set_steps_per_epoch(5)
    _steps(opt, params, 7)
    assert copy.deepcopy(opt).steps_per_epoch == 5
    resumed = ActiveAdamW(_params(), steps_per_epoch=3)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.steps_per_epoch == 3
    assert resumed.param_groups[0]["steps_in_epoch"] == 2  # the clock's position is state
