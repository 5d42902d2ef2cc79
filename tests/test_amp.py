"""AMP: grad_scale divides the gradient, found_inf skips the step's own work but not a pending
boundary, and torch.amp.GradScaler drives every backend through the same path."""

import copy

import pytest
import torch

from adaptive_lr import available_backends
from optim_configs import CONFIGS, clone_params, grad_sequence, make_params

BACKENDS = available_backends("cpu")


def _params_and_grads(steps):
    params = make_params(torch.float32)
    return params, grad_sequence([tuple(p.shape) for p in params], steps, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_found_inf_skips_all_but_the_boundary(backend, config):
    params, grads = _params_and_grads(4)
    opt = config.make(params, backend=backend)
    for step_grads in grads[:3]:  # ends epoch 1 (3 steps): a boundary is pending
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    assert opt.param_groups[0]["boundary_pending"]
    before = copy.deepcopy(opt.state_dict())
    before_params = [p.detach().clone() for p in params]
    for p, g in zip(params, grads[3]):
        p.grad = g.clone()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    for p, q in zip(params, before_params):
        assert torch.equal(p, q)
    for index, p in enumerate(params):
        state, old = opt.state[p], before["state"][index]
        for key in ("step", *(k for k in old if k not in ("step", "gain", "grad_sum", "prev_sign",
                                                           "epoch", "has_prev_sign"))):
            assert torch.equal(state[key], old[key]), key
        # the boundary rolled the epoch sum over even though the step was skipped
        assert torch.equal(state["prev_sign"], torch.sign(old["grad_sum"]).to(torch.int8))
        assert not state["grad_sum"].any()
    assert opt.param_groups[0]["steps_in_epoch"] == 1  # the clock counts step() calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_unscales(backend):
    config = CONFIGS[4]  # ActiveAdamW defaults
    params, grads = _params_and_grads(7)
    plain_params, scaled_params = clone_params(params), clone_params(params)
    plain, scaled = config.make(plain_params, backend=backend), config.make(scaled_params, backend=backend)
    for step_grads in grads:
        for p, q, g in zip(plain_params, scaled_params, step_grads):
            p.grad, q.grad = g.clone(), g * 1024.0
        plain.step()
        scaled.grad_scale, scaled.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        scaled.step()
    for p, q in zip(plain_params, scaled_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(scaled.state[q]["grad_sum"], plain.state[p]["grad_sum"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_overflow_step_changes_no_state(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = CONFIGS[4].make(model.parameters(), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(8, 4)
    for t in range(5):
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        if t == 3:
            model.weight.grad[0, 0] = float("inf")
            before = copy.deepcopy(opt.state_dict())
            before_params = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if t == 3:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before_params))
            for index, state in before["state"].items():
                assert torch.equal(opt.state_dict()["state"][index]["exp_avg"], state["exp_avg"])
                assert torch.equal(opt.state_dict()["state"][index]["step"], state["step"])
    assert opt.state[model.weight]["step"].item() == 4  # 5 calls, one skipped
    assert scaler.get_scale() < 2.0**8  # the scaler saw the overflow
