"""With every gain still 1 (the first two epochs) each Active optimizer is its base optimizer."""

import math

import pytest
import torch
from adabelief_pytorch import AdaBelief
from lion_pytorch import Lion

from adaptive_lr import ActiveAdaBelief, ActiveAdam, ActiveAdamW, ActiveLion, ActiveRAdam, ActiveSGD
from optim_configs import grad_sequence, make_params

STEPS_PER_EPOCH = 4
TWO_EPOCHS = 2 * STEPS_PER_EPOCH

PAIRS = [
    (ActiveSGD, dict(), torch.optim.SGD, dict(momentum=0.9)),
    (ActiveSGD, dict(nesterov=True), torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
    (ActiveSGD, dict(momentum=0.5, dampening=0.3, maximize=True),
     torch.optim.SGD, dict(momentum=0.5, dampening=0.3, maximize=True)),
    (ActiveAdamW, dict(), torch.optim.AdamW, dict()),
    (ActiveAdamW, dict(amsgrad=True, maximize=True, weight_decay=0.1),
     torch.optim.AdamW, dict(amsgrad=True, maximize=True, weight_decay=0.1)),
    (ActiveAdam, dict(), torch.optim.Adam, dict()),
    (ActiveAdam, dict(amsgrad=True, maximize=True, weight_decay=0.1),
     torch.optim.Adam, dict(amsgrad=True, maximize=True, weight_decay=0.1)),
    (ActiveAdam, dict(decoupled_weight_decay=True, weight_decay=0.1), torch.optim.Adam,
     dict(decoupled_weight_decay=True, weight_decay=0.1)),
    (ActiveLion, dict(weight_decay=0.1), Lion, dict(weight_decay=0.1)),
    (ActiveLion, dict(betas=(0.8, 0.95)), Lion, dict(betas=(0.8, 0.95))),
    (ActiveRAdam, dict(weight_decay=0.1), torch.optim.RAdam,
     dict(weight_decay=0.1, decoupled_weight_decay=True)),
    # a small beta2 reaches rho_t > 5 within the two epochs: both RAdam branches are compared
    (ActiveRAdam, dict(betas=(0.9, 0.9), maximize=True), torch.optim.RAdam,
     dict(betas=(0.9, 0.9), maximize=True)),
    (ActiveAdaBelief, dict(rectify=False, weight_decay=0.1, eps=1e-12), AdaBelief,
     dict(rectify=False, weight_decay=0.1, eps=1e-12, weight_decouple=True, print_change_log=False)),
    (ActiveAdaBelief, dict(rectify=False, amsgrad=True), AdaBelief,
     dict(rectify=False, amsgrad=True, eps=1e-16, weight_decouple=True, print_change_log=False)),
]


def _trajectory(make_opt, steps):
    params = make_params(torch.float64)
    grads = grad_sequence([tuple(p.shape) for p in params], steps, torch.float64)
    opt = make_opt(params)
    history = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("active_cls,active_kwargs,base_cls,base_kwargs", PAIRS,
                         ids=[f"{a.__name__}-{i}" for i, (a, *_r) in enumerate(PAIRS)])
def test_first_two_epochs_equal_base_optimizer(backend, active_cls, active_kwargs, base_cls, base_kwargs):
    lr = 1e-2
    # the paper's rule, whose first comparison moves gains (the sign test may hold them all)
    paper_rule = {"sign_threshold": 0.0}
    active, opt = _trajectory(
        lambda ps: active_cls(ps, lr=lr, steps_per_epoch=STEPS_PER_EPOCH, backend=backend,
                              **paper_rule, **active_kwargs),
        TWO_EPOCHS + 1,
    )
    base, _ = _trajectory(lambda ps: base_cls(ps, lr=lr, **base_kwargs), TWO_EPOCHS + 1)
    for t in range(TWO_EPOCHS):
        for a, b in zip(active[t], base[t]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the first step of epoch 3 applies the first gain update: now they must differ
    assert any(not torch.allclose(a, b, rtol=1e-9, atol=0) for a, b in zip(active[-1], base[-1]))
    assert any((opt.state[p]["gain"] != 1).any() for p in opt.param_groups[0]["params"])


def test_adabelief_rectified_matches_transcription():
    """rectify=True: RAdam's threshold, a bias-corrected momentum step below (docs/algorithm.md)."""
    lr, (b1, b2), eps = 1e-2, (0.9, 0.9), 1e-16
    p = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    opt = ActiveAdaBelief([p], lr=lr, betas=(b1, b2), eps=eps, steps_per_epoch=100, backend="reference")
    theta, m, s = p.detach().clone(), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    rho_inf = 2 / (1 - b2) - 1
    branches = set()
    grads = [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.7, 0.1], [0.2, -0.3], [0.4, 0.4], [-0.1, 0.6], [0.3, 0.3]]
    for t, g in enumerate(grads, start=1):
        g = torch.tensor(g, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        rho_t = rho_inf - 2 * t * b2**t / bc2
        if rho_t > 5:
            r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            theta = theta - lr * r / bc1 * m / (s.sqrt() / math.sqrt(bc2) + eps)
        else:
            theta = theta - lr * m / bc1
        branches.add(rho_t > 5)
        torch.testing.assert_close(p.detach(), theta, rtol=1e-13, atol=1e-15)
    assert branches == {True, False}
