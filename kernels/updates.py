"""Each optimizer's base update, as the one Triton function the generic kernel
(``active_step.active_step_kernel``) calls for every block of elements, and ``UPDATES``: those
functions by the ``kernel`` name of the optimizer's spec (adaptive_lr/optim/spec.py).

An update is ``update(h, t, lr, theta, g, gamma, state, CT) -> (theta, state)``:

* ``h``: the update's hyperparameters as a tuple of float64 scalars (bools are 0.0 / 1.0), in
  the order its ``UPDATES`` entry names them (``Update.hyper``, which is how the function unpacks
  ``h``): the launch takes them by name (the spec's ``kernel_hyper``) and orders them so,
  refusing a missing or unknown name;
* ``t``: this tensor's step number, this step included (float64, >= 1); ``lr``: float64;
* ``theta``: the param block (already decoupled-weight-decayed when the spec says so), ``g`` the
  gradient block (unscaled, negated under maximize; grad_sum already has it), ``gamma`` the
  gains, all in the compute dtype ``CT`` (float64 for float64 params, else float32);
* ``state``: the state blocks in the spec's ``state_keys`` order, which ``Update.state`` names
  (a tuple whose length is known when the kernel is compiled: an amsgrad maximum is there
  exactly when amsgrad is on).

It returns the new theta and state, in ``CT`` (the kernel stores them). Everything derived from
``h``, ``t`` and ``lr`` alone is the same for every block of a tensor: the compiler hoists it out
of the block loop. Scalars are computed in float64 and rounded to ``CT`` once, in the reference's
association order (adaptive_lr/optim/<name>.py), so that results match it to the ulp.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

from .numerics import bias_corrections, div, radam_rectification, sqrt


@triton.jit
def sgd(h, t, lr, theta, g, gamma, state, CT: tl.constexpr):
    momentum, dampening, nesterov = h
    (buf,) = state
    mu = momentum.to(CT)
    # the buffer starts as a copy of the first gradient (torch.optim.SGD)
    buf = tl.where(t == 1.0, g, buf * mu + (1.0 - dampening).to(CT) * g)
    direction = tl.where(nesterov != 0.0, g + mu * buf, buf)
    return theta - lr.to(CT) * gamma * direction, (buf,)


@triton.jit
def _adam_moments(beta1, beta2, g, state, CT: tl.constexpr):
    """exp_avg, exp_avg_sq (and max_exp_avg_sq when the state has it) updated; returns the new
    state, m, and the second moment the step divides by."""
    m = state[0] * beta1.to(CT) + (1.0 - beta1).to(CT) * g
    v = state[1] * beta2.to(CT) + (1.0 - beta2).to(CT) * g * g
    if len(state) == 3:  # amsgrad: the running maximum of the raw v
        v_max = tl.maximum(state[2], v)
        new_state = (m, v, v_max)
    else:
        v_max = v
        new_state = (m, v)
    return new_state, m, v_max


@triton.jit
def _adam_step(beta1, beta2, eps, t, lr, theta, g, gamma, state, CT: tl.constexpr):
    """The Adam step shared by AdamW and Adam (which differ in their weight decay)."""
    state, m, v = _adam_moments(beta1, beta2, g, state, CT)
    bc1, bc2, _ = bias_corrections(beta1, beta2, t)
    denom = div(sqrt(v, CT), tl.sqrt(bc2).to(CT), CT) + eps.to(CT)
    return theta - div((lr / bc1).to(CT) * gamma * m, denom, CT), state


@triton.jit
def adamw(h, t, lr, theta, g, gamma, state, CT: tl.constexpr):
    beta1, beta2, eps, _amsgrad = h  # amsgrad: the state holds max_exp_avg_sq
    return _adam_step(beta1, beta2, eps, t, lr, theta, g, gamma, state, CT)


@triton.jit
def adam(h, t, lr, theta, g, gamma, state, CT: tl.constexpr):
    beta1, beta2, eps, _amsgrad, weight_decay = h
    # torch.optim.Adam's L2 term: the moments see it, the epoch sum (already added) does not
    g = g + weight_decay.to(CT) * theta
    return _adam_step(beta1, beta2, eps, t, lr, theta, g, gamma, state, CT)


@triton.jit
def radam(h, t, lr, theta, g, gamma, state, CT: tl.constexpr):
    beta1, beta2, eps = h
    state, m, v = _adam_moments(beta1, beta2, g, state, CT)
    bc1, bc2, beta2_t = bias_corrections(beta1, beta2, t)
    rectified, rect = radam_rectification(beta2, beta2_t, t)
    lr_c = lr.to(CT)
    m_hat = div(m, bc1.to(CT), CT)
    adapted = div(lr_c * gamma * rect.to(CT) * m_hat * tl.sqrt(bc2).to(CT),
                  sqrt(v, CT) + eps.to(CT), CT)
    return theta - tl.where(rectified, adapted, lr_c * gamma * m_hat), state


@triton.jit
def adabelief(h, t, lr, theta, g, gamma, state, CT: tl.constexpr):
    beta1, beta2, eps, _amsgrad, rectify = h  # amsgrad: the state holds max_exp_avg_var
    eps_c = eps.to(CT)
    m = state[0] * beta1.to(CT) + (1.0 - beta1).to(CT) * g
    residual = g - m  # the "belief": g's deviation from the new mean, eps accumulating in s
    s = state[1] * beta2.to(CT) + (1.0 - beta2).to(CT) * residual * residual + eps_c
    if len(state) == 3:
        s_max = tl.maximum(state[2], s)
        new_state = (m, s, s_max)
    else:
        s_max = s
        new_state = (m, s)
    bc1, bc2, beta2_t = bias_corrections(beta1, beta2, t)
    rectified, rect = radam_rectification(beta2, beta2_t, t)
    rectified = rectified | (rectify == 0.0)  # rectify off: always the adaptive step, r_t = 1
    rect = tl.where(rectify != 0.0, rect, 1.0)
    denom = div(sqrt(s_max, CT), tl.sqrt(bc2).to(CT), CT) + eps_c
    adapted = div((lr * rect / bc1).to(CT) * gamma * m, denom, CT)
    plain = div(lr.to(CT) * gamma * m, bc1.to(CT), CT)
    return theta - tl.where(rectified, adapted, plain), new_state


@triton.jit
def lion(h, t, lr, theta, g, gamma, state, CT: tl.constexpr):
    beta1, beta2 = h
    (m,) = state
    c = m * beta1.to(CT) + g * (1.0 - beta1).to(CT)
    direction = (c > 0).to(CT) - (c < 0).to(CT)  # sign, 0 for 0 and NaN
    theta = theta - lr.to(CT) * gamma * direction
    return theta, (m * beta2.to(CT) + (1.0 - beta2).to(CT) * g,)


class Update(NamedTuple):
    """An update and what it takes, by the names the spec and the C++ kernel's tag use
    (tests/test_kernel_metadata.py checks that the three agree)."""

    function: Any  # the @triton.jit update
    hyper: tuple[str, ...]  # its hyperparameters, in the order it unpacks h
    state: tuple[str, ...]  # its state blocks, in order (amsgrad's maximum last)
    # the index of the state the sign test reads (its hyper then has beta2); None: the test
    # reads the epoch's sum of g**2 (a row of its own)
    second_moment: int | None = None


_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
UPDATES = {
    "sgd": Update(sgd, ("momentum", "dampening", "nesterov"), ("momentum_buffer",)),
    "adamw": Update(adamw, ("beta1", "beta2", "eps", "amsgrad"), _ADAM_STATE, second_moment=1),
    "adam": Update(adam, ("beta1", "beta2", "eps", "amsgrad", "weight_decay"), _ADAM_STATE,
                   second_moment=1),
    "radam": Update(radam, ("beta1", "beta2", "eps"), _ADAM_STATE[:2], second_moment=1),
    "adabelief": Update(adabelief, ("beta1", "beta2", "eps", "amsgrad", "rectify"),
                        ("exp_avg", "exp_avg_var", "max_exp_avg_var"), second_moment=1),
    "lion": Update(lion, ("beta1", "beta2"), ("exp_avg",)),
}
