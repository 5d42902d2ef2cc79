"""The fused CPU backend (csrc/cpu via torch.ops.adaptive_lr) against the reference backend."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
from typing import Callable, NamedTuple

import pytest
import torch

from adaptive_lr import ActiveAdaBelief, ActiveAdamW, ActiveSGD
from adaptive_lr.backends import cpu, extension, reference
from adaptive_lr.backends import fused as fused_op
from adaptive_lr.backends.bucket import Boundary, Bucket, state_dtype
from optim_configs import CONFIGS, config, configs

_REASON = cpu.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"fused cpu backend: {_REASON}")

# odd sizes around the SIMD widths and the 65536-element chunk, and an empty tensor
SIZES = (1, 15, 17, 0, 65537, 300)
# the steps' boundaries; tensors start at steps 0, 3 and 6, so RAdam's rectification switches on
SCHEDULE = (Boundary.ROLL, Boundary.NONE, Boundary.UPDATE, Boundary.NONE, Boundary.UPDATE)


def make_bucket(row, dtype=torch.float32, sizes=SIZES, seed=0, **overrides):
    """A bucket of ``row`` (a row of the optimizer table, with ``overrides``) on seeded random
    tensors: gains, sums and signs of every kind, steps that start at 0, 3 and 6, and the sign
    test's sums of g**2 where the row keeps them (drawn last: the other tensors are the same
    with or without them)."""
    gen = torch.Generator().manual_seed(seed)
    spec = row.cls.spec
    group = row.make([torch.zeros(1, requires_grad=True)], backend="reference",
                     **overrides).param_groups[0]
    hyper = spec.record(group)

    def randn(n, dt=dtype):
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dt)

    def grad_sum(n):
        g = randn(n, torch.float32)
        g[::7] = 0  # sign 0: the gain decreases
        return g

    keys = spec.state_keys(hyper)
    sd = state_dtype(dtype)
    return Bucket(
        spec,
        params=[randn(n) for n in sizes],
        grads=[randn(n) for n in sizes],
        gains=[torch.rand(n, generator=gen) * 3 + 0.25 for n in sizes],
        grad_sums=[grad_sum(n) for n in sizes],
        prev_signs=[torch.randint(-1, 2, (n,), generator=gen, dtype=torch.int8) for n in sizes],
        steps=[torch.tensor(3.0 * (i % 3)) for i in range(len(sizes))],
        # the first moment signed, the others non-negative, as they are in a real run
        state={k: [randn(n, sd) if k == keys[0] else randn(n, sd).abs() for n in sizes]
               for k in keys},
        hyper=hyper,
        grad_sq_sums=([randn(n, torch.float32) ** 2 * 3 for n in sizes]
                      if spec.keeps_grad_sq_sum(hyper) else None),
    )


# compact runs start mid-epoch, so that the first step adds to (and stores) make_compact_case's sums
COMPACT_SCHEDULE = (Boundary.NONE, Boundary.NONE, Boundary.UPDATE, Boundary.NONE)


def make_compact_case(row, dtype, sizes=SIZES):
    """make_bucket's bucket with compact state (bfloat16 gains and epoch sums, rounding seeds)
    and its grads, with epoch sums that stochastic rounding must keep (infinities, NaN: a NaN
    grad's payload too, which a draw would carry out of the NaN) or may carry to infinity (the
    largest bfloat16 plus a grad of a fraction of its ulp)."""
    bucket = make_bucket(row, dtype, sizes)
    grads = make_grads(bucket, len(COMPACT_SCHEDULE))
    largest = torch.finfo(torch.bfloat16).max
    specials = torch.tensor([math.inf, -math.inf, math.nan, largest, -largest, 0.0])
    nudge = min(largest / 2**9, torch.finfo(dtype).max)  # half an ulp: 0 or 1 ulp on rounding
    payload_nan = torch.tensor([-1], dtype=torch.int32).view(torch.float32)  # all bits set
    for g, first_grad in zip(bucket.grad_sums, grads[0]):
        at = torch.arange(1, len(g), 41)[:len(specials)]  # in SIMD groups and in tails
        g[at] = specials[:len(at)]
        nudges = torch.tensor([0, 0, 0, nudge, -nudge, 0])[:len(at)].to(dtype)
        if dtype == torch.float32 and len(at) == len(specials):
            nudges[-1] = payload_nan
        first_grad[at] = nudges
    bucket = dataclasses.replace(
        bucket, gains=[g.bfloat16() for g in bucket.gains],
        grad_sums=[g.bfloat16() for g in bucket.grad_sums],
        grad_sq_sums=(None if bucket.grad_sq_sums is None
                      else [q.bfloat16() for q in bucket.grad_sq_sums]),
        rounding_seeds=list(range(len(sizes))))
    return bucket, grads


def make_bfloat16_moments_case(row, dtype, sizes=SIZES):
    """make_compact_case's bucket and grads with bfloat16 moments (state_precision="bfloat16")."""
    bucket, grads = make_compact_case(row, dtype, sizes)
    moments = {key: [t.bfloat16() for t in tensors] for key, tensors in bucket.state.items()}
    return dataclasses.replace(bucket, state=moments), grads


def make_grads(bucket, steps=len(SCHEDULE), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in bucket.params]
            for _ in range(steps)]


def run(step, bucket, grads, schedule=SCHEDULE):
    for boundary, step_grads in zip(schedule, grads):
        for g, new in zip(bucket.grads, step_grads):
            g.copy_(new)
        bucket.boundary = boundary
        step(bucket)


def tensors(bucket) -> dict[str, list[torch.Tensor]]:
    lists = dict(params=bucket.params, grads=bucket.grads, gains=bucket.gains,
                 grad_sums=bucket.grad_sums, prev_signs=bucket.prev_signs, steps=bucket.steps,
                 **bucket.state)
    if bucket.grad_sq_sums is not None:
        lists["grad_sq_sums"] = bucket.grad_sq_sums
    return lists


def to_float64(bucket):
    """The same bucket with float64 params and moments (gain state is float32 in every precision)."""
    b = copy.deepcopy(bucket)
    for name in ("params", "grads"):
        setattr(b, name, [t.double() for t in getattr(b, name)])
    b.state = {k: [t.double() for t in v] for k, v in b.state.items()}
    b.dtype = torch.float64
    return b


def assert_all_equal(a: dict, b: dict):
    for key in a:
        assert len(a[key]) == len(b[key]), key
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            if x.is_sparse:
                x, y = x.to_dense(), y.to_dense()
            assert torch.equal(bits(x), bits(y)), f"{key}[{i}] differs"


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bytes (NaN equals itself bit for bit), any other tensor as it is."""
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


@pytest.mark.parametrize("row", CONFIGS, ids=lambda c: c.id)
def test_float64_matches_reference(row):
    fused = make_bucket(row, torch.float64)
    ref = copy.deepcopy(fused)
    grads = make_grads(fused)
    run(cpu.step, fused, grads)
    run(reference.step, ref, grads)
    for key, ref_list in tensors(ref).items():
        for i, (x, y) in enumerate(zip(tensors(fused)[key], ref_list)):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14, msg=f"{key}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row", CONFIGS, ids=lambda c: c.id)
def test_low_precision_error_at_most_twice_the_reference(row, dtype):
    """flash-attention's rule: against a float64 run, the fused kernel's error is at most 2x the
    error of the reference run in the same precision, or one ulp of the value's magnitude in its
    own dtype (where both are a rounding or two apart, the ratio alone says nothing: SGD's
    float32 buffer with dampening and momentum 0.5 differs from the reference's by 1-2 ulps)."""
    fused = make_bucket(row, dtype)
    ref = copy.deepcopy(fused)
    exact = to_float64(fused)
    grads = make_grads(fused)
    run(cpu.step, fused, grads)
    run(reference.step, ref, grads)
    run(reference.step, exact, grads)
    for key, exact_list in tensors(exact).items():
        for i, e in enumerate(exact_list):
            if e.numel() == 0:
                continue
            err_fused = (tensors(fused)[key][i].double() - e.double()).abs().max().item()
            err_ref = (tensors(ref)[key][i].double() - e.double()).abs().max().item()
            ulp = torch.finfo(tensors(fused)[key][i].dtype).eps * e.abs().max().item() \
                if tensors(fused)[key][i].is_floating_point() else 0.0
            assert err_fused <= max(2 * err_ref, ulp) + 1e-12, \
                f"{key}[{i}]: {err_fused} vs reference {err_ref}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_grad_scale_matches_reference(dtype, scale):
    fused = make_bucket(config("amsgrad", cls=ActiveAdamW), dtype, maximize=True)
    fused.grad_scale = torch.tensor([scale])
    fused.found_inf = torch.zeros(1)
    ref = copy.deepcopy(fused)
    grads = make_grads(fused)
    run(cpu.step, fused, grads)
    run(reference.step, ref, grads)
    for key, ref_list in tensors(ref).items():
        for x, y in zip(tensors(fused)[key], ref_list):
            torch.testing.assert_close(x, y, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-7)


# a second moment's sign test, and a sum of g**2's (which the boundary resets with grad_sum)
FOUND_INF_ROWS = [config("amsgrad", "clamps", cls=ActiveAdaBelief),
                  config("grad_sq_sum", cls=ActiveSGD)]


def assert_found_inf_applies_only_the_boundary(step, boundary, dtype, row, move=copy.deepcopy,
                                               read=tensors):
    """``step`` on ``move(bucket)`` with found_inf set equals the reference and changes nothing
    but the boundary's gains, sums and signs (the cuda tests reuse this on CUDA tensors)."""
    ref = make_bucket(row, dtype, min_gain=0.5)
    ref.boundary = boundary
    ref.found_inf = torch.ones(1)
    ref.grad_scale = torch.tensor([8.0])
    before = copy.deepcopy(ref)
    fused = move(ref)
    step(fused)
    reference.step(ref)
    assert_all_equal(read(fused), tensors(ref))
    untouched = {k: v for k, v in read(fused).items()
                 if k not in ("gains", "grad_sums", "grad_sq_sums", "prev_signs")}
    assert_all_equal(untouched, {k: tensors(before)[k] for k in untouched})
    if boundary != Boundary.NONE and ref.grad_sq_sums is not None:
        assert all((q == 0).all() for q in ref.grad_sq_sums)


@pytest.mark.parametrize("row", FOUND_INF_ROWS, ids=lambda c: c.id)
@pytest.mark.parametrize("boundary", list(Boundary))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_found_inf_applies_only_the_boundary(boundary, dtype, row):
    assert_found_inf_applies_only_the_boundary(cpu.step, boundary, dtype, row)


def test_results_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):  # (the threads' shares of the chunks: chunks.h's share_bounds)
            torch.set_num_threads(n)
            for dtype in (torch.float32, torch.bfloat16):
                bucket = make_bucket(config("amsgrad", cls=ActiveAdamW), dtype,
                                     sizes=(200_003, 70_001, 3))
                run(cpu.step, bucket, make_grads(bucket))
                results.append(tensors(bucket))
    finally:
        torch.set_num_threads(threads)
    for n in (1, 2):
        assert_all_equal(results[0], results[2 * n])  # float32
        assert_all_equal(results[1], results[2 * n + 1])  # bfloat16


@pytest.mark.parametrize("row", configs("defaults"), ids=lambda c: c.id)
def test_many_tiny_and_empty_tensors(row):
    sizes = [i % 23 for i in range(300)]  # includes empty tensors
    fused = make_bucket(row, torch.float64, sizes=sizes)
    ref = copy.deepcopy(fused)
    grads = make_grads(fused)
    run(cpu.step, fused, grads)
    run(reference.step, ref, grads)
    for key, ref_list in tensors(ref).items():
        for x, y in zip(tensors(fused)[key], ref_list):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row", configs("defaults") + configs("grad_sq_sum"), ids=lambda c: c.id)
def test_compact_state_rounds_like_the_reference(row, dtype):
    """The SIMD store of a compact epoch sum (of g, and of g**2) draws the reference's bits,
    infinite sums and sums that round to infinity included; a NaN sum stays NaN (its bit
    pattern is the converter's: torch's and math.h's differ)."""
    fused, grads = make_compact_case(row, dtype, sizes=(1, 15, 17, 33, 1000))
    ref = copy.deepcopy(fused)
    for t, boundary in enumerate(COMPACT_SCHEDULE):  # compared after every step
        run(cpu.step, fused, grads[t:t + 1], (boundary,))
        run(reference.step, ref, grads[t:t + 1], (boundary,))
        for name in ("gains", "grad_sums", "grad_sq_sums", "prev_signs"):
            for x, y in zip(getattr(fused, name) or [], getattr(ref, name) or []):
                nan = x.isnan()
                assert torch.equal(nan, y.isnan()) and torch.equal(bits(x[~nan]), bits(y[~nan])), (
                    t, name)
        if t == 0:  # the special sums were rounded and stored
            assert all(s[1::41][:3].isinf().sum() == 2 and s[83].isnan()
                       for s in fused.grad_sums if len(s) > 83)
            assert all(s[206].isnan() == (dtype == torch.float32)
                       for s in fused.grad_sums if len(s) > 206)


_CAPABILITY_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_cpu_backend as t
results = {{}}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for row in t.CONFIGS:
        bucket = t.make_bucket(row, dtype, sizes=(1, 15, 17, 33, 1000))
        t.run(t.cpu.step, bucket, t.make_grads(bucket))
        results[(row.id, str(dtype))] = t.tensors(bucket)
        if dtype != torch.float64:
            bucket, grads = t.make_compact_case(row, dtype, sizes=(1, 15, 17, 33, 1000))
            t.run(t.cpu.step, bucket, grads, t.COMPACT_SCHEDULE)
            results[(row.id, str(dtype), "compact")] = t.tensors(bucket)
        if dtype != torch.float64 and row.cls.spec.offers_bfloat16_moments:
            bucket, grads = t.make_bfloat16_moments_case(row, dtype, sizes=(1, 15, 17, 33, 1000))
            t.run(t.cpu.step, bucket, grads, t.COMPACT_SCHEDULE)
            results[(row.id, str(dtype), "bfloat16")] = t.tensors(bucket)
torch.save((torch.ops.adaptive_lr.cpu_capability(), results), {out!r})
"""


def _run_capability(capability: str, out: str):
    """(the capability the kernels ran, their results) in a process with ATEN_CPU_CAPABILITY set."""
    script = _CAPABILITY_SCRIPT.format(tests=os.path.dirname(__file__), out=out)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def default_capability_results(tmp_path_factory):
    """The scalar build's run, which every capability is compared with (run once, not per test)."""
    return _run_capability("default", str(tmp_path_factory.mktemp("capability") / "default.pt"))


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_simd_build_gives_identical_results(capability, tmp_path,
                                                  default_capability_results):
    """Each capability's kernels (picked with ATEN_CPU_CAPABILITY) round exactly like the others."""
    runs = {"default": True, "avx2": torch.cpu._is_avx2_supported(),
            "avx512": torch.cpu._is_avx512_supported()}
    if not runs[capability]:  # ATen would believe the variable; the CPU would not run it
        pytest.skip(f"this CPU has no {capability}")
    used, results = _run_capability(capability, str(tmp_path / f"{capability}.pt"))
    assert used.lower() == capability, f"asked for {capability}, the kernels ran {used}"
    for key, expected in default_capability_results[1].items():
        assert_all_equal(results[key], expected)


def _valid_bucket():
    bucket = make_bucket(config("amsgrad", cls=ActiveAdamW), torch.float32, sizes=(5, 6, 7))
    bucket.boundary = Boundary.UPDATE
    return bucket


def _op_call(bucket):
    """The op and its arguments for ``bucket``, as the cpu backend calls it."""
    lr = torch.tensor(float(bucket.hyper.lr), dtype=torch.float64)
    return torch.ops.adaptive_lr.active_step_.default, fused_op._op_kwargs(bucket, lr)


def _set_lr(bucket, lr):
    bucket.hyper = dataclasses.replace(bucket.hyper, lr=lr)


def _set(attr, index, make):
    """A breaker that replaces the LAST tensor of a list, so a kernel that wrote before checking
    everything would already have modified the others."""
    def breaker(b):
        lst = getattr(b, attr) if isinstance(attr, str) and hasattr(b, attr) else b.state[attr]
        lst[index] = make(lst[index])
    return breaker


BREAKERS = {
    "list_length": (lambda b: b.gains.pop(), r"gains has 2 tensors but params has 3"),
    "grad_dtype": (_set("grads", -1, lambda t: t.double()), r"grads\[2\] must have dtype Float"),
    "param_dtype": (_set("params", -1, lambda t: t.int()), r"params\[2\] must have dtype Float"),
    "gain_dtype": (_set("gains", -1, lambda t: t.double()), r"gains\[2\] must have dtype Float"),
    "sign_dtype": (_set("prev_signs", -1, lambda t: t.float()), r"prev_signs\[2\] must have dtype Char"),
    "state_dtype": (_set("exp_avg_sq", -1, lambda t: t.double()), r"exp_avg_sq\[2\] must have dtype"),
    "amsgrad_state_shape": (_set("max_exp_avg_sq", -1, lambda t: t[:, None]), r"max_exp_avg_sq\[2\] must have shape"),
    "grad_sum_numel": (_set("grad_sums", -1, lambda t: t[1:]), r"grad_sums\[2\] must have shape"),
    "sparse_grad": (_set("grads", -1, lambda t: t.to_sparse()), r"Sparse"),
    "step_dtype": (_set("steps", -1, lambda t: t.double()), r"steps\[2\] must be a one-element float32"),
    "step_numel": (_set("steps", -1, lambda t: torch.zeros(2)), r"steps\[2\] must be a one-element float32"),
    "grad_scale": (lambda b: setattr(b, "grad_scale", torch.ones(2)), r"grad_scale must be a one-element"),
    "found_inf": (lambda b: setattr(b, "found_inf", torch.zeros(1, dtype=torch.float64)), r"found_inf must be"),
    "boundary": (lambda b: setattr(b, "boundary", 3), r"boundary must be 0"),
    "lr_dtype": (lambda b: _set_lr(b, torch.tensor(1, dtype=torch.int64)), r"lr must be a one-element float32 or float64"),
    "lr_numel": (lambda b: _set_lr(b, torch.full((2,), 1e-3)), r"lr must be a one-element"),
}


@pytest.mark.parametrize("name", list(BREAKERS))
def test_invalid_input_raises_and_changes_nothing(name):
    breaker, message = BREAKERS[name]
    bucket = _valid_bucket()
    breaker(bucket)
    before = copy.deepcopy(tensors(bucket))
    with pytest.raises(RuntimeError, match=message):
        cpu.step(bucket)
    assert_all_equal(tensors(bucket), before)


# ---- memory layouts: every tensor of index i is read as one flat array ----------------------


def _channels_last(t):
    return t.reshape(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)


def _transposed(t):
    return t.reshape(10, 12).t()


def _strided(t):
    """A view that skips every other element: not dense."""
    view = torch.zeros(240, dtype=t.dtype)[::2]
    return view.copy_(t)


class Layout(NamedTuple):
    """How index 0's param, grad and state are laid out, and whether the op reads them in place."""

    param: Callable
    grad: Callable
    state: Callable
    in_place: bool


LAYOUTS = {
    "channels_last": Layout(_channels_last, _channels_last, _channels_last, True),
    "transposed": Layout(_transposed, _transposed, _transposed, True),
    "strided_param": Layout(_strided, torch.clone, torch.clone, False),
    "grad_unlike_param": Layout(_channels_last, lambda t: t.reshape(2, 3, 4, 5), _channels_last, False),
}


def _relayout(bucket, layout: Layout):
    """The bucket with index 0's tensors in ``layout``, and a copy with the same values contiguous."""
    relaid, contiguous = copy.deepcopy(bucket), copy.deepcopy(bucket)
    for key, values in tensors(relaid).items():
        if key != "steps":
            values[0] = {"params": layout.param, "grads": layout.grad}.get(key, layout.state)(values[0])
            tensors(contiguous)[key][0] = values[0].clone(memory_format=torch.contiguous_format)
    return relaid, contiguous


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_give_the_contiguous_result(name, dtype, monkeypatch):
    """Dense layouts shared by a param and its tensors run in place; any other runs on contiguous
    copies that are written back. Either way the result is bit for bit the contiguous one."""
    layout = LAYOUTS[name]
    relaid, contiguous = _relayout(
        make_bucket(config("amsgrad", cls=ActiveAdamW), dtype, sizes=(120, 7)), layout)
    watched = (relaid.params[0], relaid.state["exp_avg"][0])
    layout_before = [(t.data_ptr(), t.stride()) for t in watched]
    copied = []
    original = fused_op._run_on_flat_copies
    monkeypatch.setattr(fused_op, "_run_on_flat_copies",
                        lambda *args: (copied.append(1), original(*args)))
    grads = [[layout.grad(g[0]), g[1]] for g in make_grads(relaid)]  # run() copies into each layout
    run(cpu.step, relaid, grads)
    run(cpu.step, contiguous, grads)
    assert (not copied) == layout.in_place
    assert [(t.data_ptr(), t.stride()) for t in watched] == layout_before
    expected = tensors(contiguous)
    for key, values in tensors(relaid).items():
        for i, (x, y) in enumerate(zip(values, expected[key])):
            assert torch.equal(x.contiguous(), y), f"{key}[{i}]"


def test_op_rejects_layouts_it_cannot_index_with_not_implemented_error():
    """The op itself (called directly) names the tensor and the layout; cpu.step then falls back."""
    sgd = config("defaults", cls=ActiveSGD)
    bucket = make_bucket(sgd, torch.float32, sizes=(120, 7))
    bucket.params[1] = _strided(torch.zeros(120))[:7]
    op, kwargs = _op_call(bucket)
    with pytest.raises(NotImplementedError, match=r"params\[1\] of shape \[7\] and strides \[2\] does"):
        op(**kwargs)
    bucket = make_bucket(sgd, torch.float32, sizes=(120, 7))
    bucket.params[0] = _channels_last(bucket.params[0])
    for key in ("grads", "gains", "grad_sums", "prev_signs"):
        getattr(bucket, key)[0] = getattr(bucket, key)[0].reshape(2, 3, 4, 5)
    bucket.state["momentum_buffer"][0] = _channels_last(bucket.state["momentum_buffer"][0])
    op, kwargs = _op_call(bucket)
    message = r"grads\[0\] has strides \[60, 20, 5, 1\] but params\[0\] has strides \[60, 1, 15, 3\]"
    with pytest.raises(NotImplementedError, match=message):
        op(**kwargs)


@pytest.mark.parametrize("row", CONFIGS, ids=lambda c: c.id)
def test_op_passes_opcheck(row):
    """Schema, fake (Meta) kernel, autograd registration and AOT dispatch, as torch.compile needs."""
    bucket = make_bucket(row, sizes=(3, 5))
    bucket.boundary = Boundary.UPDATE
    op, kwargs = _op_call(bucket)
    torch.library.opcheck(op, (), kwargs)


def test_meta_tensors_run_the_no_op_fake_kernel():
    bucket = make_bucket(config("amsgrad", cls=ActiveAdaBelief), sizes=(3, 4))
    meta = copy.deepcopy(bucket)
    for key, values in tensors(meta).items():
        values[:] = [t.to("meta") for t in values]
    cpu.step(meta)


def test_unavailable_off_cpu():
    assert "CPU tensors only" in cpu.unavailable_reason(torch.device("meta"))


@pytest.mark.parametrize("has_avx2", [True, False])
def test_just_in_time_build_lowers_a_capability_the_cpu_lacks(monkeypatch, has_avx2):
    """ATEN_CPU_CAPABILITY=avx512 on a CPU without it: ATen believes the variable, the kernels would
    die of an illegal instruction; the build compiles what the CPU runs instead, and says so."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: has_avx2)
    with pytest.warns(UserWarning, match="torch chose AVX512 .* cannot run it; the fused CPU "
                                         f"kernels run {'AVX2' if has_avx2 else 'DEFAULT'}"):
        assert extension._runnable_capability() == ("AVX2" if has_avx2 else "DEFAULT")


def test_just_in_time_build_keeps_a_runnable_capability(monkeypatch, recwarn):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True)
    assert extension._runnable_capability() == "AVX2" and not recwarn.list
