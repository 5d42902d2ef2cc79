"""The table of optimizer configurations every generic test iterates (like torch's
common_optimizers.py), the (device, backend) pairs they run on, and the helpers that run them on
seeded random data."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from adaptive_lr import (
    ActiveAdaBelief, ActiveAdam, ActiveAdamW, ActiveLion, ActiveRAdam, ActiveSGD, available_backends,
)

HAS_CUDA = torch.cuda.is_available()
# "cuda" only where a device is present: without one the cuda cases are not generated at all
# (test_backend_parity's test_the_fused_backends_run_on_cuda is the one skip that says so)
DEVICES = ("cpu", "cuda") if HAS_CUDA else ("cpu",)


def device_backends(exclude=(), only=None) -> list:
    """pytest params ``(device, backend)``: each backend available on each device present (those
    in ``only``, if given, and not in ``exclude``). The cuda ones are marked ``cuda`` and named
    "cuda-<backend>"; the cpu ones keep the backend's name as their id."""
    params = []
    for device in DEVICES:
        for backend in available_backends(device):
            if backend in exclude or (only is not None and backend not in only):
                continue
            if device == "cpu":
                params.append(pytest.param(device, backend, id=backend))
            else:
                params.append(pytest.param(device, backend, id=f"{device}-{backend}",
                                           marks=pytest.mark.cuda))
    return params


def on_cpu(params, opt) -> tuple[list[torch.Tensor], list[dict]]:
    """The params (detached) and their optimizer states, every tensor copied to the CPU, so that
    results from any device compare with the reference's."""
    states = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
              for p in params]
    return [p.detach().cpu() for p in params], states

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Odd shapes on purpose: a scalar, lengths that are not multiples of any SIMD width.
SHAPES = [(5, 3), (17,), (), (2, 3, 4), (65,)]


@dataclass(frozen=True)
class OptimConfig:
    """One row of the table: an optimizer with some options, and tags naming what it covers."""

    cls: type
    kwargs: dict = field(default_factory=dict)
    tags: frozenset = frozenset()

    @property
    def id(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}({args})"

    def make(self, params, **overrides):
        # The paper's rule unless the row sets sign_threshold (the "sign_test" rows): in the
        # table's epochs of 3 steps the default sign test (k = 2) passes no sum and would hold
        # every gain at 1, leaving the gain rule untested.
        kwargs = {"lr": 1e-2, "steps_per_epoch": 3, "sign_threshold": 0.0, **self.kwargs,
                  **overrides}
        return self.cls(params, **kwargs)


def _config(cls, tags="", **kwargs) -> OptimConfig:
    return OptimConfig(cls, kwargs, frozenset(tags.split()))


# Every option of every optimizer, alone or combined (tags: what a row covers; "defaults" is the
# optimizer at its defaults). Tests choose rows by tag, never by position.
CONFIGS = [
    _config(ActiveSGD, "defaults"),
    _config(ActiveSGD, "nesterov weight_decay", nesterov=True, weight_decay=0.1),
    _config(ActiveSGD, "dampening maximize", momentum=0.5, dampening=0.3, maximize=True),
    _config(ActiveSGD, "no_momentum", momentum=0.0),
    _config(ActiveAdamW, "defaults"),
    _config(ActiveAdamW, "amsgrad", amsgrad=True, weight_decay=0.0),
    _config(ActiveAdamW, "maximize gain_rule", maximize=True, betas=(0.8, 0.99), gain_inc=1.0,
            gain_dec=0.25),
    _config(ActiveAdamW, "clamps", min_gain=0.3, max_gain=4.0),
    _config(ActiveRAdam, "defaults"),
    _config(ActiveRAdam, "weight_decay maximize", weight_decay=0.1, maximize=True),
    # a small beta2 makes rho_t cross 5 within the first steps, covering both branches
    _config(ActiveRAdam, "both_rectify_branches", betas=(0.9, 0.9)),
    _config(ActiveAdaBelief, "defaults"),
    _config(ActiveAdaBelief, "amsgrad no_rectify weight_decay", rectify=False, amsgrad=True,
            weight_decay=0.1),
    _config(ActiveAdaBelief, "amsgrad both_rectify_branches clamps", betas=(0.9, 0.9),
            amsgrad=True, max_gain=3.0),
    _config(ActiveAdam, "defaults"),
    _config(ActiveAdam, "amsgrad weight_decay maximize", amsgrad=True, weight_decay=0.1,
            maximize=True),
    _config(ActiveAdam, "decoupled_weight_decay", decoupled_weight_decay=True, weight_decay=0.1),
    # the sign test (k > 0): thresholds low enough that some epoch sums pass and some do not
    _config(ActiveAdamW, "sign_test", sign_threshold=1.0),
    _config(ActiveRAdam, "sign_test both_rectify_branches", betas=(0.9, 0.9), sign_threshold=1.0),
    _config(ActiveAdaBelief, "sign_test amsgrad clamps", amsgrad=True, sign_threshold=0.5,
            max_gain=3.0),
    _config(ActiveAdam, "sign_test amsgrad weight_decay maximize", amsgrad=True,
            weight_decay=0.1, maximize=True, sign_threshold=1.5),
    # ActiveSGD's and ActiveLion's sign test reads the epoch's sum of g**2 (grad_sq_sum)
    _config(ActiveSGD, "sign_test grad_sq_sum nesterov", nesterov=True, sign_threshold=1.0),
    _config(ActiveLion, "sign_test grad_sq_sum maximize clamps", maximize=True, max_gain=3.0,
            sign_threshold=0.8),
    # relax_gains, with a gain_dec whose product (gain - 1) * gain_dec is inexact in float32
    _config(ActiveLion, "sign_test grad_sq_sum relax_gains", sign_threshold=0.8,
            relax_gains=True, gain_dec=0.7),
    _config(ActiveAdamW, "sign_test relax_gains weight_decay", sign_threshold=1.0,
            relax_gains=True, gain_dec=0.7, weight_decay=0.1),
    _config(ActiveLion, "defaults"),
    _config(ActiveLion, "weight_decay maximize clamps", betas=(0.8, 0.95), weight_decay=0.1,
            maximize=True, max_gain=3.0),
]


def configs(*tags: str, cls: type | None = None) -> list[OptimConfig]:
    """The rows that have every tag (and are of ``cls``, if given)."""
    return [c for c in CONFIGS if set(tags) <= c.tags and cls in (None, c.cls)]


def config(*tags: str, cls: type | None = None) -> OptimConfig:
    """The first row that has every tag (and is of ``cls``)."""
    rows = configs(*tags, cls=cls)
    assert rows, f"no config tagged {tags} for {cls}"
    return rows[0]


@dataclass(frozen=True)
class OptimizerInfo:
    """What the generic tests need of one optimizer class besides its configs: the torch.optim
    optimizer it mirrors (its hyperparameter checks raise what that one raises) and its own bad
    arguments, each with the words its ValueError must contain."""

    cls: type
    twin: type
    error_inputs: tuple = ()


_SIGN_THRESHOLD_ERRORS = ((dict(sign_threshold=-1.0), "sign_threshold must be finite and >= 0"),
                          (dict(sign_threshold=float("inf")), "sign_threshold must be finite"),
                          (dict(sign_threshold=0.0, relax_gains=True),
                           r"relax_gains needs the sign test \(sign_threshold > 0\)"))
_BETAS_EPS_ERRORS = ((dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
                     (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
                     (dict(eps=-1e-8), "epsilon")) + _SIGN_THRESHOLD_ERRORS
INFOS = [
    OptimizerInfo(ActiveSGD, torch.optim.SGD, (
        (dict(momentum=-0.1), "momentum"),
        (dict(dampening=2.0), "dampening"),
        (dict(nesterov=True, momentum=0.0), "Nesterov"),
        (dict(nesterov=True, dampening=0.1), "Nesterov"),
    ) + _SIGN_THRESHOLD_ERRORS),
    OptimizerInfo(ActiveAdamW, torch.optim.AdamW, _BETAS_EPS_ERRORS),
    OptimizerInfo(ActiveRAdam, torch.optim.RAdam, _BETAS_EPS_ERRORS),
    OptimizerInfo(ActiveAdaBelief, torch.optim.Adam, _BETAS_EPS_ERRORS),
    OptimizerInfo(ActiveAdam, torch.optim.Adam, _BETAS_EPS_ERRORS),
    OptimizerInfo(ActiveLion, torch.optim.Adam, (
        (dict(betas=(1.5, 0.9)), "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    ) + _SIGN_THRESHOLD_ERRORS),
]
CLASSES = [info.cls for info in INFOS]


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def grad_sequence(shapes, steps, dtype, seed=1, bias=0.3):
    """Seeded non-zero gradients, rounded to ``dtype``. A per-element bias makes some elements'
    epoch-sum signs persist (gains grow) while others flip (gains shrink)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = [bias * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return [
        [(off + torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for s, off in zip(shapes, offsets)]
        for _ in range(steps)
    ]


def run(config: OptimConfig, dtype, steps=14, backend="reference", params=None, grads=None,
        skip=(), **overrides):
    """Run ``steps`` steps on the params' device (grads are moved there); ``skip`` holds
    (step, param index) pairs whose grad is None."""
    params = make_params(dtype) if params is None else params
    shapes = [tuple(p.shape) for p in params]
    grads = grad_sequence(shapes, steps, dtype) if grads is None else grads
    opt = config.make(params, backend=backend, **overrides)
    for t, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if (t, i) in skip else g.to(p.device, p.dtype, copy=True)
        opt.step()
    return params, opt


def clone_params(params, dtype=None, device=None):
    return [p.detach().to(device or p.device, dtype or p.dtype, copy=True).requires_grad_()
            for p in params]


def assert_no_host_sync(steps) -> None:
    """Runs ``steps()`` once to warm up (allocations, compilation), then again with CUDA's sync
    debug mode raising on any host synchronisation."""
    steps()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")
