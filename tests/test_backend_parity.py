"""Every backend equals the reference for every optimizer x option x dtype, with compact state
(the default) and with full state, over several epochs so the gains change, on every device present (the reference runs on the CPU). New backends join
by appearing in available_backends(device)."""

import pytest
import torch

from adaptive_lr import ActiveAdamW, ActiveLion, ActiveSGD, available_backends
from adaptive_lr.backends import unavailable_reason
from optim_configs import (
    CONFIGS, DTYPES, HAS_CUDA, LOW_PRECISION, SHAPES, clone_params, device_backends,
    grad_sequence, make_params, on_cpu, run,
)

DEVICE_BACKENDS = device_backends(exclude=("reference",))
STEPS = 14  # 4 boundaries at 3 steps per epoch: the gains move
# (step, param index) pairs without a grad: params skip steps and catch up missed boundaries
SKIP = {(2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (10, 3)}


def _reference_and_backend(config, dtype, device, backend, **overrides):
    """The same run (``overrides``: optimizer keywords) on the reference backend (CPU) and on
    ``backend`` (``device``): the start params, the grads, the reference's params and optimizer,
    and the backend's params and states moved to the CPU."""
    start = make_params(dtype)
    grads = grad_sequence([tuple(p.shape) for p in start], STEPS, dtype)
    ref_params, ref_opt = run(config, dtype, STEPS, "reference", clone_params(start), grads, SKIP,
                              **overrides)
    out_params, out_states = on_cpu(*run(config, dtype, STEPS, backend,
                                         clone_params(start, device=device), grads, SKIP,
                                         **overrides))
    return start, grads, ref_params, ref_opt, out_params, out_states


def _max_error(params, exact):
    return max(((p.double() - e).abs().max().item() for p, e in zip(params, exact)), default=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_backend_matches_reference(device, backend, config, dtype):
    start, grads, ref_params, ref_opt, out_params, out_states = _reference_and_backend(
        config, dtype, device, backend)

    # discrete state is identical: same sign decisions, same gains and epoch sums (of g and of
    # g**2: compact state's stochastic rounding draws the same bits everywhere), same step counts
    for p_ref, s_out in zip(ref_params, out_states):
        s_ref = ref_opt.state[p_ref]
        assert s_ref.keys() == s_out.keys()
        for key in ("prev_sign", "step", "gain", "grad_sum", "grad_sq_sum"):
            if key in s_ref:
                assert torch.equal(s_ref[key], s_out[key]), key
        assert s_out["gain"].dtype == (torch.float32 if dtype == torch.float64 else torch.bfloat16)
        assert s_out.get("grad_sq_sum", s_out["gain"]).dtype == s_out["gain"].dtype
        if device == "cpu" and dtype != torch.float64:
            # the moments too: the reference rounds every product and sum as the kernels do (a
            # GPU may fuse them: Triton's compiler does)
            for key in config.cls.spec.state:
                if key in s_ref:
                    assert torch.equal(s_ref[key], s_out[key]), key
    assert any((ref_opt.state[p]["gain"] != 1).any() for p in ref_params), "gains never moved"

    if dtype == torch.float64:
        for p_ref, p_out, s_out in zip(ref_params, out_params, out_states):
            torch.testing.assert_close(p_out, p_ref.detach(), rtol=1e-10, atol=1e-12)
            for key, value in ref_opt.state[p_ref].items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(s_out[key], value, rtol=1e-10, atol=1e-12)
        return
    # low precision: error against a float64 run at most ~2x the reference's own error
    exact_params, _ = run(config, torch.float64, STEPS, "reference", clone_params(start, torch.float64),
                          [[g.double() for g in step] for step in grads], SKIP)
    ref_error = _max_error(ref_params, exact_params)
    out_error = _max_error(out_params, exact_params)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert out_error <= 2 * ref_error + floor, (out_error, ref_error)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float64], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_full_state_matches_reference(device, backend, config, dtype):
    """state_precision="full" (float32 gains and epoch sums; float64 params always have it):
    the same discrete state as the reference, params as close as with compact state."""
    _, _, ref_params, ref_opt, out_params, out_states = _reference_and_backend(
        config, dtype, device, backend, state_precision="full")
    for p_ref, p_out, s_out in zip(ref_params, out_params, out_states):
        s_ref = ref_opt.state[p_ref]
        assert s_ref.keys() == s_out.keys()
        assert s_out["gain"].dtype == s_out["grad_sum"].dtype == torch.float32
        assert s_out.get("grad_sq_sum", s_out["gain"]).dtype == torch.float32
        for key in ("gain", "grad_sum", "grad_sq_sum", "prev_sign", "step"):
            if key in s_ref:
                assert torch.equal(s_ref[key], s_out[key]), key
        torch.testing.assert_close(p_out, p_ref.detach(), rtol=1e-5, atol=1e-6)
    assert any((ref_opt.state[p]["gain"] != 1).any() for p in ref_params), "gains never moved"


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.cls.spec.offers_bfloat16_moments],
                         ids=lambda c: c.id)
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_bfloat16_moments_match_reference(device, backend, config):
    """state_precision="bfloat16" (ActiveSGD, ActiveLion): the moments in bfloat16, rounded
    stochastically with the bits every backend draws alike, so on the CPU the whole state and
    the params equal the reference's bit for bit. A GPU may fuse the update's multiply-adds, so
    a float32 moment may differ in its last bit and round to the other bfloat16 neighbour: there
    every moment is within one bfloat16 ulp and nearly all are equal (other draws, or rounding
    to nearest, would leave about half of them a step apart after 14 steps). bfloat16 params,
    the option's use; the moments' path is the same for every param dtype."""
    _, _, ref_params, ref_opt, out_params, out_states = _reference_and_backend(
        config, torch.bfloat16, device, backend, state_precision="bfloat16")
    exact = device == "cpu"
    for p_ref, p_out, s_out in zip(ref_params, out_params, out_states):
        s_ref = ref_opt.state[p_ref]
        assert s_ref.keys() == s_out.keys()
        for key, value in s_ref.items():
            if key in config.cls.spec.state:
                assert value.dtype == s_out[key].dtype == torch.bfloat16, key
                if not exact and value.numel():
                    got, expected = s_out[key].float(), value.float()
                    torch.testing.assert_close(got, expected, rtol=2**-7, atol=0, msg=key)
                    assert (got == expected).float().mean() > 0.99, key
                    continue
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, s_out[key]), key
        if exact:
            assert torch.equal(p_out, p_ref.detach())
        else:
            torch.testing.assert_close(p_out, p_ref.detach(), rtol=1e-2, atol=1e-3)
    assert any((ref_opt.state[p]["gain"] != 1).any() for p in ref_params), "gains never moved"


def test_parity_covers_low_precision_and_shapes():
    assert set(LOW_PRECISION) < set(DTYPES) and () in SHAPES
    assert ("cpu", "foreach") in [tuple(param.values) for param in DEVICE_BACKENDS]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the generic tests run on the CPU only")
def test_the_fused_backends_run_on_cuda():
    """On a GPU machine the generic tests must cover the cuda and triton backends there."""
    reasons = {name: unavailable_reason(name, "cuda") for name in ("cuda", "triton")}
    assert {"cuda", "triton"} <= set(available_backends("cuda")), reasons


# the sign test's noise: the Adam family's second moment (its factor k² S / (1 - beta2**t) is 16
# with k = 2, an epoch of 4 steps and a late step, so that 1 - beta2**t is 1), or the epoch's sum
# of g**2 (Q) of ActiveSGD and ActiveLion, k = 4: factor k² = 16 too
NOISE = {ActiveAdamW: ("exp_avg_sq", 2.0), ActiveSGD: ("grad_sq_sum", 4.0),
         ActiveLion: ("grad_sq_sum", 4.0)}


def _one_boundary(cls, backend: str, precision: str, grad_sum: float, noise: float) -> float:
    """The gain after one boundary of ``cls`` whose previous sign was +1, given the epoch sum
    and the noise estimate (factor 16): 3 where the sum counts."""
    p = torch.nn.Parameter(torch.zeros(4))
    key, k = NOISE[cls]
    opt = cls([p], lr=1e-3, steps_per_epoch=None, sign_threshold=k, backend=backend,
              state_precision=precision)
    p.grad = torch.ones(4)
    opt.step()
    state = opt.state[p]
    state["step"].fill_(1e6)
    state[key].fill_(noise)
    state["grad_sum"].fill_(grad_sum)
    state["prev_sign"].fill_(1)
    state["has_prev_sign"].fill_(True)
    opt.end_epoch()
    opt.param_groups[0]["epoch_steps"] = 4
    opt.step()
    return state["gain"].float()[0].item()


@pytest.mark.parametrize("cls", list(NOISE), ids=lambda c: c.__name__)
@pytest.mark.parametrize("precision", ["full", "compact"])
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_sign_test_ties_are_decided_alike_given_the_same_noise(backend, precision, cls):
    """docs/precision.md's guarantee: from the same state every backend takes the same decision,
    an exact tie (G² = 16 v, or 16 Q) included: a tie is no evidence. (Backends whose v differs
    in the last bit, which torch's own ops allow, may decide a tie differently.)"""
    above = float(torch.nextafter(torch.tensor(12.0), torch.tensor(13.0)))
    if precision == "compact":
        above = 12.0625  # the next bfloat16
    assert _one_boundary(cls, backend, precision, 12.0, 9.0) == 1.0  # G² = 144 = 16 · 9: held
    assert _one_boundary(cls, backend, precision, above, 9.0) == 3.0  # just above: grows
    assert _one_boundary(cls, backend, precision, -above, 9.0) == 0.5  # flipped: shrinks
