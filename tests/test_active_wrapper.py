"""Active(optimizer): bitwise its inner optimizer while every gain is 1, a float64 hand
transcription of the gain rule (the paper's, and the sign test with each noise source) and of
θ_before + γ·(θ_after − θ_before) after that, closed-form gain dynamics of the sign test, the
epoch clock (counted, manual, catch-up), GreedyLR, GradScaler, checkpoints, bad input, deepcopy,
and the scaling pass of every backend against the reference one."""

import copy
import io
import math

import pytest
import torch
from torch.optim import optimizer as torch_optimizer

from adaptive_lr import Active, ActiveAdamW, ActiveSGD, GreedyLR, available_backends, backends
from adaptive_lr.backends import Boundary, GainRule, rescale

BACKENDS = [b for b in available_backends("cpu") if b in ("reference", "foreach", "cpu")]
SHAPES = [(8, 6), (6, 4), (5, 3)]  # 2-D only: Muon steps matrices

INNERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01),
    "Muon": lambda p: torch.optim.Muon(p, lr=0.02),
}


def make_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def grad_sequence(steps, dtype=torch.float32, seed=1):
    """Grads whose epoch sums are far from 0: a fixed sign on most elements, flipping every step
    on 30% (noise: small sums) and every 6 steps on 20% (with 6-step epochs: significant
    flips), so that the gains move both ways under either rule."""
    gen = torch.Generator().manual_seed(seed)
    signs = [torch.randn(s, generator=gen).sign() for s in SHAPES]
    kinds = [torch.rand(s, generator=gen) for s in SHAPES]
    out = []
    for k in range(steps):
        fast, slow = (-1.0 if k % 2 else 1.0), (-1.0 if k // 6 % 2 else 1.0)
        out.append([(torch.where(u < 0.3, fast * s, torch.where(u < 0.5, slow * s, s))
                     * (0.5 + torch.rand(s.shape, generator=gen))).to(dtype)
                    for s, u in zip(signs, kinds)])
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("sign_threshold", [0.0, 2.0])
def test_bitwise_the_inner_optimizer_for_two_epochs(inner, backend, sign_threshold):
    params, twin_params = make_params(), make_params()
    opt = Active(INNERS[inner](params), steps_per_epoch=6, backend=backend,
                 sign_threshold=sign_threshold)
    twin = INNERS[inner](twin_params)
    for grads in grad_sequence(12):
        set_grads(params, grads)
        set_grads(twin_params, grads)
        opt.step()
        twin.step()
        for p, q in zip(params, twin_params):
            assert torch.equal(p, q)
    set_grads(params, grad_sequence(1, seed=7)[0])
    opt.step()  # epoch 3's first step: the gains move
    assert any(not torch.equal(opt.state[p]["gain"], torch.ones_like(p)) for p in params)


# The inner optimizers' running mean squares, transcribed from docs/active_wrapper.md: the state
# key, and what divides it into a per-step mean square given the group and the step count t.
# Any other inner optimizer: the epoch's sum of g**2.
ORACLE_MEAN_SQUARES = {
    torch.optim.AdamW: ("exp_avg_sq", lambda group, t: 1 - group["betas"][1] ** t),
    torch.optim.RMSprop: ("square_avg", lambda group, t: 1 - group["alpha"] ** t),
    torch.optim.Adagrad: ("sum", lambda group, t: t),
}


class HandOracle:
    """The gain rule and the scaling, by hand in float64, per param (docs/algorithm.md, the sign
    test as docs/active_wrapper.md gives its noise): the inner optimizer's step comes from a
    deep copy of it taken before each step, a boundary reads that copy's moments after it."""

    def __init__(self, params, epoch_steps, sign_threshold, relax_gains=False, gain_inc=2.0,
                 gain_dec=0.5, min_gain=0.0, max_gain=math.inf):
        self.params, self.epoch_steps, self.k = params, epoch_steps, sign_threshold
        self.relax_gains = relax_gains
        self.rule = gain_inc, gain_dec, min_gain, max_gain
        self.state = {}  # id(param) -> dict(gain, grad_sum, grad_sq_sum, prev_sign, has_prev)

    def noise(self, inner, twin, s):
        if type(inner) not in ORACLE_MEAN_SQUARES:
            return s["grad_sq_sum"]
        key, divisor = ORACLE_MEAN_SQUARES[type(inner)]
        state = inner.state[twin]
        return (self.epoch_steps * state[key].double()
                / divisor(inner.param_groups[0], state["step"].item()))

    def boundary(self, inner, twins):
        inc, dec, lo, hi = self.rule
        for p, twin in zip(self.params, twins):
            s = self.state.get(id(p))
            if s is None:
                continue
            sign = s["grad_sum"].sign()
            if self.k > 0:
                significant = s["grad_sum"] ** 2 > self.k**2 * self.noise(inner, twin, s)
                sign = torch.where(significant, sign, 0.0)
            if s["has_prev"]:
                product = s["prev_sign"] * sign
                decreased = s["gain"] * dec
                if self.k > 0:  # no significant sign on one side: held (relaxed toward 1)
                    held = s["gain"]
                    if self.relax_gains:
                        held = torch.where(held > 1, 1 + (held - 1) * dec, held)
                    decreased = torch.where(product < 0, decreased, held)
                s["gain"] = torch.where(product > 0, s["gain"] + inc, decreased).clamp(lo, hi)
            s.update(grad_sum=torch.zeros_like(sign), grad_sq_sum=torch.zeros_like(sign),
                     prev_sign=sign, has_prev=True)

    def step(self, opt, params, boundary):
        """The params a step of Active(opt.optimizer) must give, computed before it runs."""
        inner = copy.deepcopy(opt.optimizer)
        twins = [p for g in inner.param_groups for p in g["params"]]
        inner.step()
        if boundary:
            self.boundary(inner, twins)
        expected = []
        for p, after in zip(params, twins):
            if p.grad is None:
                expected.append(p.detach().clone())
                continue
            zeros = torch.zeros_like(p, dtype=torch.float64)
            s = self.state.setdefault(id(p), dict(gain=zeros + 1, grad_sum=zeros,
                                                  grad_sq_sum=zeros, prev_sign=zeros,
                                                  has_prev=False))
            before = p.detach().double()
            expected.append((before + s["gain"] * (after.detach().double() - before))
                            .to(p.dtype))
            g = p.grad.double()
            s.update(grad_sum=s["grad_sum"] + g, grad_sq_sum=s["grad_sq_sum"] + g * g)
        return expected


def run_against_oracle(opt, params, grad_seq, end_epoch_every=None):
    oracle = HandOracle(params, opt.steps_per_epoch or end_epoch_every,
                        opt.defaults["sign_threshold"], opt.defaults["relax_gains"])
    for k, grads in enumerate(grad_seq):
        if k and end_epoch_every and k % end_epoch_every == 0:
            opt.end_epoch()
        set_grads(params, grads)
        expected = oracle.step(opt, params, opt.param_groups[0]["boundary_pending"])
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-6)
        for p in params:  # the params whose boundaries are all applied, in both
            if (id(p) in oracle.state and not opt.param_groups[0]["boundary_pending"]
                    and int(opt.state[p]["epoch"]) == opt.param_groups[0]["epoch"]):
                assert_sums_match(opt, p, oracle.state[id(p)])
    for p in params:
        if id(p) in oracle.state:
            assert torch.equal(opt.state[p]["gain"], oracle.state[id(p)]["gain"].float())
    return oracle


def assert_sums_match(opt, p, oracle_state):
    """The epoch sums, G always and the sum of g**2 exactly where the wrapper keeps one."""
    state = opt.state[p]
    keeps = opt.param_groups[0]["sign_threshold"] > 0 and type(opt.optimizer) not in (
        ORACLE_MEAN_SQUARES)
    assert ("grad_sq_sum" in state) == keeps
    for key in ("grad_sum", "grad_sq_sum") if keeps else ("grad_sum",):
        torch.testing.assert_close(state[key].double(), oracle_state[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", ["SGD", "AdamW", "Adafactor", "Adagrad", "RMSprop"])
@pytest.mark.parametrize(("sign_threshold", "relax_gains"), [(0.0, False), (2.0, False),
                                                           (2.0, True)])
def test_moving_gains_match_a_float64_hand_transcription(inner, backend, sign_threshold,
                                                         relax_gains):
    params = make_params()
    opt = Active(INNERS[inner](params), steps_per_epoch=6, backend=backend,
                 sign_threshold=sign_threshold, relax_gains=relax_gains)
    grads = grad_sequence(30)
    # then two epochs whose sums are exactly 0 (each gradient followed by its negation): no
    # evidence, so grown gains are held, or relaxed toward 1
    grads += [[g if k % 2 == 0 else -g for g in grads[k - k % 2]] for k in range(13)]
    oracle = run_against_oracle(opt, params, grads)
    gains = torch.cat([s["gain"].flatten() for s in oracle.state.values()])
    assert (gains > 1).any() and (gains < 1).any()  # the rule moved them both ways
    if sign_threshold:  # and held the gains of the noise (the paper's rule halves them)
        assert (gains == 1).float().mean() > 0.2
    if relax_gains:  # the gains that grew and then lost their evidence relaxed toward 1
        held_params = make_params()
        held = run_against_oracle(Active(INNERS[inner](held_params), steps_per_epoch=6,
                                         backend=backend, sign_threshold=sign_threshold),
                                  held_params, grads)
        held_gains = torch.cat([s["gain"].flatten() for s in held.state.values()])
        assert (gains <= held_gains).all() and (gains < held_gains).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_mode_equals_counted_mode(backend):
    counted_params, manual_params = make_params(), make_params()
    counted = Active(INNERS["AdamW"](counted_params), steps_per_epoch=3, backend=backend)
    manual = Active(INNERS["AdamW"](manual_params), steps_per_epoch=None, backend=backend)
    with pytest.raises(RuntimeError, match="end_epoch"):
        counted.end_epoch()
    for k, grads in enumerate(grad_sequence(12)):
        if k and k % 3 == 0:
            manual.end_epoch()
        set_grads(counted_params, grads)
        set_grads(manual_params, grads)
        counted.step()
        manual.step()
    for p, q in zip(counted_params, manual_params):
        assert torch.equal(p, q)
        assert torch.equal(counted.state[p]["gain"], manual.state[q]["gain"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", ["SGD", "AdamW"])
@pytest.mark.parametrize("sign_threshold", [0.0, 2.0])
def test_missed_boundaries_are_caught_up(backend, inner, sign_threshold):
    """Param 1 has no grad for steps 13..26 (boundaries 3 and 4 missed), param 2 gets its first
    grad at step 8: the hand transcription applies every boundary to every param with state,
    with the missing grads as zeros (and the sign test's noise as it stands then)."""
    params = make_params()
    opt = Active(INNERS[inner](params), steps_per_epoch=6, backend=backend,
                 sign_threshold=sign_threshold)
    grad_seq = grad_sequence(42)
    for k, grads in enumerate(grad_seq):
        if 12 <= k < 26:
            grads[1] = None
        if k < 7:
            grads[2] = None
    oracle = run_against_oracle(opt, params, grad_seq)
    gains = oracle.state[id(params[1])]["gain"]
    assert (gains > 1).any()
    # the missed boundaries decreased gains (paper's rule), or held them (sign test)
    assert ((gains == 1) if sign_threshold else (gains < 1)).any()


def test_greedy_lr_moves_the_inner_lr():
    params = make_params()
    inner = INNERS["SGD"](params)
    opt = Active(inner, steps_per_epoch=3)
    assert opt.param_groups is inner.param_groups
    sched = GreedyLR(opt, patience=0, factor=0.5, cooldown=0, warmup=0)
    for k, grads in enumerate(grad_sequence(4)):
        set_grads(params, grads)
        opt.step()
        sched.step(10.0 - k)  # improving: GreedyLR raises the lr
    assert inner.param_groups[0]["lr"] > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_steps_as_the_inner_optimizer_with_it(backend):
    params, twin_params = make_params(), make_params()
    opt = Active(INNERS["AdamW"](params), steps_per_epoch=3, backend=backend)
    twin = INNERS["AdamW"](twin_params)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for grads in grad_sequence(6):
        for o, ps, scaler in ((opt, params, scalers[0]), (twin, twin_params, scalers[1])):
            scale = scaler.scale(torch.ones(())).item()
            set_grads(ps, [g * scale for g in grads])
            scaler.step(o)
            scaler.update()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    assert opt.state[params[0]]["grad_sum"].abs().max() < 100  # the sum saw unscaled grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", ["AdamW", "SGD"])  # the sign test's noise: its v, or Q
@pytest.mark.parametrize("steps_before", [8, 12], ids=["mid-epoch", "boundary-pending"])
def test_overflow_step_counts_and_applies_only_a_pending_boundary(backend, inner, steps_before):
    params = make_params()
    opt = Active(INNERS[inner](params), steps_per_epoch=6, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))
    for grads in grad_sequence(steps_before):
        set_grads(params, grads)
        scaler.step(opt)
        scaler.update()
    pending = opt.param_groups[0]["boundary_pending"]
    assert pending == (steps_before % 6 == 0)
    before = copy.deepcopy((params, opt.optimizer.state_dict(), [opt.state[p] for p in params]))
    steps_in_epoch = opt.param_groups[0]["steps_in_epoch"]
    set_grads(params, [torch.full(s, math.inf) for s in SHAPES])
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 1.0  # GradScaler saw the overflow
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    inner_before = before[1]["state"]
    for i, state in opt.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, inner_before[i][key])
    assert opt.param_groups[0]["steps_in_epoch"] == (1 if pending else steps_in_epoch + 1)
    assert opt.param_groups[0]["boundary_pending"] is False
    for p, old in zip(params, before[2]):
        sums = ("grad_sum", "grad_sq_sum") if inner == "SGD" else ("grad_sum",)
        for key in sums:
            assert torch.equal(opt.state[p][key], torch.zeros_like(p) if pending else old[key])
        assert int(opt.state[p]["epoch"]) == int(old["epoch"]) + pending
        if pending:  # the second boundary compared signs
            assert not torch.equal(opt.state[p]["gain"], old["gain"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", ["AdamW", "Adafactor"])  # the sign test reads v, or keeps Q
def test_state_dict_resumes_mid_epoch_identically(inner, backend):
    params = make_params()
    opt = Active(INNERS[inner](params), steps_per_epoch=6, backend=backend)
    grad_seq = grad_sequence(28)
    for grads in grad_seq[:15]:  # mid-epoch 3, after a sign-comparing boundary
        set_grads(params, grads)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = resume_alongside(  # gain_inc: replaced by the state dict's groups
        opt, params, saved, lambda ps: Active(INNERS[inner](ps), steps_per_epoch=6,
                                              backend=backend, gain_inc=1.0), grad_seq[15:])
    assert resumed.param_groups[0]["gain_inc"] == 2.0
    assert ("grad_sq_sum" in opt.state[params[0]]) == (inner == "Adafactor")
    assert (opt.state[params[0]]["gain"] != 1).any()


def resume_alongside(opt, params, saved, make, grad_seq):
    """``make`` (an Active over copies of params) loads ``saved`` and steps alongside ``opt``
    through grad_seq: both end with the same params and sign state."""
    resumed_params = clone(params)
    resumed = make(resumed_params)
    resumed.load_state_dict(saved)
    for grads in grad_seq:
        for o, ps in ((opt, params), (resumed, resumed_params)):
            set_grads(ps, grads)
            o.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        assert_state_dicts_equal(opt.state[p], resumed.state[q])
    return resumed


def test_deepcopy_continues_identically_and_independently():
    params = make_params()
    opt = Active(INNERS["AdamW"](params), steps_per_epoch=3)
    grad_seq = grad_sequence(10)
    for grads in grad_seq[:5]:
        set_grads(params, grads)
        opt.step()
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert twin.param_groups is twin.optimizer.param_groups
    assert all(p is not q for p, q in zip(params, twin_params))
    for grads in grad_seq[5:]:
        for o, ps in ((opt, params), (twin, twin_params)):
            set_grads(ps, grads)
            o.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["gain"], twin.state[q]["gain"])


# ---- the sign test: closed-form gain dynamics, noise sources, groups, checkpoints ----------

# 8-step epochs of one gradient per element: constant 0.5, constant -2, alternating ±1, zero
CLOSED_FORM_EPOCH = 8


def closed_form_grads(step):
    return torch.tensor([0.5, -2.0, 1.0 if step % 2 else -1.0, 0.0])


def run_closed_form(opt, param, steps):
    for step in range(steps):
        param.grad = closed_form_grads(step)
        opt.step()
    return opt.state[param]["gain"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", [
    # the wrapper's epoch sum of g**2 (no second moment to read)
    lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    lambda p: torch.optim.Adamax(p, lr=1e-3),
    # the inner optimizer's second moment, bias-corrected EMAs and Adagrad's running total
    lambda p: torch.optim.Adam(p, lr=1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3),
    lambda p: torch.optim.NAdam(p, lr=1e-3), lambda p: torch.optim.RAdam(p, lr=1e-3),
    lambda p: torch.optim.RMSprop(p, lr=1e-3), lambda p: torch.optim.Adadelta(p, lr=1e-3),
    lambda p: torch.optim.Adagrad(p, lr=1e-3),
], ids=["SGD", "Adamax", "Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "Adadelta", "Adagrad"])
@pytest.mark.parametrize(("sign_threshold", "expected"), [
    # a constant gradient's sum G = 8g passes G**2 > k**2 * 8 * g**2 exactly when k**2 < 8:
    # +2 at each of the 4 comparing boundaries. Noise (alternating, zero): G = 0, no sign;
    # the paper's rule halves its gain at each boundary, the sign test holds it
    (0.0, [9.0, 9.0, 1 / 16, 1 / 16]),
    (2.0, [9.0, 9.0, 1.0, 1.0]),
    (3.0, [1.0, 1.0, 1.0, 1.0]),  # 9 > 8: even a constant gradient is not significant
])
def test_sign_test_closed_form(inner, backend, sign_threshold, expected):
    """Each noise source is a per-step mean square scaled to the epoch: a constant gradient g
    has mean square g**2 in every one of them (bias correction and Adagrad's 1/t included: an
    uncorrected RMSprop or an undivided Adagrad sum would pass or fail k=2 and k=3 otherwise)."""
    param = torch.zeros(4, requires_grad=True)
    opt = Active(inner([param]), steps_per_epoch=CLOSED_FORM_EPOCH, backend=backend,
                 sign_threshold=sign_threshold)
    gains = run_closed_form(opt, param, 5 * CLOSED_FORM_EPOCH + 1)  # 1 roll, 4 comparisons
    assert gains.tolist() == expected


class SubclassedAdam(torch.optim.Adam):
    """Adam under another type: the wrapper does not read its moments (a subclass may keep its
    state otherwise) and keeps its own epoch sum of g**2."""


@pytest.mark.parametrize("backend", BACKENDS)
def test_adams_second_moment_is_the_noise_where_it_has_one(backend):
    """One epoch of large gradients (100), then small ones (1): Adam's v (β₂ = 0.999) still
    remembers the large ones, so the small epochs' sums are within its noise and the gains are
    held; the epoch's own sum of g**2 (the subclass) finds them significant."""
    gains = {}
    for cls in (torch.optim.Adam, SubclassedAdam):
        param = torch.zeros(3, requires_grad=True)
        opt = Active(cls([param], lr=1e-3), steps_per_epoch=8, backend=backend)
        for step in range(33):
            param.grad = torch.full((3,), 100.0 if step < 8 else 1.0)
            opt.step()
        gains[cls] = opt.state[param]["gain"]
        assert ("grad_sq_sum" in opt.state[param]) == (cls is SubclassedAdam)
    assert gains[torch.optim.Adam].tolist() == [1.0] * 3
    assert gains[SubclassedAdam].tolist() == [7.0] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_may_override_the_sign_threshold(backend):
    params = [torch.zeros(4, requires_grad=True) for _ in range(3)]
    opt = Active(torch.optim.SGD(params[:1], lr=1e-3), steps_per_epoch=CLOSED_FORM_EPOCH,
                 backend=backend)
    opt.add_param_group({"params": params[1:2], "sign_threshold": 0.0})
    opt.add_param_group({"params": params[2:]})
    opt.param_groups[2]["sign_threshold"] = 3.0  # set mid-run, as a scheduler could
    for step in range(5 * CLOSED_FORM_EPOCH + 1):
        for p in params:
            p.grad = closed_form_grads(step)
        opt.step()
    assert [opt.param_groups[i]["sign_threshold"] for i in range(3)] == [2.0, 0.0, 3.0]
    assert opt.state[params[0]]["gain"].tolist() == [9.0, 9.0, 1.0, 1.0]
    assert opt.state[params[1]]["gain"].tolist() == [9.0, 9.0, 1 / 16, 1 / 16]
    assert opt.state[params[2]]["gain"].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert ["grad_sq_sum" in opt.state[p] for p in params] == [True, False, True]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [
    lambda p, **kw: Active(torch.optim.SGD(p, lr=1e-3), **kw),
    lambda p, **kw: ActiveSGD(p, lr=1e-3, momentum=0.0, **kw),  # the native optimizer alike
], ids=["Active(SGD)", "ActiveSGD"])
def test_a_sign_threshold_switched_on_mid_run_holds_the_epoch_under_way(backend, make):
    """Switched on mid-epoch, the epoch sum of g**2 starts at +inf: it did not see the steps the
    epoch sum G already holds, so G counts as no sign (held); the next epochs are tested.
    Switched off, it is dropped."""
    param = torch.zeros(4, requires_grad=True)
    opt = make([param], steps_per_epoch=CLOSED_FORM_EPOCH, backend=backend, sign_threshold=0.0)
    run_closed_form(opt, param, 12)  # the first boundary rolled over: no gain changed
    assert "grad_sq_sum" not in opt.state[param]
    opt.param_groups[0]["sign_threshold"] = 2.0
    for step in range(12, 33):
        param.grad = closed_form_grads(step)
        opt.step()
        if step == 12:
            assert torch.isinf(opt.state[param]["grad_sq_sum"]).all()
    # boundary 2 (epoch 1, untested): held, no sign; 3: held, signs; 4: +2 on the repeats
    assert opt.state[param]["gain"].tolist() == [3.0, 3.0, 1.0, 1.0]
    opt.param_groups[0]["sign_threshold"] = 0.0
    param.grad = closed_form_grads(33)
    opt.step()
    assert "grad_sq_sum" not in opt.state[param]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", ["SGD", "AdamW"])
def test_a_checkpoint_saved_before_the_sign_test_resumes_with_the_papers_rule(inner, backend):
    """A state dict of Active before sign_threshold existed (its groups without the key, no
    grad_sq_sum) loads into an Active built with the default sign test and continues exactly as
    the paper's rule (sign_threshold 0) would."""
    params = make_params()
    opt = Active(INNERS[inner](params), steps_per_epoch=3, backend=backend, sign_threshold=0.0)
    grad_seq = grad_sequence(16)
    for grads in grad_seq[:7]:
        set_grads(params, grads)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["inner"]["param_groups"]:
        del group["sign_threshold"]
    resumed = resume_alongside(
        opt, params, saved,
        lambda ps: Active(INNERS[inner](ps), steps_per_epoch=3, backend=backend), grad_seq[7:])
    assert resumed.param_groups[0]["sign_threshold"] == 0.0
    assert not any("grad_sq_sum" in state for state in resumed.state.values())
    assert any((opt.state[p]["gain"] < 1).any() for p in params)  # halved: the paper's rule


# ---- bad input: a clear error, and nothing changes -----------------------------------------

def test_bad_constructor_arguments_raise_and_leave_the_inner_optimizer_alone():
    params = make_params()
    inner = INNERS["SGD"](params)
    groups = copy.deepcopy(inner.param_groups)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Active(params, steps_per_epoch=3)
    with pytest.raises(TypeError, match="already has gains"):
        Active(ActiveAdamW(params, steps_per_epoch=3), steps_per_epoch=3)
    for kwargs, match in [({"steps_per_epoch": 0}, "steps_per_epoch"),
                          ({"steps_per_epoch": 3, "gain_dec": 0.0}, "gain_dec"),
                          ({"steps_per_epoch": 3, "max_gain": 0.5}, "max_gain"),
                          ({"steps_per_epoch": 3, "gain_inc": -1.0}, "gain_inc"),
                          ({"steps_per_epoch": 3, "sign_threshold": -1.0}, "sign_threshold"),
                          ({"steps_per_epoch": 3, "sign_threshold": math.inf}, "sign_threshold"),
                          ({"steps_per_epoch": 3, "backend": "gpu"}, "unknown backend")]:
        with pytest.raises(ValueError, match=match):
            Active(inner, **kwargs)
    with pytest.raises(TypeError, match="sign_threshold must be a real number"):
        Active(inner, steps_per_epoch=3, sign_threshold=True)
    with pytest.raises(ValueError, match="relax_gains needs the sign test"):
        Active(inner, steps_per_epoch=3, sign_threshold=0.0, relax_gains=True)
    assert [set(g) for g in inner.param_groups] == [set(g) for g in groups]
    Active(inner, steps_per_epoch=3)
    with pytest.raises(ValueError, match="wrapped by another Active"):
        Active(inner, steps_per_epoch=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sparse_grad_raises_before_anything_changes(backend):
    params = make_params()
    opt = Active(INNERS["SGD"](params), steps_per_epoch=3, backend=backend)
    set_grads(params, grad_sequence(1)[0])
    opt.step()
    before = copy.deepcopy((params, opt.state_dict()))
    set_grads(params, grad_sequence(1, seed=3)[0])
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    assert_state_dicts_equal(opt.state_dict(), before[1])


def assert_state_dicts_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_state_dicts_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_dicts_equal(x, y)
    else:
        assert a == b


class FailingSGD(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("inner step failed")


def test_a_failing_inner_step_leaves_the_sign_state_and_the_clock_alone():
    params = make_params()
    opt = Active(FailingSGD(params, lr=0.1), steps_per_epoch=3)
    set_grads(params, grad_sequence(1)[0])
    with pytest.raises(RuntimeError, match="inner step failed"):
        opt.step()
    assert not opt.state
    assert opt.param_groups[0]["steps_in_epoch"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_inner_groups_maximize_negates_the_epoch_sum(backend):
    params = make_params()
    opt = Active(torch.optim.SGD(params, lr=0.1, maximize=True), steps_per_epoch=3,
                 backend=backend)
    grads = grad_sequence(2)
    for step_grads in grads:
        set_grads(params, step_grads)
        opt.step()
    for i, p in enumerate(params):
        assert torch.equal(opt.state[p]["grad_sum"], -grads[0][i] - grads[1][i])


@pytest.mark.parametrize("inner", ["AdamW", "SGD"])  # without and with grad_sq_sum
def test_a_state_dict_that_does_not_fit_raises_and_changes_nothing(inner):
    params = make_params()
    opt = Active(INNERS[inner](params), steps_per_epoch=3)
    for grads in grad_sequence(4):
        set_grads(params, grads)
        opt.step()
    good = opt.state_dict()
    snapshot = copy.deepcopy(good)

    def broken(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    def wrong_gain_shape(sd):
        sd["state"][0]["gain"] = torch.ones(3)

    def no_clock(sd):
        del sd["inner"]["param_groups"][0]["epoch"]

    def wrong_squares_shape(sd):
        sd["state"][0]["grad_sq_sum"] = torch.ones(3)

    def unknown_state_key(sd):
        sd["state"][0]["grad_sq_sums"] = sd["state"][0]["gain"]

    def bad_sign_threshold(sd):
        sd["inner"]["param_groups"][0]["sign_threshold"] = -1.0

    def future_epoch(sd):
        sd["state"][1]["epoch"] = torch.tensor(99)

    def unknown_param(sd):
        sd["state"][7] = sd["state"][0]

    def fewer_params(sd):
        sd["inner"]["param_groups"][0]["params"].pop()

    def bad_inner_state(sd):  # Active's part fits; the inner optimizer rejects its own
        sd["inner"]["state"] = []

    cases = {"gain of another shape": (wrong_gain_shape, "gain"),
             "grad_sq_sum of another shape": (wrong_squares_shape, "grad_sq_sum"),
             "an unknown state key": (unknown_state_key, "exactly"),
             "a negative sign_threshold": (bad_sign_threshold, "sign_threshold"),
             "no epoch clock": (no_clock, "epoch"),
             "a param epoch ahead of the clock": (future_epoch, "epoch"),
             "an unknown param": (unknown_param, "unknown param"),
             "fewer params": (fewer_params, "params"),
             "the inner optimizer's state dict alone": (None, "inner")}
    for name, (edit, match) in cases.items():
        sd = opt.optimizer.state_dict() if edit is None else broken(edit)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert_state_dicts_equal(opt.state_dict(), snapshot)
    with pytest.raises(AttributeError):  # torch's loader iterates the state's items()
        opt.load_state_dict(broken(bad_inner_state))
    assert_state_dicts_equal(opt.state_dict(), snapshot)


def test_a_group_added_to_the_inner_optimizer_directly_raises_clearly():
    params = make_params()
    opt = Active(INNERS["SGD"](params[:2]), steps_per_epoch=3)
    opt.optimizer.add_param_group({"params": [params[2]]})
    set_grads(params, grad_sequence(1)[0])
    with pytest.raises(RuntimeError, match="Active.add_param_group"):
        opt.step()


def test_add_param_group_joins_the_clock_with_its_own_gain_arguments():
    params = make_params()
    opt = Active(INNERS["SGD"](params[:2]), steps_per_epoch=3, gain_inc=1.0)
    for grads in grad_sequence(4):
        set_grads(params[:2], grads[:2])
        opt.step()
    with pytest.raises(ValueError, match="gain_dec"):
        opt.add_param_group({"params": [params[2]], "gain_dec": 2.0})
    with pytest.raises(ValueError, match="sign_threshold"):
        opt.add_param_group({"params": [params[2]], "sign_threshold": math.nan})
    with pytest.raises(TypeError, match="sign_threshold"):
        opt.add_param_group({"params": [params[2]], "sign_threshold": "2"})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [params[2]], "max_gain": 3.0})
    group = opt.param_groups[1]
    assert (group["epoch"], group["steps_in_epoch"], group["gain_inc"], group["max_gain"]) == (
        1, 1, 1.0, 3.0)


# ---- the scaling pass: every backend equals the reference, bit for bit ---------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("boundary", list(Boundary), ids=lambda b: b.name)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("noise", [None, "grad_sq_sums", "moments"])
def test_scaling_pass_equals_the_reference(backend, dtype, boundary, maximize, noise):
    """noise: the sign test off, or its noise from the wrapper's sums of g**2 or from moments
    (floors near the sums' squares: some counted, some not; relax_gains with the moments)."""
    # a tensor spanning several chunks of the cpu kernel and odd sizes (SIMD tails)
    sizes = [(1 << 16) + 37, 5, 1000]
    gen = torch.Generator().manual_seed(2)

    def bucket():
        befores = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        params = [b + 0.01 * torch.randn(n, generator=gen).to(dtype)
                  for b, n in zip(befores, sizes)]
        gains = [torch.where(torch.rand(n, generator=gen) < 0.5, 1.0,
                             4 * torch.rand(n, generator=gen)) for n in sizes]
        return rescale.RescaleBucket(
            params=params, befores=befores,
            grads=[torch.randn(n, generator=gen).to(dtype) for n in sizes], gains=gains,
            grad_sums=[torch.randn(n, generator=gen) for n in sizes],
            prev_signs=[torch.randint(-1, 2, (n,), generator=gen, dtype=torch.int8)
                        for n in sizes],
            rule=GainRule(gain_inc=2.0, gain_dec=0.5, min_gain=0.1, max_gain=3.0,
                          sign_threshold=0.0 if noise is None else 2.0,
                          relax_gains=noise == "moments"),
            maximize=maximize,
            boundary=boundary,
            **({} if noise is None else {
                noise: [torch.rand(n, generator=gen) / 2 for n in sizes],
                "sign_test_factors": [1.0 + 0.37 * i for i in range(len(sizes))]}))

    expected = bucket()
    got = copy.deepcopy(expected)
    rescale.reference(expected)
    rescale.resolve(backend, torch.device("cpu"))(got)
    for name in ("params", "gains", "grad_sums", "prev_signs", "grad_sq_sums"):
        for e, g in zip(getattr(expected, name) or [], getattr(got, name) or []):
            assert torch.equal(e, g), name
    if noise and boundary != Boundary.NONE:  # the test counted some signs and not others
        counted = torch.cat(expected.prev_signs) != 0
        assert counted.any() and not counted.all()


def test_every_backend_names_its_scaling_pass():
    """The pass is chosen by the backend's name, for every backend; cuda and triton, which have
    no fused pass, run the foreach one (docs/active_wrapper.md, "Backends and cost")."""
    assert set(rescale.PASSES) == set(backends.NAMES)
    assert rescale.PASSES["cuda"] is rescale.PASSES["triton"] is rescale.foreach
    for name in available_backends("cpu"):
        assert rescale.resolve(name, torch.device("cpu")) is rescale.PASSES[name]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("inner", ["AdamW", "SGD"])  # the sign test reads its v, or keeps Q
def test_any_param_layout_steps_as_the_reference(backend, inner):
    """A transposed param (dense: stepped in place by the cpu op) and a strided view (not dense:
    stepped on contiguous copies) give the reference backend's results."""
    def layouts():
        gen = torch.Generator().manual_seed(4)
        return [torch.randn(6, 8, generator=gen).t().requires_grad_(),
                torch.randn(8, 12, generator=gen)[:, ::2].detach().requires_grad_()]

    results = {}
    for name in ("reference", backend):
        params = layouts()
        opt = Active(INNERS[inner](params), steps_per_epoch=6, backend=name)
        gen = torch.Generator().manual_seed(5)
        for _ in range(20):  # mostly positive grads: significant sums, gains that grow
            set_grads(params, [torch.randn(p.shape, generator=gen) + 2 for p in params])
            opt.step()
        results[name] = [(p.detach(), opt.state[p]) for p in params]
    for (p, expected), (q, got) in zip(results["reference"], results[backend]):
        assert torch.equal(p, q)
        assert_state_dicts_equal(expected, got)  # grad_sq_sum too where kept
    assert not torch.equal(results[backend][0][1]["gain"], torch.ones(8, 6))  # the gains moved


def test_the_cpu_op_checks_its_inputs_before_writing():
    if "cpu" not in BACKENDS:
        pytest.skip("adaptive_lr._C is not built")
    p, before, grad = torch.ones(4), torch.zeros(4), torch.ones(4)
    gain, grad_sum, sign = torch.full((4,), 2.0), torch.zeros(4), torch.zeros(4, dtype=torch.int8)
    squares = torch.zeros(4)
    for args, match in [
        (([torch.zeros(4)], [], [], [], 0.0, 0), "prev_signs"),
        (([sign], [squares], [torch.zeros(4)], [4.0], 2.0, 2), "not both"),
        (([sign], [], [], [], 2.0, 2), "needs grad_sq_sums or moments"),
        (([sign], [squares], [], [], 2.0, 2), "sign_test_factors"),
        (([sign], [torch.zeros(3)], [], [4.0], 2.0, 2), "grad_sq_sums"),
        (([sign], [squares], [], [4.0], -1.0, 2), "sign_threshold"),
        (([sign], [], [], [], 0.0, 2, True), r"relax_gains needs the sign test"),
    ]:
        prev_signs, grad_sq_sums, moments, factors, k, boundary, *relax = args
        with pytest.raises(RuntimeError, match=match):
            torch.ops.adaptive_lr.active_rescale_(
                [p], [before], [grad], [gain], [grad_sum], prev_signs, grad_sq_sums, moments,
                factors, 2.0, 0.5, 0.0, math.inf, k, bool(relax), False, boundary)
        assert torch.equal(p, torch.ones(4)) and torch.equal(grad_sum, torch.zeros(4))
        assert torch.equal(squares, torch.zeros(4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("edit", "message"), [
    (dict(gain_dec=2.0), "gain_dec"), (dict(gain_inc=-1.0), "gain_inc"),
    (dict(gain_inc="2"), "gain_inc must be a real number"), (dict(max_gain=0.5), "max_gain"),
    (dict(sign_threshold=-1.0), "sign_threshold"), (dict(sign_threshold=None), "sign_threshold"),
    (dict(relax_gains=1), "relax_gains must be a bool"),
])
def test_a_bad_gain_argument_set_mid_run_fails_before_the_inner_step(backend, edit, message):
    """Every group's gain arguments are checked before the inner optimizer steps (they used to
    be accepted mid-run, or to fail in the scaling op after the inner step had moved params)."""
    params = make_params()
    opt = Active(torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1),
                 steps_per_epoch=2, backend=backend)
    set_grads(params, grad_sequence(1)[0])
    opt.step()
    before = clone(params)
    opt.param_groups[1].update(edit)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("make_inner", [
    lambda p: torch.optim.LBFGS(p), lambda p: torch.optim.SparseAdam(p),
], ids=["LBFGS", "SparseAdam"])
def test_optimizers_whose_step_cannot_be_scaled_are_refused_when_wrapped(make_inner):
    """They used to build and then fail at the first step."""
    with pytest.raises(TypeError, match="Active cannot wrap"):
        Active(make_inner(make_params()), steps_per_epoch=3)


def test_complex_params_are_refused_when_built_and_when_added():
    """The reference and foreach passes dropped their imaginary part; the cpu one raised after
    the inner step had moved them."""
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="real floating-point params, got torch.complex64"):
        Active(torch.optim.AdamW([z]), steps_per_epoch=3)
    opt = Active(torch.optim.AdamW(make_params()), steps_per_epoch=3)
    with pytest.raises(TypeError, match="real floating-point"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("inner,scheduler", [
    ("AdamW", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)),
    ("SGD", lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2)),
])
def test_momentum_cycling_schedulers_work_on_the_wrapper(inner, scheduler):
    """cycle_momentum=True (their default) looks for momentum or betas in the optimizer's
    defaults: they raised on Active(AdamW) / Active(SGD)."""
    params = make_params()
    opt = Active(INNERS[inner](params), steps_per_epoch=3)
    sched = scheduler(opt)
    moments = []
    for grads in grad_sequence(4):
        set_grads(params, grads)
        opt.step()
        sched.step()
        group = opt.param_groups[0]
        moments.append(group["betas"][0] if "betas" in group else group["momentum"])
    assert len(set(moments)) > 1  # the scheduler cycles the inner optimizer's momentum


def test_hooks_fire_once_per_call_as_on_torch_optimizers():
    params = make_params()
    opt = Active(INNERS["AdamW"](params), steps_per_epoch=3)
    calls = []
    handles = [
        torch_optimizer.register_optimizer_step_pre_hook(
            lambda o, *_: calls.append(("global pre", type(o).__name__))),
        torch_optimizer.register_optimizer_step_post_hook(
            lambda o, *_: calls.append(("global post", type(o).__name__))),
    ]
    try:
        opt.optimizer.register_step_pre_hook(lambda o, *_: calls.append(("inner pre", "")))
        set_grads(params, grad_sequence(1)[0])
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("global pre", "Active"), ("inner pre", ""), ("global post", "Active")]
    assert torch_optimizer._global_optimizer_pre_hooks == {}  # restored, then removed
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd post") or dict(sd, extra=1))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre")
                                          or {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    calls.clear()
    state_dict = opt.state_dict()
    assert state_dict["extra"] == 1
    opt.load_state_dict(state_dict)
    assert calls == ["sd pre", "sd post", "load pre", "load post"]
