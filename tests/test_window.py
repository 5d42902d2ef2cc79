"""The sign window: EpochClock.set_steps_per_epoch, and how adaptive_lr.integrations picks and
checks a window (the callbacks themselves run under the real frameworks in
tests/test_integrations.py)."""

import copy
import subprocess
import sys
import warnings

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


# ---- adaptive_lr.integrations: picking and checking a window --------------------------------

def _set(optimizers, window=None, windows_per_epoch=None, epoch_steps=100, total_steps=None):
    from adaptive_lr.integrations import set_window

    return set_window(optimizers, window=window, windows_per_epoch=windows_per_epoch,
                      epoch_steps=epoch_steps, total_steps=total_steps)


@pytest.mark.parametrize("window, windows_per_epoch, expected", [
    (None, None, 100),  # the default: one window per data epoch
    (None, 3, 33),
    (7, None, 7),
])
def test_the_window_from_the_data_epoch_or_given(window, windows_per_epoch, expected):
    from adaptive_lr.integrations import DEFAULT_WINDOWS_PER_EPOCH

    assert DEFAULT_WINDOWS_PER_EPOCH == 1
    opts = [ActiveAdamW(_params(), steps_per_epoch=None),
            ActiveSGD(_params(), lr=0.1, steps_per_epoch=2)]
    assert _set(opts, window, windows_per_epoch) == expected
    assert [opt.steps_per_epoch for opt in opts] == [expected, expected]


def test_a_wrapped_optimizer_is_found_and_others_are_left_alone():
    class Wrapper:  # as accelerate's AcceleratedOptimizer keeps the optimizer it wraps
        def __init__(self, optimizer):
            self.optimizer = optimizer

    active = Active(torch.optim.Adam(_params()), steps_per_epoch=None)
    plain = torch.optim.SGD(_params(), lr=0.1)
    _set([Wrapper(active), plain], window=6)
    assert active.steps_per_epoch == 6
    with pytest.raises(ValueError, match="no Active optimizer.*SGD"):
        _set([plain], window=6)


@pytest.mark.parametrize("sign_threshold, shortest", [(2.0, 5), (3.0, 10), (1.5, 3), (0.0, 1)])
def test_a_window_the_sign_test_cannot_pass_raises(sign_threshold, shortest):
    opt = ActiveAdamW(_params(), steps_per_epoch=None, sign_threshold=sign_threshold)
    assert _set([opt], window=shortest) == shortest
    if shortest > 1:
        with pytest.raises(ValueError,
                           match=f"too short for the sign test.*at least {shortest} steps"):
            _set([opt], window=shortest - 1)
        assert opt.steps_per_epoch == shortest  # unchanged


def test_the_strictest_group_decides():
    params = _params()
    opt = ActiveAdamW([{"params": params[:1]}, {"params": _params(), "sign_threshold": 3.0}],
                      steps_per_epoch=None)
    with pytest.raises(ValueError, match="sign_threshold=3"):
        _set([opt], window=9)


def test_a_run_too_short_for_the_gains_to_change_warns():
    opt = ActiveAdamW(_params(), steps_per_epoch=None)
    with pytest.warns(UserWarning, match=r"third window \(step 21\).*20 optimizer steps"):
        _set([opt], window=10, total_steps=20)
    assert opt.steps_per_epoch == 10  # set all the same: the user may mean it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _set([opt], window=10, total_steps=21)
        _set([opt], window=10, total_steps=float("inf"))


def test_an_unknown_epoch_or_too_many_windows_raises():
    opt = ActiveAdamW(_params(), steps_per_epoch=None)
    with pytest.raises(ValueError, match="pass window="):
        _set([opt], epoch_steps=None)
    assert _set([opt], window=8, epoch_steps=None) == 8  # a stream with a given window
    with pytest.raises(ValueError, match="more windows than the 4 optimizer steps"):
        _set([opt], windows_per_epoch=5, epoch_steps=4)


@pytest.mark.parametrize("args", [dict(window=0), dict(window=-3), dict(window=2.5),
                                  dict(window=True), dict(windows_per_epoch=0),
                                  dict(windows_per_epoch="2"), dict(window=8, windows_per_epoch=2)])
def test_bad_callback_arguments_raise(args):
    from adaptive_lr.integrations import check_window_args

    with pytest.raises(ValueError, match="positive int|not both"):
        check_window_args(args.get("window"), args.get("windows_per_epoch"))


def test_adaptive_lr_imports_neither_framework():
    """Only adaptive_lr.integrations.hf and .lightning import theirs: adaptive_lr never needs them."""
    code = ("import sys, adaptive_lr, adaptive_lr.integrations; "
            "print(sorted({'transformers', 'lightning'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("make", [
    lambda params, spe, **kw: ActiveSGD(params, lr=0.1, steps_per_epoch=spe, **kw),
    lambda params, spe, **kw: ActiveAdamW(params, steps_per_epoch=spe, **kw),
    lambda params, spe, **kw: Active(torch.optim.SGD(params, lr=0.1), steps_per_epoch=spe, **kw),
])
def test_an_epoch_too_short_for_the_sign_test_is_said_where_it_is_set(make):
    # k=2: an epoch sum passes only with more than k² = 4 steps, even for a constant gradient
    with pytest.warns(UserWarning, match=r"steps_per_epoch=4 is too short .* at least 5 steps"):
        opt = make(_params(), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(_params(), 5)
        make(_params(), 1, sign_threshold=0.0)  # the paper's rule counts every sign
        make(_params(), None)  # manual mode: the epochs are the caller's
        opt.set_steps_per_epoch(None)
    with pytest.warns(UserWarning, match="steps_per_epoch=3 is too short"):
        opt.set_steps_per_epoch(3)
