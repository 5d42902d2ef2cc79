"""The foreach backend's compact rounding: batches of rounding.CHUNK elements (pieces of a big
tensor, small tensors packed side by side) draw the reference's bits. Backend parity at the
default CHUNK is in test_backend_parity.py. And a compact step allocates no more than a
full-state one beside its bounded batches, and ActiveLion and ActiveAdaBelief need two
param-sized temporaries."""

import math

import pytest
import torch

from adaptive_lr import ActiveAdaBelief, ActiveAdamW, ActiveLion, ActiveSGD
from adaptive_lr.backends import rounding
from adaptive_lr.benchmark import make_tensors, step_extra_memory
from adaptive_lr.backends.rounding import (
    accumulate_stochastic, bfloat16_stochastic, bfloat16_stochastic_gain,
    bfloat16_stochastic_low_bits, element_index, store_stochastic_gain,
)
from optim_configs import config, make_params, run

CHUNK = 64  # small: tensors span several batches, and a batch packs several tensors


def _params():
    """Params of every kind a batch meets: bigger than a batch, smaller, empty, 0-dim, dense in
    another dim order (transposed, channels_last), not dense (a strided view)."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(150, generator=gen),
        torch.randn(5, generator=gen),
        torch.randn(0),
        torch.randn((), generator=gen),
        torch.randn(9, 14, generator=gen).t(),
        torch.randn(2, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last),
        torch.randn(7, 20, generator=gen)[:, ::2],
        torch.randn(63, generator=gen),
    ]


def _with_specials(t: torch.Tensor) -> torch.Tensor:
    """t with the values rounding must keep (infinities, NaN, -0) or may carry to infinity (the
    largest bfloat16 plus a fraction of its ulp) among its first elements."""
    largest = torch.finfo(torch.bfloat16).max
    specials = torch.tensor([math.inf, -math.inf, math.nan, largest * (1 + 2**-9), -0.0])
    specials.view(torch.int32)[2] = -1  # a NaN whose payload a draw would carry out of it
    flat = t.reshape(-1)  # a copy for the strided view: its specials are not needed
    flat[:len(specials)] = specials[:flat.numel()]
    return t


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("mode", ["sum", "sum and square", "gain"])
def test_batches_round_as_the_reference_bit_for_bit(mode, monkeypatch):
    monkeypatch.setattr(rounding, "CHUNK", CHUNK)
    params = _params()
    gen = torch.Generator().manual_seed(1)
    values = [_with_specials(torch.randn(p.shape, generator=gen) * 100) for p in params]
    # a key near 2**32: key + index wraps mod 2**32 inside the first tensor
    keys = [2**32 - 70] + [rounding.rounding_key(i, 3) for i in range(1, len(params))]

    # states laid out as their params (as the optimizer makes them), but one: rounded on a copy
    # in its param's order, written back
    def states():
        made = [torch.empty_like(p, dtype=torch.bfloat16).copy_(torch.randn(p.shape, generator=gen))
                for p in params]
        made[5] = made[5].contiguous()
        return made

    outs, squares = states(), states()
    roundings = list(zip(keys, params))
    if mode == "gain":
        expected = [bfloat16_stochastic_gain(v, k, element_index(p))
                    for v, k, p in zip(values, keys, params)]
        store_stochastic_gain(outs, values, roundings)
    else:
        expected = [bfloat16_stochastic(o.float() + v, k, element_index(p))
                    for o, v, k, p in zip(outs, values, keys, params)]
        if mode == "sum":
            accumulate_stochastic(outs, values, roundings)
        else:  # grad_sq_sum: the same hash's low bits
            expected_squares = [bfloat16_stochastic_low_bits(q.float() + v * v, k, element_index(p))
                                for q, v, k, p in zip(squares, values, keys, params)]
            accumulate_stochastic(outs, values, roundings, squares)
            for i, (square, exp) in enumerate(zip(squares, expected_squares)):
                assert torch.equal(_bits(square), _bits(exp)), i
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert torch.equal(_bits(out), _bits(exp)), i
    assert outs[0][:2].isinf().all() and outs[0][2].isnan()


@pytest.mark.parametrize("cls", [ActiveAdamW, ActiveSGD])  # ActiveSGD keeps grad_sq_sum
def test_optimizer_in_small_batches_steps_as_the_reference(cls, monkeypatch):
    """Over epoch boundaries (new gains) and mid-epoch steps, with params bigger than a batch."""
    monkeypatch.setattr(rounding, "CHUNK", CHUNK)
    row = config("defaults", cls=cls)
    shapes = [(40, 5), (3,), (), (130,)]
    results = {}
    for backend in ("reference", "foreach"):
        params, opt = run(row, torch.float32, 12, backend,
                          make_params(torch.float32, shapes=shapes))
        results[backend] = (params, [opt.state[p] for p in params])
    (ref_params, ref_states), (params, states) = results["reference"], results["foreach"]
    for p_ref, p, s_ref, s in zip(ref_params, params, ref_states, states):
        assert torch.equal(p_ref, p)
        for key in ("gain", "grad_sum", "grad_sq_sum", "prev_sign"):
            if key in s_ref:
                assert torch.equal(s_ref[key], s[key]), key
    assert any((s["gain"] != 1).any() for s in states), "gains never moved"


def test_a_compact_step_allocates_no_float32_copy_of_its_gains():
    """8M fp32 elements in 200 tensors (in 4, the allocator moves a step's high-water mark by
    whole 7.6 MiB tensors): a float32 copy of the bfloat16 gains would add 30.5 MiB to a
    full-state step's temporaries; the rounding's batches take ~6 MiB, within those."""
    extra = {}
    for precision in ("full", "compact"):
        params = make_tensors(8_000_000, "200", torch.float32)
        optimizer = ActiveAdamW(params, backend="foreach", state_precision=precision,
                                steps_per_epoch=None)
        optimizer.step()
        extra[precision] = step_extra_memory(optimizer.step)
        if extra[precision] is None:
            pytest.skip("/proc cannot tell the peak memory of a step here")
    assert extra["compact"] < extra["full"] + 16 * 2**20, extra


@pytest.mark.parametrize("optimizer_class", [ActiveLion, ActiveAdaBelief])
def test_a_step_holds_two_param_sized_temporaries(optimizer_class):
    """ActiveLion's foreach step needs its direction and its update, ActiveAdaBelief's its
    denominator and its update (2 x 30.5 MiB at 8M fp32 elements); Lion's g * (1 - beta2) goes
    into the update's buffers and AdaBelief's residual lists are freed first, not a third list."""
    params = make_tensors(8_000_000, "200", torch.float32)
    optimizer = optimizer_class(params, lr=1e-4, backend="foreach", steps_per_epoch=None)
    optimizer.step()
    extra = step_extra_memory(optimizer.step)
    if extra is None:
        pytest.skip("/proc cannot tell the peak memory of a step here")
    assert extra < 2.5 * 8_000_000 * 4, extra
