"""Property tests (hypothesis): for random shapes (empty, one-element and 0-dim tensors included),
dtypes, memory layouts, hyperparameters, epoch lengths (counted or manual), state precisions
(compact and full) and grads that are None on some steps, every backend ends where the reference does (the backend on every device
present, the reference on the CPU), with the state dtypes of docs/algorithm.md#state-and-dtypes.

Tolerances. Discrete and accumulated state is compared exactly in every dtype: gains, signs and
step counts, and the epoch sums (each backend adds the same float32 values in the same order,
and compact state rounds them with the same hashed bits). float64 params and moments agree to rounding (1e-9 relative). In the other dtypes the
math runs in float32 (docs/algorithm.md) and only the order of a few float32 operations differs
between backends, so moments agree within float32 rounding (1e-5). A bfloat16 or float16 param
is rounded to its dtype once per step, and two float32 results a few ulps apart can round to
neighbouring values: one ulp of the param's dtype per step, never amplified (the grads are
given, and weight decay only shrinks a difference). So after ``n`` steps a param may differ by
``n`` of its dtype's ulps at the largest magnitude it reached (its start or either end value).
float32 params are allowed two of their ulps per step: their difference is the last bits of
the float32 update, which can be as large as the param (seen: ActiveRAdam, gains fixed, 2 ulps
after one step on an AVX-512 Xeon).

Examples are derandomized (the same on every run: CI stays stable) and few enough for the whole
file to take well under a minute and a half on two cores; the Triton interpreter is slow, so its
examples are fewer and smaller.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis")  # a GPU image may lack it: say so, as a skip (gpu_check's report)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from adaptive_lr import ActiveAdaBelief, ActiveAdamW, ActiveRAdam, ActiveSGD
from optim_configs import device_backends, on_cpu

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# exact comparison in every dtype: the same float32 values added in the same order
EXACT_STATE = ("gain", "prev_sign", "step", "grad_sum", "grad_sq_sum", "epoch", "has_prev_sign",
               "rounding_seed")
# docs/algorithm.md: the state dtypes of every param dtype (moments: float64 for float64 params)
FIXED_STATE_DTYPES = {"step": torch.float32, "gain": torch.float32, "grad_sum": torch.float32,
                      "grad_sq_sum": torch.float32, "prev_sign": torch.int8,
                      "epoch": torch.int64, "has_prev_sign": torch.bool}
# compact state (every dtype but float64): bfloat16 gain and epoch sums, and a rounding seed
COMPACT_STATE_DTYPES = dict(FIXED_STATE_DTYPES, gain=torch.bfloat16, grad_sum=torch.bfloat16,
                            grad_sq_sum=torch.bfloat16, rounding_seed=torch.int64)

unit = st.floats(0.0, 1.0)
gain_options = st.fixed_dictionaries({
    "gain_inc": st.floats(0.0, 3.0),
    "gain_dec": st.floats(0.05, 1.0),
    "min_gain": st.floats(0.0, 1.0),
    "max_gain": st.one_of(st.just(math.inf), st.floats(1.0, 8.0)),
    "maximize": st.booleans(),
    "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.2)),
})
betas = st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999))


@st.composite
def optimizers(draw):
    """(optimizer class, its keyword arguments): every option in its valid range."""
    kwargs = draw(gain_options)
    name = draw(st.sampled_from(["sgd", "adamw", "radam", "adabelief"]))
    if name == "sgd":
        nesterov = draw(st.booleans())
        momentum = draw(st.floats(0.05, 0.99) if nesterov else st.one_of(st.just(0.0), unit))
        kwargs.update(lr=draw(st.floats(1e-4, 0.3)), momentum=momentum, nesterov=nesterov,
                      dampening=0.0 if nesterov else draw(unit),
                      sign_threshold=draw(st.sampled_from([0.0, 1.0, 2.0])))  # > 0: keeps Q
        return ActiveSGD, kwargs
    kwargs.update(lr=draw(st.floats(1e-4, 0.1)), betas=draw(betas),
                  eps=draw(st.sampled_from([1e-8, 1e-16, 1e-3])),
                  sign_threshold=draw(st.sampled_from([0.0, 1.0, 2.0])))
    if name in ("adamw", "adabelief"):
        kwargs["amsgrad"] = draw(st.booleans())
    if name == "adabelief":
        kwargs["rectify"] = draw(st.booleans())
    cls = {"adamw": ActiveAdamW, "radam": ActiveRAdam, "adabelief": ActiveAdaBelief}[name]
    return cls, kwargs


# contiguous; dims permuted (transposed, channels_last: dense, read in place by the fused
# kernels); every other element of a larger tensor (not dense: run on copies)
LAYOUTS = ("contiguous", "permuted", "strided")


def _laid_out(values: torch.Tensor, layout: str, permutation: list[int]) -> torch.Tensor:
    """A tensor equal to ``values`` in the given memory layout."""
    if layout == "permuted":
        stored = values.permute(permutation).contiguous()
        return stored.permute([permutation.index(d) for d in range(values.dim())])
    if layout == "strided" and values.dim() > 0:
        wide = values.new_zeros(*values.shape[:-1], 2 * values.shape[-1])
        return wide[..., ::2].copy_(values)
    return values.clone()


@st.composite
def runs(draw, max_tensors=4, max_size=5, max_steps=8, dtypes=DTYPES):
    """Everything one run needs: optimizer, params (shape, layout), grads, epoch marks."""
    cls, kwargs = draw(optimizers())
    dtype = draw(st.sampled_from(dtypes))
    shapes = draw(st.lists(st.lists(st.integers(0, max_size), max_size=3).map(tuple),
                           min_size=1, max_size=max_tensors))
    layouts = [(draw(st.sampled_from(LAYOUTS)), draw(st.permutations(range(len(s)))),
                draw(st.booleans())) for s in shapes]  # (layout, permutation, grad like param)
    steps = draw(st.integers(1, max_steps))
    steps_per_epoch = draw(st.one_of(st.none(), st.integers(1, 4)))
    # manual mode: end_epoch() after the steps marked True
    epoch_ends = draw(st.lists(st.booleans(), min_size=steps, max_size=steps))
    has_grad = draw(st.lists(st.lists(st.floats(0, 1).map(lambda u: u < 0.8), min_size=len(shapes),
                                      max_size=len(shapes)), min_size=steps, max_size=steps))
    # drawn last, so that the examples drawn before compact state existed stay as they were
    precisions = ["compact", "full"] + (["bfloat16"] if cls.spec.offers_bfloat16_moments else [])
    state_precision = draw(st.sampled_from(precisions))
    return dict(cls=cls, kwargs=dict(kwargs, steps_per_epoch=steps_per_epoch,
                                     state_precision=state_precision),
                dtype=dtype, shapes=shapes, layouts=layouts, steps=steps, epoch_ends=epoch_ends,
                has_grad=has_grad, seed=draw(st.integers(0, 2**16)))


def _run(case: dict, backend: str, device="cpu"):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]

    def randn(shape):  # drawn on the CPU: every device sees the same values
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)

    params = [torch.nn.Parameter(_laid_out(randn(s), layout, perm))
              for s, (layout, perm, _) in zip(case["shapes"], case["layouts"])]
    start = [p.detach().clone() for p in params]
    opt = case["cls"](params, backend=backend, **case["kwargs"])
    for t in range(case["steps"]):
        for p, (_, _, grad_like_param), has_grad in zip(params, case["layouts"], case["has_grad"][t]):
            g = randn(p.shape)  # drawn even when unused: every backend sees the same grads
            if grad_like_param:  # as autograd lays out the grad of a dense param
                g = torch.empty_like(p).copy_(g)
            p.grad = g if has_grad else None
        opt.step()
        if case["kwargs"]["steps_per_epoch"] is None and case["epoch_ends"][t]:
            opt.end_epoch()
    return start, params, opt


def _assert_matches_reference(case: dict, device: str, backend: str):
    start, ref_params, ref_opt = _run(case, "reference")
    params, states = on_cpu(*_run(case, backend, device)[1:])
    dtype, steps = case["dtype"], case["steps"]
    for p0, p_ref, p, state in zip(start, ref_params, params, states):
        ref_state = ref_opt.state[p_ref]
        assert ref_state.keys() == state.keys()
        for key, value in ref_state.items():
            if not isinstance(value, torch.Tensor):
                assert state[key] == value, key
                continue
            precision = case["kwargs"]["state_precision"]
            compact = precision != "full" and dtype != torch.float64
            moment_dtype = (torch.float64 if dtype == torch.float64 else
                            torch.bfloat16 if precision == "bfloat16" else torch.float32)
            fixed = COMPACT_STATE_DTYPES if compact else FIXED_STATE_DTYPES
            assert state[key].dtype == fixed.get(key, moment_dtype), key
            if key in EXACT_STATE:
                assert torch.equal(state[key], value), key
            else:
                tol = 1e-9 if dtype == torch.float64 else 1e-5
                torch.testing.assert_close(state[key], value, rtol=tol, atol=tol, equal_nan=True,
                                           msg=key)
        if dtype == torch.float64:
            torch.testing.assert_close(p, p_ref, rtol=1e-9, atol=1e-12, equal_nan=True)
            continue
        # a degenerate update may overflow (AdaBelief with beta1 = 0 has a zero belief): identically
        p, p_ref = p.detach().double(), p_ref.detach().double()
        finite = p_ref.isfinite()
        assert torch.equal(p.isfinite(), finite)
        torch.testing.assert_close(p[~finite], p_ref[~finite], rtol=0, atol=0, equal_nan=True)
        if finite.any():
            largest = max(t.abs().max().item() for t in (p0.double(), p_ref[finite], p[finite]))
            ulps_per_step = 2 if dtype == torch.float32 else 1
            bound = (ulps_per_step * steps * torch.finfo(dtype).eps
                     * max(largest, torch.finfo(dtype).tiny))
            assert (p - p_ref)[finite].abs().max().item() <= bound


SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(("device", "backend"), device_backends(exclude=("reference", "triton")))
@settings(max_examples=1000, **SETTINGS)
@given(case=runs())
def test_backend_matches_reference(device, backend, case):
    _assert_matches_reference(case, device, backend)


# few and small examples: on the CPU the Triton interpreter is slow, on a GPU each new combination
# of options compiles a kernel specialisation
TRITON = device_backends(only=("triton",))


@pytest.mark.skipif(not TRITON, reason="needs triton (on CPU: TRITON_INTERPRET=1)")
@pytest.mark.parametrize(("device", "backend"), TRITON)
@settings(max_examples=80, **SETTINGS)
@given(case=runs(max_tensors=2, max_size=3, max_steps=4))
def test_triton_matches_reference(device, backend, case):
    _assert_matches_reference(case, device, backend)
