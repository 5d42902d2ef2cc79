"""Compact state (state_precision="compact", the default): what it stores, its roundings, its errors, and
checkpoints that convert between full and compact state; and state_precision="bfloat16" (compact,
and the momentum of ActiveSGD and ActiveLion in bfloat16 too). Backend parity is in
test_backend_parity.py and test_triton_backend.py."""

import io
import warnings

import pytest
import torch

from adaptive_lr import ActiveAdamW, ActiveLion, ActiveSGD
from adaptive_lr.backends import rounding
from adaptive_lr.backends.rounding import bfloat16_stochastic, element_index, mix32, rounding_key
from optim_configs import config, grad_sequence, make_params, run

ADAMW = config("defaults", cls=ActiveAdamW)
SGD = config("defaults", cls=ActiveSGD)


def test_compact_state_is_five_bytes_per_param_beside_the_base_state():
    params = make_params(torch.float32, shapes=[(1000,), (24, 5)])
    full = run(ADAMW, torch.float32, 4, params=[p.detach().clone().requires_grad_() for p in params],
               state_precision="full")[1]
    compact = run(ADAMW, torch.float32, 4, params=params)[1]  # the default

    def active_bytes(opt, keys=("gain", "grad_sum", "prev_sign")):
        return sum(opt.state[p][k].nbytes for p in opt.state for k in keys)

    numel = 1000 + 120
    assert active_bytes(full) == 9 * numel
    assert active_bytes(compact) == 5 * numel
    for state in compact.state.values():
        assert state["rounding_seed"].dtype == torch.int64 and state["rounding_seed"].device.type == "cpu"
    # the seeds are the params' indices in the optimizer: distinct, and the same on every rank
    assert sorted(int(s["rounding_seed"]) for s in compact.state.values()) == [0, 1]


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.full((1 << 16,), 1.0 + 0.3 * 2**-7)  # 0.3 bfloat16 ulps above 1
    rounded = bfloat16_stochastic(x, rounding_key(3, 5), element_index(x)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs((rounded == 1.0 + 2**-7).float().mean().item() - 0.3) < 0.01
    exact = torch.tensor([2.0, -0.5, float("inf"), float("-inf"), 0.0])
    assert torch.equal(bfloat16_stochastic(exact, 7, element_index(exact)).float(), exact)
    assert bfloat16_stochastic(torch.tensor([float("nan")]), 7, torch.zeros(1, dtype=torch.long)).isnan().all()


def test_the_hash_is_math_h_lowbias32():
    # values computed with the C++ definition (uint32 arithmetic)
    assert mix32(0) == 0
    for x in (1, 2, 12345, 0xFFFFFFFF, 0x80000000):
        assert mix32(x) == _lowbias32(x)
        assert int(mix32(torch.tensor([x]))[0]) == _lowbias32(x)


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_the_epoch_sum_tracks_the_float32_sum():
    """Over an epoch of many steps the stochastically rounded bfloat16 sum stays close to the
    float32 sum (unbiased: its error grows like sqrt(steps) ulps, not like steps)."""
    params = make_params(torch.float32, shapes=[(4096,)])
    grads = grad_sequence([(4096,)], 200, torch.float32)
    full = run(ADAMW, torch.float32, 200, params=[params[0].detach().clone().requires_grad_()],
               grads=grads, steps_per_epoch=1000, state_precision="full")
    compact = run(ADAMW, torch.float32, 200, params=params, grads=grads, steps_per_epoch=1000)
    exact = full[1].state[full[0][0]]["grad_sum"]
    stored = compact[1].state[compact[0][0]]["grad_sum"].float()
    ulps = (stored - exact) / (exact.abs() * 2**-8).clamp_min(1e-30)  # in bfloat16 ulps
    assert ulps.abs().median() < 200**0.5  # a truncating rounding drifts ~100 ulps here
    error = stored - exact  # no bias: its mean is within 4 standard errors of 0
    assert abs(error.mean()) < 4 * error.std() / error.numel()**0.5
    assert (torch.sign(stored) == torch.sign(exact)).float().mean() > 0.99


def test_a_bad_state_precision_is_refused():
    with pytest.raises(ValueError, match="unknown state_precision 'half'"):
        ActiveAdamW([torch.zeros(3, requires_grad=True)], steps_per_epoch=2, state_precision="half")


def test_float64_params_keep_full_state_beside_compact_ones():
    """A float64 param's math is float64: compact state would cost it exactness for 4 bytes.
    Its bucket (one dtype) runs with float32 gains and sums; the float32 param's with bfloat16."""
    params = [torch.randn(5, dtype=torch.float64, requires_grad=True),
              torch.randn(5, requires_grad=True)]
    opt = ActiveSGD(params, lr=0.1, steps_per_epoch=2)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    wide, narrow = (opt.state[p] for p in params)
    assert wide["gain"].dtype == wide["grad_sum"].dtype == torch.float32
    assert "rounding_seed" not in wide
    assert narrow["gain"].dtype == narrow["grad_sum"].dtype == torch.bfloat16


def _saved(opt) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(("config", "precision"), [(ADAMW, "compact"), (SGD, "bfloat16")],
                         ids=["compact", "bfloat16"])
def test_a_checkpoint_resumes_bit_for_bit(backend, config, precision):
    dtype = torch.float32
    grads = grad_sequence([(5, 3), (17,)], 10, dtype)
    params, opt = run(config, dtype, 5, backend, make_params(dtype, shapes=[(5, 3), (17,)]),
                      grads[:5], state_precision=precision)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = config.make(resumed_params, backend=backend, state_precision=precision)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to round
        resumed.load_state_dict(_saved(opt))
    for step in grads[5:]:
        for both in ((params, opt), (resumed_params, resumed)):
            for p, g in zip(both[0], step):
                p.grad = g.clone()
            both[1].step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def test_checkpoints_convert_between_full_and_compact_state():
    dtype = torch.float32
    params, full = run(ADAMW, dtype, 7, params=make_params(dtype, shapes=[(40,)]),
                       state_precision="full")
    saved = _saved(full)
    compact = ADAMW.make([params[0].detach().clone()])
    with pytest.warns(UserWarning, match="rounded to the nearest bfloat16"):
        compact.load_state_dict(saved)
    state, before = next(iter(compact.state.values())), saved["state"][0]
    assert state["gain"].dtype == state["grad_sum"].dtype == torch.bfloat16
    assert torch.equal(state["gain"], before["gain"].bfloat16())  # round to nearest
    assert torch.equal(state["grad_sum"], before["grad_sum"].bfloat16())
    assert torch.equal(state["exp_avg"], before["exp_avg"])  # moments are untouched
    assert int(state["rounding_seed"]) == 0

    # back to full state: bfloat16 values widen exactly, nothing is lost, nothing is said
    back = ADAMW.make([params[0].detach().clone()], state_precision="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back.load_state_dict(_saved(compact))
    widened = next(iter(back.state.values()))
    assert widened["gain"].dtype == torch.float32 and "rounding_seed" not in widened
    assert torch.equal(widened["gain"], state["gain"].float())


def test_a_bad_rounding_seed_is_refused_and_changes_nothing():
    params, opt = run(ADAMW, torch.float32, 2, params=make_params(torch.float32, shapes=[(4,)]))
    saved = _saved(opt)
    saved["state"][0]["rounding_seed"] = torch.tensor(-1)
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match="rounding_seed=-1"):
        opt.load_state_dict(saved)
    assert all(torch.equal(before[k], v) for k, v in opt.state[params[0]].items())


def test_the_fused_op_checks_compact_arguments():
    import adaptive_lr._C  # noqa: F401  (registers the op)

    p, g = torch.zeros(4), torch.ones(4)
    common = dict(kernel="sgd", params=[p], grads=[g], grad_sq_sums=[],
                  prev_signs=[torch.zeros(4, dtype=torch.int8)],
                  steps=[torch.zeros(())], states=[torch.zeros(4)], lr=torch.tensor(0.1),
                  hyper=[0.0, 0.0, 0.0], weight_decay=0.0, maximize=False, gain_inc=2.0,
                  gain_dec=0.5, min_gain=0.0, max_gain=float("inf"), sign_threshold=0.0,
                  relax_gains=False,
                  epoch_steps=0, boundary=0, grad_scale=None, found_inf=None)
    op = torch.ops.adaptive_lr.active_step_
    bf16 = dict(gains=[torch.ones(4, dtype=torch.bfloat16)], grad_sums=[torch.zeros(4, dtype=torch.bfloat16)])
    with pytest.raises(RuntimeError, match="one rounding seed per param"):
        op(**common, **bf16, rounding_seeds=[])
    with pytest.raises(RuntimeError, match="rounding_seeds are for compact state"):
        op(**common, gains=[torch.ones(4)], grad_sums=[torch.zeros(4)], rounding_seeds=[1])
    with pytest.raises(RuntimeError, match=r"grad_sums\[0\] must have dtype BFloat16"):
        op(**common, gains=bf16["gains"], grad_sums=[torch.zeros(4)], rounding_seeds=[1])
    with pytest.raises(RuntimeError, match=r"rounding_seeds\[0\] must be in \[0, 2\*\*32\)"):
        op(**common, **bf16, rounding_seeds=[2**32])
    assert torch.equal(p, torch.zeros(4))  # nothing was written
    op(**common, **bf16, rounding_seeds=[1])
    assert torch.equal(p, torch.full((4,), -0.1))


# ---- state_precision="bfloat16": the momentum in bfloat16 too ----------------------------------


@pytest.mark.parametrize(("cls", "moment"), [(ActiveSGD, "momentum_buffer"), (ActiveLion, "exp_avg")])
def test_bfloat16_state_keeps_the_momentum_in_bfloat16(cls, moment):
    """Two bytes per param less than compact state; a float64 param keeps its float64 moment and
    float32 gains, as under compact state."""
    params = [torch.randn(5, dtype=torch.float64, requires_grad=True),
              torch.randn(5, requires_grad=True), torch.randn(5, dtype=torch.bfloat16, requires_grad=True)]
    opt = cls(params, lr=1e-2, steps_per_epoch=2, state_precision="bfloat16")
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    wide, *narrow = (opt.state[p] for p in params)
    assert wide[moment].dtype == torch.float64 and wide["gain"].dtype == torch.float32
    for state in narrow:
        assert state[moment].dtype == state["gain"].dtype == state["grad_sum"].dtype == torch.bfloat16
        assert "rounding_seed" in state


def test_bfloat16_state_is_refused_where_there_is_a_second_moment():
    with pytest.raises(ValueError, match="ActiveAdamW does not offer: its state has a second moment"):
        ActiveAdamW([torch.zeros(3, requires_grad=True)], steps_per_epoch=2,
                    state_precision="bfloat16")


def test_the_bfloat16_momentum_is_unbiased():
    """SGD's buffer under a constant gradient g converges to g / (1 - momentum): 10.01 for g =
    1.001, between the bfloat16 values 10 and 10.0625. Rounded to nearest it would stop at 10 (an
    update below half an ulp is lost); rounded stochastically its mean over the elements is the
    float32 buffer's, and every element is one of the two neighbours."""
    n = 1 << 14
    params = [torch.zeros(n, requires_grad=True), torch.zeros(n, requires_grad=True)]
    kwargs = dict(lr=1e-9, steps_per_epoch=1000, momentum=0.9)
    exact = ActiveSGD([params[0]], state_precision="compact", **kwargs)
    narrow = ActiveSGD([params[1]], state_precision="bfloat16", **kwargs)
    for _ in range(150):
        for p, opt in zip(params, (exact, narrow)):
            p.grad = torch.full((n,), 1.001)
            opt.step()
    target = exact.state[params[0]]["momentum_buffer"]
    stored = narrow.state[params[1]]["momentum_buffer"].float()
    torch.testing.assert_close(target, torch.full((n,), 10.01), rtol=1e-5, atol=0)
    assert set(stored.unique().tolist()) == {10.0, 10.0625}
    error = stored - target  # no bias: its mean is within 4 standard errors of 0
    assert abs(error.mean()) < 4 * error.std() / n**0.5


def test_checkpoints_convert_between_compact_and_bfloat16_state():
    dtype = torch.float32
    params, compact = run(SGD, dtype, 7, params=make_params(dtype, shapes=[(40,)]))
    saved = _saved(compact)
    narrow = SGD.make([params[0].detach().clone()], state_precision="bfloat16")
    with pytest.warns(UserWarning, match="float32 moments; .* rounded to the nearest bfloat16"):
        narrow.load_state_dict(saved)
    state, before = next(iter(narrow.state.values())), saved["state"][0]
    assert torch.equal(state["momentum_buffer"], before["momentum_buffer"].bfloat16())
    assert torch.equal(state["gain"], before["gain"])  # compact already: loaded exactly
    # back to compact state: the bfloat16 momentum widens exactly, nothing is said
    back = SGD.make([params[0].detach().clone()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back.load_state_dict(_saved(narrow))
    widened = next(iter(back.state.values()))["momentum_buffer"]
    assert widened.dtype == torch.float32 and torch.equal(widened, state["momentum_buffer"].float())


def test_the_fused_op_checks_bfloat16_moments():
    import adaptive_lr._C  # noqa: F401  (registers the op)

    p, g = torch.zeros(4), torch.ones(4)
    bf16 = lambda *values: torch.tensor(values, dtype=torch.bfloat16)  # noqa: E731
    common = dict(params=[p], grads=[g], grad_sq_sums=[],
                  prev_signs=[torch.zeros(4, dtype=torch.int8)], steps=[torch.zeros(())],
                  lr=torch.tensor(0.1), weight_decay=0.0, maximize=False, gain_inc=2.0,
                  gain_dec=0.5, min_gain=0.0, max_gain=float("inf"), sign_threshold=0.0,
                  relax_gains=False,
                  epoch_steps=0, boundary=0, grad_scale=None, found_inf=None)
    compact = dict(gains=[bf16(1, 1, 1, 1)], grad_sums=[bf16(0, 0, 0, 0)], rounding_seeds=[1])
    op = torch.ops.adaptive_lr.active_step_
    with pytest.raises(RuntimeError, match="kernel 'adamw' keeps a second moment"):
        op(**common, **compact, kernel="adamw", states=[bf16(0, 0, 0, 0)] * 2,
           hyper=[0.9, 0.999, 1e-8, 0.0])
    with pytest.raises(RuntimeError, match="bfloat16 moments .* need compact state too"):
        op(**common, kernel="sgd", gains=[torch.ones(4)], grad_sums=[torch.zeros(4)],
           rounding_seeds=[], states=[bf16(0, 0, 0, 0)], hyper=[0.0, 0.0, 0.0])
    assert torch.equal(p, torch.zeros(4))  # nothing was written
    moment = bf16(0, 0, 0, 0)
    op(**common, **compact, kernel="sgd", states=[moment], hyper=[0.0, 0.0, 0.0])
    assert torch.equal(p, torch.full((4,), -0.1)) and torch.equal(moment, bf16(1, 1, 1, 1))


def test_switching_from_torch_sgd_names_what_was_rounded():
    """torch's SGD keeps a float16 param's momentum in float16: the warning says so."""
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.float16))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p)
    sgd.step()
    with pytest.warns(UserWarning, match=r"keeps float16 moments; .*\(state_precision='bfloat16'\)"
                                         r".*a moment may move by 0\.2 %\)"):
        ActiveSGD.from_optimizer(sgd, steps_per_epoch=4, state_precision="bfloat16")


def test_the_batched_rounding_hashes_in_int32_where_the_device_wraps(monkeypatch):
    """The foreach backend's batches hash in int32 where int32 products wrap (every CPU), and
    store the same bits as the int64 hash that a device without wrapping gets."""
    assert rounding.int32_wraps(torch.device("cpu"))
    values = 2**31 + torch.arange(50_000, dtype=torch.int64) * 104_729 & rounding.MASK32
    narrow = rounding.mix32(values.to(torch.int32), torch.empty(50_000, dtype=torch.int32))
    assert torch.equal(narrow.to(torch.int64) & rounding.MASK32, rounding.mix32(values.clone()))
    params = [torch.zeros(70_000), torch.zeros(3, 5)]
    sums = {}
    for wraps in (True, False):
        monkeypatch.setattr(rounding, "int32_wraps", lambda device, wraps=wraps: wraps)
        sums[wraps] = [torch.full_like(p, 1.0, dtype=torch.bfloat16) for p in params]
        rounding.accumulate_stochastic(sums[wraps], [torch.full_like(p, 0.003) for p in params],
                                       [(key, p) for key, p in zip((7, 2**32 - 3), params)])
    assert all(torch.equal(a, b) for a, b in zip(sums[True], sums[False]))
    assert len(sums[True][0].unique()) == 2  # rounded stochastically: both neighbours drawn
