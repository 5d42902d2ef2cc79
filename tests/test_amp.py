"""AMP: grad_scale divides the gradient, found_inf skips the step's own work but not a pending
boundary, and torch.amp.GradScaler drives every backend through the same path, on every device
present."""

import copy

import pytest
import torch

from adaptive_lr import ActiveAdamW, ActiveLion, ActiveSGD
from adaptive_lr.backends import (
    Boundary, apply_boundary, grad_sq_sum_floor, sign_test_floor, state_dtype,
)
from adaptive_lr.backends.rounding import element_index, rounding_key
from optim_configs import (
    CONFIGS, clone_params, config, configs, device_backends, grad_sequence, make_params,
)

DEVICE_BACKENDS = device_backends()


def _params_and_grads(steps, device):
    params = clone_params(make_params(torch.float32), device=device)
    grads = grad_sequence([tuple(p.shape) for p in params], steps, torch.float32)
    return params, [[g.to(device) for g in step] for step in grads]


def _expected_after_skipped_step(opt, params, pending: Boundary) -> list[dict]:
    """Each param's state after an overflow step: as now, except that a pending boundary is
    applied (by the reference, the oracle) and rolls the param's epoch."""
    group = opt.param_groups[0]
    rule = opt.spec.record(group).gain_rule()
    expected = [copy.deepcopy(opt.state[p]) for p in params]
    for p, state in zip(params, expected):
        if pending != Boundary.NONE:
            grad_sq_sum = state.get("grad_sq_sum")  # read by the sign test, then reset
            floor = None
            if grad_sq_sum is not None:
                floor = grad_sq_sum_floor(grad_sq_sum, rule, state_dtype(p.dtype))
            elif rule.sign_threshold != 0:
                floor = sign_test_floor(state[opt.spec.second_moment], state["step"].item(), rule,
                                        group["epoch_steps"], group["betas"][1])
            # a compact gain is rounded with the key the skipped step would have had
            rounding = None if "rounding_seed" not in state else (
                rounding_key(int(state["rounding_seed"]), state["step"].item() + 1),
                element_index(p))
            apply_boundary(pending, state["gain"], state["grad_sum"], state["prev_sign"], rule,
                           floor, rounding, grad_sq_sum)
            state["epoch"].fill_(group["epoch"])
            state["has_prev_sign"].fill_(True)
    return expected


def _assert_state_equal(opt, params, expected: list[dict]) -> None:
    for p, expected_state in zip(params, expected):
        state = opt.state[p]
        assert state.keys() == expected_state.keys()
        for key, value in expected_state.items():
            assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value, key


# Steps before the overflow step, and the boundary that step then has pending: (mid-epoch), the
# params' first boundary (ROLL), and a boundary that compares signs and moves the gains (UPDATE).
PENDING = {4: Boundary.NONE, 3: Boundary.ROLL, 6: Boundary.UPDATE}


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize("steps_before", PENDING, ids=lambda n: PENDING[n].name)
def test_found_inf_skips_all_but_the_boundary(device, backend, config, steps_before):
    """An overflow step (non-finite grads, found_inf set) changes no param, no state tensor and
    no step count, on every backend; only a pending boundary is applied."""
    _check_skipped_step(device, backend, config, steps_before)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("cls", [ActiveSGD, ActiveLion], ids=lambda c: c.__name__)
def test_found_inf_leaves_bfloat16_moments_as_they_were(device, backend, cls):
    """The same with state_precision="bfloat16", at a step with a boundary that moves gains."""
    _check_skipped_step(device, backend, config("defaults", cls=cls), 6,
                        state_precision="bfloat16")


def _check_skipped_step(device, backend, config, steps_before, **kwargs):
    params, grads = _params_and_grads(steps_before, device)
    opt = config.make(params, backend=backend, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    pending = PENDING[steps_before]
    assert opt.param_groups[0]["boundary_pending"] == (pending != Boundary.NONE)
    before_params = [p.detach().clone() for p in params]
    expected = _expected_after_skipped_step(opt, params, pending)
    if pending == Boundary.UPDATE:
        assert any((state["gain"] != 1).any() for state in expected)  # the boundary moves gains
    for i, p in enumerate(params):  # what an fp16 overflow leaves in the grads
        p.grad = torch.full_like(p, (float("inf"), float("nan"), -float("inf"))[i % 3])
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    clock = opt.param_groups[0]["steps_in_epoch"]
    opt.step()
    del opt.grad_scale, opt.found_inf
    for p, q in zip(params, before_params):
        assert torch.equal(p, q)
    _assert_state_equal(opt, params, expected)
    assert opt.param_groups[0]["steps_in_epoch"] == (1 if pending != Boundary.NONE else clock + 1)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    adamw = config("defaults", cls=ActiveAdamW)
    params, grads = _params_and_grads(7, device)
    plain_params, scaled_params = clone_params(params), clone_params(params)
    plain, scaled = adamw.make(plain_params, backend=backend), adamw.make(scaled_params, backend=backend)
    for step_grads in grads:
        for p, q, g in zip(plain_params, scaled_params, step_grads):
            p.grad, q.grad = g.clone(), g * 1024.0
        plain.step()
        scaled.grad_scale = torch.tensor(1024.0, device=device)
        scaled.found_inf = torch.tensor(0.0, device=device)
        scaled.step()
    for p, q in zip(plain_params, scaled_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(scaled.state[q]["grad_sum"], plain.state[p]["grad_sum"])


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("config", configs("defaults"), ids=lambda c: c.id)
def test_grad_scaler_overflow_step_changes_no_state(device, backend, config):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(device)
    params = list(model.parameters())
    opt = config.make(params, backend=backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    x = torch.randn(8, 4).to(device)
    for t in range(8):
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        if t in (4, 6):  # overflows mid-epoch and with an UPDATE boundary pending
            model.weight.grad[0, 0] = float("inf")
            pending = Boundary.UPDATE if opt.param_groups[0]["boundary_pending"] else Boundary.NONE
            expected = _expected_after_skipped_step(opt, params, pending)
            before_params = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if t in (4, 6):
            assert all(torch.equal(p, q) for p, q in zip(params, before_params))
            _assert_state_equal(opt, params, expected)
    assert opt.state[model.weight]["step"].item() == 6  # 8 calls, two skipped
    assert opt.param_groups[0]["epoch"] == 2  # the clock counted all 8 calls
    assert scaler.get_scale() < 2.0**8  # the scaler saw the overflows
