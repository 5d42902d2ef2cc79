"""docs/algorithm.md: closed-form gain dynamics, the epoch clock (both modes, catch-up, clamps)."""

import pytest
import torch

from adaptive_lr import ActiveAdamW, ActiveLion, ActiveSGD
from optim_configs import CONFIGS, grad_sequence, make_params

BACKENDS = ["reference", "foreach"]
S = 3  # steps per epoch
PAPER_RULE = {"sign_threshold": 0.0}


def _run_signs(signs_per_epoch, backend, **kwargs):
    """One param of 4 elements; every step of epoch e gets gradient signs_per_epoch[e]. The
    paper's rule unless ``kwargs`` set a sign_threshold."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = ActiveSGD([p], lr=1e-3, steps_per_epoch=S, momentum=0.0, backend=backend,
                    **(PAPER_RULE | kwargs))
    for signs in signs_per_epoch:
        for _ in range(S):
            p.grad = torch.tensor(signs, dtype=torch.float64)
            opt.step()
    p.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()  # the first step of the next epoch applies the last boundary
    return opt.state[p]["gain"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epochs", [1, 2, 5])
def test_persistent_signs_grow_additively(backend, epochs):
    gain = _run_signs([[1.0, -2.0, 0.5, -0.1]] * epochs, backend, gain_inc=1.5)
    # the first boundary only rolls over: epochs - 1 comparisons
    torch.testing.assert_close(gain, torch.full((4,), 1 + (epochs - 1) * 1.5, dtype=torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epochs", [2, 4, 7])
def test_alternating_signs_shrink_geometrically(backend, epochs):
    signs = [[1.0, -1.0, 2.0, -3.0] if e % 2 == 0 else [-1.0, 1.0, -2.0, 3.0] for e in range(epochs)]
    gain = _run_signs(signs, backend, gain_dec=0.6)
    torch.testing.assert_close(gain, torch.full((4,), 0.6 ** (epochs - 1), dtype=torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradients_shrink(backend):
    gain = _run_signs([[1.0, 0.0, -1.0, 0.0]] + [[0.0, 0.0, -1.0, 0.0]] * 3, backend)
    # element 0: +, then zeros -> 0.5 each; element 2 persists -> 1 + 3u; zeros always shrink
    expected = torch.tensor([0.5**3, 0.5**3, 1 + 3 * 2.0, 0.5**3], dtype=torch.float32)
    torch.testing.assert_close(gain, expected)


def _run_grads(cls, grads_per_epoch, backend, sign_threshold, **kwargs):
    """``cls`` on one param of 4 elements; epoch e's steps get grads_per_epoch[e][step]. With a
    constant gradient g the epoch sum is S g and the noise estimate S g**2 (ActiveAdamW: S v_hat,
    v_hat = g**2; ActiveSGD and ActiveLion: Q, the sum of g**2): the sign test passes exactly
    when S > sign_threshold^2."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = cls([p], lr=1e-6, steps_per_epoch=S, weight_decay=0.0, sign_threshold=sign_threshold,
              backend=backend, **kwargs)
    for epoch in grads_per_epoch:
        for grad in epoch:
            p.grad = torch.tensor(grad, dtype=torch.float64)
            opt.step()
    p.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()
    return opt.state[p]["gain"], opt.state[p]["prev_sign"]


SIGN_TESTED = [ActiveAdamW, ActiveSGD, ActiveLion]


@pytest.mark.parametrize("cls", SIGN_TESTED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_test_counts_consistent_sums_as_the_paper_does(backend, cls):
    persistent = [[[1.0, -2.0, 0.5, -0.1]] * S] * 4
    gain, _ = _run_grads(cls, persistent, backend, sign_threshold=1.5)  # S = 3 > 1.5^2
    torch.testing.assert_close(gain, torch.full((4,), 1 + 3 * 2.0))
    alternating = [[[1.0, -1.0, 2.0, -3.0]] * S if e % 2 == 0 else [[-1.0, 1.0, -2.0, 3.0]] * S
                   for e in range(4)]
    gain, _ = _run_grads(cls, alternating, backend, sign_threshold=1.5)
    torch.testing.assert_close(gain, torch.full((4,), 0.5**3))


@pytest.mark.parametrize("cls", SIGN_TESTED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_test_holds_gains_without_evidence(backend, cls):
    # constant gradients, but an epoch too short for the threshold (S = 3 < 2^2): no sign counts
    gain, prev_sign = _run_grads(cls, [[[1.0, -2.0, 0.5, -0.1]] * S] * 4, backend, 2.0)
    torch.testing.assert_close(gain, torch.ones(4))
    assert (prev_sign == 0).all()
    # noise around a small mean (+1, -1, +1 each epoch: sum 1, noise estimate about 3): the
    # paper's rule grows every gain, the sign test holds them; zero gradients (a dead unit) are
    # held too, where the paper halves them each epoch
    noise = [[[1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]] * 4
    paper, _ = _run_grads(cls, noise, backend, 0.0)
    torch.testing.assert_close(paper, torch.tensor([7.0, 7.0, 0.125, 0.125]))
    tested, _ = _run_grads(cls, noise, backend, 1.0)
    torch.testing.assert_close(tested, torch.ones(4))


@pytest.mark.parametrize("cls", SIGN_TESTED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_relax_gains_moves_held_gains_above_1_toward_1(backend, cls):
    """relax_gains: with no evidence a gain above 1 becomes 1 + (gain - 1) * gain_dec per epoch
    (the closed form 1 + (gain - 1) * d**n after n such epochs); a gain below 1 is held, and
    persistent or flipping signs move a gain as without it. Elements: persistent for 4 epochs
    then zero for 3; persistent for all 7; alternating for 4 then zero; zero throughout."""
    grads = [[[1.0, -2.0, 2.0 if e % 2 == 0 else -2.0, 0.0]] * S if e < 4 else
             [[0.0, -2.0, 0.0, 0.0]] * S for e in range(7)]
    relaxed, _ = _run_grads(cls, grads, backend, 1.5, relax_gains=True)
    torch.testing.assert_close(relaxed, torch.tensor([1 + 6 * 0.5**3, 1 + 6 * 2.0, 0.5**3, 1.0]))
    held, _ = _run_grads(cls, grads, backend, 1.5)
    torch.testing.assert_close(held, torch.tensor([7.0, 13.0, 0.5**3, 1.0]))


@pytest.mark.parametrize("cls", [ActiveSGD, ActiveLion], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_estimate_is_the_epochs_sum_of_squares(backend, cls):
    """Q is the sum of g**2 over the epoch that ended, reset at each boundary with G (the
    boundary reads the previous epoch's, then this step's g**2 starts the next): after a
    boundary step Q = g**2 of that step. With k = 1.5, G = 5 (4 + 3 - 2) has no sign against
    Q = 29 (25 <= 2.25 * 29); G = 3 from three 1s has one (9 > 2.25 * 3)."""
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = cls([p], lr=1e-6, steps_per_epoch=3, sign_threshold=1.5, backend=backend,
              state_precision="full")
    for grad in ([4.0, 1.0], [3.0, 1.0], [-2.0, 1.0]):
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
    state = opt.state[p]
    assert state["grad_sq_sum"].dtype == torch.float32
    assert state["grad_sq_sum"].tolist() == [29.0, 3.0] and state["grad_sum"].tolist() == [5.0, 3.0]
    p.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    opt.step()  # the boundary
    assert state["prev_sign"].tolist() == [0, 1]
    assert state["grad_sq_sum"].tolist() == [0.25, 1.0] and state["grad_sum"].tolist() == [0.5, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamps_hold(backend):
    grow = _run_signs([[1.0, -1.0, 1.0, 1.0]] * 6, backend, max_gain=4.0)
    torch.testing.assert_close(grow, torch.full((4,), 4.0))
    signs = [[1.0] * 4 if e % 2 == 0 else [-1.0] * 4 for e in range(8)]
    shrink = _run_signs(signs, backend, min_gain=0.1)
    torch.testing.assert_close(shrink, torch.full((4,), 0.1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gain_scales_the_step(backend):
    """In epoch 3 the SGD step is lr * gain * g: the gain really reaches the update."""
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = ActiveSGD([p], lr=0.1, steps_per_epoch=1, momentum=0.0, backend=backend, **PAPER_RULE)
    g = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()  # applies the first comparison (signs persisted): gain 3
    torch.testing.assert_close(p.detach(), before - 0.1 * 3.0 * g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_end_epoch_mode_equals_steps_per_epoch_mode(backend, config):
    steps = 11
    grads = grad_sequence([tuple(p.shape) for p in make_params()], steps, torch.float64)
    auto_params, manual_params = make_params(), make_params()
    auto = config.make(auto_params, backend=backend)
    manual = config.make(manual_params, backend=backend, steps_per_epoch=None)
    for t, step_grads in enumerate(grads):
        for a, m, g in zip(auto_params, manual_params, step_grads):
            a.grad, m.grad = g.clone(), g.clone()
        auto.step()
        manual.step()
        if (t + 1) % 3 == 0:
            manual.end_epoch()
    for a, m in zip(auto_params, manual_params):
        assert torch.equal(a, m)
        for key in ("gain", "grad_sum", "prev_sign", "step"):
            assert torch.equal(auto.state[a][key], manual.state[m][key])
    assert [g["epoch"] for g in auto.param_groups] == [g["epoch"] for g in manual.param_groups] == [3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_clock_fields_follow_the_spec_timeline(backend):
    p = torch.zeros(2, requires_grad=True)
    opt = ActiveAdamW([p], steps_per_epoch=2, backend=backend)
    seen = []
    for _ in range(5):
        p.grad = torch.ones(2)
        opt.step()
        g = opt.param_groups[0]
        seen.append((g["epoch"], g["steps_in_epoch"], g["boundary_pending"]))
    assert seen == [(0, 1, False), (1, 0, True), (1, 1, False), (2, 0, True), (2, 1, False)]


def test_end_epoch_is_rejected_when_the_optimizer_counts_epochs():
    opt = ActiveAdamW([torch.zeros(2, requires_grad=True)], steps_per_epoch=5)
    with pytest.raises(RuntimeError, match="end_epoch"):
        opt.end_epoch()


@pytest.mark.parametrize("sign_threshold", [0.0, 1.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_missed_boundaries_are_caught_up(backend, sign_threshold):
    """A param without grads for a whole epoch gets every missed boundary when it returns,
    exactly as if it had been stepped with zero gradients in between (docs/algorithm.md)."""
    signs = [1.0, -1.0, 2.0]
    skipped = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    zeroed = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    kwargs = dict(lr=1e-3, steps_per_epoch=2, momentum=0.0, backend=backend,
                  sign_threshold=sign_threshold)
    opt_skip = ActiveSGD([skipped], **kwargs)
    opt_zero = ActiveSGD([zeroed], **kwargs)
    for t in range(12):
        absent = 4 <= t < 9  # grads None for 2.5 epochs: three boundaries missed
        g = torch.tensor(signs, dtype=torch.float64)
        skipped.grad = None if absent else g.clone()
        zeroed.grad = torch.zeros_like(g) if absent else g.clone()
        opt_skip.step()
        opt_zero.step()
    assert torch.equal(opt_skip.state[skipped]["gain"], opt_zero.state[zeroed]["gain"])
    assert torch.equal(opt_skip.state[skipped]["prev_sign"], opt_zero.state[zeroed]["prev_sign"])
    # the 12th step ended epoch 6; that boundary is pending until the next step
    assert opt_skip.param_groups[0]["boundary_pending"]
    assert opt_skip.state[skipped]["epoch"] == opt_skip.param_groups[0]["epoch"] - 1 == 5
    if sign_threshold == 0:
        # the gains did move: catch-up applied decreases (the skipped epochs summed to zero)
        assert (opt_skip.state[skipped]["gain"] < 1).all()
    else:  # one increase (epoch 2's sum, G**2 = 4 g**2 > Q = 2 g**2), then zero sums: held
        assert (opt_skip.state[skipped]["gain"] == 3).all()
        assert torch.equal(opt_skip.state[skipped]["grad_sq_sum"],
                           opt_zero.state[zeroed]["grad_sq_sum"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_late_param_first_boundary_only_rolls_over(backend):
    early = torch.zeros(2, requires_grad=True)
    late = torch.zeros(2, requires_grad=True)
    opt = ActiveSGD([early, late], lr=1e-3, steps_per_epoch=2, momentum=0.0, backend=backend,
                    **PAPER_RULE)
    for t in range(9):
        early.grad = torch.ones(2)
        late.grad = torch.ones(2) if t >= 4 else None  # first grad in epoch 3
        opt.step()
    # early: boundaries after epochs 1..4 -> 3 comparisons; late: rolled after epoch 3, one comparison
    # (7 and 3 are exact in the compact state's bfloat16 gain)
    torch.testing.assert_close(opt.state[early]["gain"].float(), torch.full((2,), 7.0))
    torch.testing.assert_close(opt.state[late]["gain"].float(), torch.full((2,), 3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_group_added_later_joins_the_clock(backend):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = ActiveAdamW([a], steps_per_epoch=2, backend=backend)
    for _ in range(3):
        a.grad = torch.ones(2)
        opt.step()
    opt.add_param_group({"params": [b], "lr": 0.1})
    assert opt.param_groups[1]["epoch"] == opt.param_groups[0]["epoch"] == 1
    assert opt.param_groups[1]["steps_in_epoch"] == 1
    for _ in range(5):
        a.grad, b.grad = torch.ones(2), torch.ones(2)
        opt.step()
    assert [g["epoch"] for g in opt.param_groups] == [4, 4]


@pytest.mark.parametrize("cls", SIGN_TESTED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("absent_epochs", [(10, 1), (0,)], ids=["epochs-10-then-1", "empty-epoch"])
def test_missed_boundary_uses_its_own_epochs_length(backend, absent_epochs, cls):
    """The sign test of a boundary a param missed compares its sum with the length of the epoch
    that sum belongs to, not with the latest epoch's (manual epochs of 10, 10 and 1 steps; or two
    end_epoch() in a row, an epoch of length 0), and with that epoch's Q: as for a twin stepped
    with zero gradients."""
    absent = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zeroed = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = cls([absent, zeroed], lr=1e-3, steps_per_epoch=None, weight_decay=0.0,
              sign_threshold=2.0, backend=backend)

    def step(g):
        absent.grad = None if g is None else torch.full((1,), g, dtype=torch.float64)
        zeroed.grad = torch.full((1,), 0.0 if g is None else g, dtype=torch.float64)
        opt.step()

    for g in [1.0] * 10:  # a clear sign (G = 10 > 2 * sqrt(10 * 1), Q = 10)
        step(g)
    opt.end_epoch()
    for g in [1.0] * 7 + [-1.0] * 3:  # G = 4 < 2 * sqrt(10): no evidence, the gain is held
        step(g)
    opt.end_epoch()
    for steps in absent_epochs:
        for _ in range(steps):
            step(None)
        opt.end_epoch()
    step(1.0)
    gains = [opt.state[p]["gain"].item() for p in (absent, zeroed)]
    assert gains == [1.0, 1.0]


def _sgd_gains(precision, backend, epochs, gain_inc=2.0, gain_dec=0.5, flips=False, start=None):
    """4096 gains of ActiveSGD under the paper's rule, one step per epoch, gradients +1 (from
    the third epoch on, alternating with ``flips``, the gains set to ``start`` there)."""
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = ActiveSGD([p], lr=1e-30, momentum=0.0, steps_per_epoch=1, gain_inc=gain_inc,
                    gain_dec=gain_dec, state_precision=precision, backend=backend, **PAPER_RULE)
    for epoch in range(epochs):
        if start is not None and epoch == 2:
            opt.state[p]["gain"].fill_(start)
        p.grad = torch.full((4096,), -1.0 if flips and epoch >= 2 and epoch % 2 else 1.0)
        opt.step()
    return opt.state[p]["gain"].float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", [
    dict(gain_inc=0.5, epochs=400), dict(gain_inc=0.01, epochs=600), dict(gain_inc=2.0, epochs=600),
    dict(gain_dec=0.998, flips=True, start=13.0, epochs=202),
], ids=["inc-0.5", "inc-0.01", "inc-2", "dec-0.998"])
def test_compact_gains_follow_the_rule_for_any_increment(backend, rule):
    """Rounded to nearest, bfloat16 gains stopped at 128 (gain_inc=0.5), 4 (0.01), 512 (2), and a
    gain of 13 never decreased with gain_dec=0.998. Rounded stochastically they follow the
    full-state gain: unbiased (the mean of 4096 within 1 %), each within a few percent."""
    full = _sgd_gains("full", backend, **rule)
    compact = _sgd_gains("compact", backend, **rule)
    assert torch.equal(full, full[:1].expand_as(full))  # one full-state trajectory
    relative = compact / full - 1
    assert abs(relative.mean().item()) < 0.01
    assert relative.std().item() < 0.06 and relative.abs().max().item() < 0.25
