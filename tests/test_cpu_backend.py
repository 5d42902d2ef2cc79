"""The fused CPU backend (csrc/cpu via torch.ops.adaptive_lr) against the reference backend."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from typing import Callable, NamedTuple

import pytest
import torch

from adaptive_lr.backends import cpu, reference
from adaptive_lr.backends.bucket import AMSGRAD_KEYS, STATE_KEYS, Boundary, Bucket, state_dtype

_REASON = cpu.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"fused cpu backend: {_REASON}")

DEFAULTS = {
    "sgd": dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
    "adamw": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False),
    "radam": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "adabelief": dict(
        lr=1e-2, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False, rectify=True
    ),
}
GAIN_DEFAULTS = dict(maximize=False, gain_inc=2.0, gain_dec=0.5, min_gain=0.0, max_gain=float("inf"))

# every option of every optimizer, alone or combined; clamps that bind in both directions
CONFIGS = [
    ("sgd", {}),
    ("sgd", dict(nesterov=True, weight_decay=0.01)),
    ("sgd", dict(dampening=0.3, maximize=True)),
    ("sgd", dict(min_gain=0.8, max_gain=1.5)),
    ("adamw", {}),
    ("adamw", dict(amsgrad=True, maximize=True)),
    ("adamw", dict(weight_decay=0.0, lr=torch.tensor(3e-3))),
    ("adamw", dict(gain_inc=0.3, gain_dec=0.9, min_gain=0.6, max_gain=2.0)),
    ("radam", {}),
    ("radam", dict(weight_decay=0.1, maximize=True)),
    ("adabelief", {}),
    ("adabelief", dict(rectify=False)),
    ("adabelief", dict(amsgrad=True, weight_decay=0.1, maximize=True)),
    ("adabelief", dict(min_gain=0.5, max_gain=3.0)),
]
CONFIG_IDS = [f"{opt}-{'-'.join(o) or 'defaults'}" for opt, o in CONFIGS]
# odd sizes around the SIMD widths and the 65536-element chunk, and an empty tensor
SIZES = (1, 15, 17, 0, 65537, 300)
# the steps' boundaries; tensors start at steps 0, 3 and 6, so RAdam's rectification switches on
SCHEDULE = (Boundary.ROLL, Boundary.NONE, Boundary.UPDATE, Boundary.NONE, Boundary.UPDATE)


def make_bucket(optimizer, overrides=None, dtype=torch.float32, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hyper = {**DEFAULTS[optimizer], **GAIN_DEFAULTS, **(overrides or {})}

    def randn(n, dt=dtype):
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dt)

    def grad_sum(n):
        g = randn(n, torch.float32)
        g[::7] = 0  # sign 0: the gain decreases
        return g

    keys = [k for k in STATE_KEYS[optimizer] if hyper.get("amsgrad") or k not in AMSGRAD_KEYS]
    sd = state_dtype(dtype)
    return Bucket(
        optimizer,
        params=[randn(n) for n in sizes],
        grads=[randn(n) for n in sizes],
        gains=[torch.rand(n, generator=gen) * 3 + 0.25 for n in sizes],
        grad_sums=[grad_sum(n) for n in sizes],
        prev_signs=[torch.randint(-1, 2, (n,), generator=gen, dtype=torch.int8) for n in sizes],
        steps=[torch.tensor(3.0 * (i % 3)) for i in range(len(sizes))],
        # second moments non-negative, as they are in a real run
        state={k: [randn(n, sd).abs() if k != "exp_avg" and k != "momentum_buffer" else randn(n, sd)
                   for n in sizes] for k in keys},
        hyper=hyper,
    )


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
    return dict(params=bucket.params, grads=bucket.grads, gains=bucket.gains,
                grad_sums=bucket.grad_sums, prev_signs=bucket.prev_signs, steps=bucket.steps,
                **bucket.state)


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
            assert torch.equal(x, y), f"{key}[{i}] differs"


@pytest.mark.parametrize(("optimizer", "overrides"), CONFIGS, ids=CONFIG_IDS)
def test_float64_matches_reference(optimizer, overrides):
    fused = make_bucket(optimizer, overrides, torch.float64)
    ref = copy.deepcopy(fused)
    grads = make_grads(fused)
    run(cpu.step, fused, grads)
    run(reference.step, ref, grads)
    for key, ref_list in tensors(ref).items():
        for i, (x, y) in enumerate(zip(tensors(fused)[key], ref_list)):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14, msg=f"{key}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("optimizer", "overrides"), CONFIGS, ids=CONFIG_IDS)
def test_low_precision_error_at_most_twice_the_reference(optimizer, overrides, dtype):
    """flash-attention's rule: against a float64 run, the fused kernel's error is at most 2x the
    error of the reference run in the same precision."""
    fused = make_bucket(optimizer, overrides, dtype)
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
            assert err_fused <= 2 * err_ref + 1e-12, f"{key}[{i}]: {err_fused} vs reference {err_ref}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_grad_scale_matches_reference(dtype, scale):
    fused = make_bucket("adamw", dict(amsgrad=True, maximize=True), dtype)
    fused.grad_scale = torch.tensor([scale])
    fused.found_inf = torch.zeros(1)
    ref = copy.deepcopy(fused)
    grads = make_grads(fused)
    run(cpu.step, fused, grads)
    run(reference.step, ref, grads)
    for key, ref_list in tensors(ref).items():
        for x, y in zip(tensors(fused)[key], ref_list):
            torch.testing.assert_close(x, y, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-7)


def assert_found_inf_applies_only_the_boundary(step, boundary, dtype, move=copy.deepcopy,
                                               read=tensors):
    """``step`` on ``move(bucket)`` with found_inf set equals the reference and changes nothing
    but the boundary's gains, sums and signs (the cuda tests reuse this on CUDA tensors)."""
    ref = make_bucket("adabelief", dict(amsgrad=True, min_gain=0.5, max_gain=3.0), dtype)
    ref.boundary = boundary
    ref.found_inf = torch.ones(1)
    ref.grad_scale = torch.tensor([8.0])
    before = copy.deepcopy(ref)
    fused = move(ref)
    step(fused)
    reference.step(ref)
    assert_all_equal(read(fused), tensors(ref))
    untouched = {k: v for k, v in read(fused).items()
                 if k not in ("gains", "grad_sums", "prev_signs")}
    assert_all_equal(untouched, {k: tensors(before)[k] for k in untouched})


@pytest.mark.parametrize("boundary", list(Boundary))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_found_inf_applies_only_the_boundary(boundary, dtype):
    assert_found_inf_applies_only_the_boundary(cpu.step, boundary, dtype)


def test_results_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for dtype in (torch.float32, torch.bfloat16):
                bucket = make_bucket("adamw", dict(amsgrad=True), dtype, sizes=(200_003, 70_001, 3))
                run(cpu.step, bucket, make_grads(bucket))
                results.append(tensors(bucket))
    finally:
        torch.set_num_threads(threads)
    assert_all_equal(results[0], results[2])
    assert_all_equal(results[1], results[3])


@pytest.mark.parametrize("optimizer", list(DEFAULTS))
def test_many_tiny_and_empty_tensors(optimizer):
    sizes = [i % 23 for i in range(300)]  # includes empty tensors
    fused = make_bucket(optimizer, {}, torch.float64, sizes=sizes)
    ref = copy.deepcopy(fused)
    grads = make_grads(fused)
    run(cpu.step, fused, grads)
    run(reference.step, ref, grads)
    for key, ref_list in tensors(ref).items():
        for x, y in zip(tensors(fused)[key], ref_list):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)


_CAPABILITY_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_cpu_backend as t
results = {{}}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for optimizer, overrides in (("adamw", dict(amsgrad=True)), ("adabelief", {{}}), ("sgd", dict(nesterov=True))):
        bucket = t.make_bucket(optimizer, overrides, dtype, sizes=(1, 15, 17, 33, 1000))
        t.run(t.cpu.step, bucket, t.make_grads(bucket))
        results[(optimizer, str(dtype))] = t.tensors(bucket)
torch.save((torch.backends.cpu.get_cpu_capability(), results), {out!r})
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_simd_build_gives_identical_results(capability, tmp_path):
    """Each capability's kernels (picked with ATEN_CPU_CAPABILITY) round exactly like the others."""
    outputs = {}
    for cap in ("default", capability):
        out = str(tmp_path / f"{cap}.pt")
        script = _CAPABILITY_SCRIPT.format(tests=os.path.dirname(__file__), out=out)
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        subprocess.run([sys.executable, "-c", script], env=env, check=True)
        outputs[cap] = torch.load(out)
    used, results = outputs[capability]
    if used.lower() != capability and capability != "default":
        pytest.skip(f"this machine cannot run {capability} (torch uses {used})")
    for key, expected in outputs["default"][1].items():
        assert_all_equal(results[key], expected)


def _valid_bucket():
    bucket = make_bucket("adamw", dict(amsgrad=True), torch.float32, sizes=(5, 6, 7))
    bucket.boundary = Boundary.UPDATE
    return bucket


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
    "lr_dtype": (lambda b: b.hyper.update(lr=torch.tensor(1, dtype=torch.int64)), r"lr must be a one-element float32 or float64"),
    "lr_numel": (lambda b: b.hyper.update(lr=torch.full((2,), 1e-3)), r"lr must be a one-element"),
    "amsgrad_off_with_list": (lambda b: b.hyper.update(amsgrad=False), r"adamw with these hyperparameters keeps 2 states per param \(exp_avg, exp_avg_sq\), so states must hold 2 \* 3 = 6 tensors \(state-major\), got 9"),
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
    relaid, contiguous = _relayout(make_bucket("adamw", dict(amsgrad=True), dtype, sizes=(120, 7)), layout)
    watched = (relaid.params[0], relaid.state["exp_avg"][0])
    layout_before = [(t.data_ptr(), t.stride()) for t in watched]
    copied = []
    original = cpu._step_on_flat_copies
    monkeypatch.setattr(cpu, "_step_on_flat_copies", lambda *args: (copied.append(1), original(*args)))
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
    bucket = make_bucket("sgd", {}, torch.float32, sizes=(120, 7))
    bucket.params[1] = _strided(torch.zeros(120))[:7]
    op, kwargs = cpu.op_call(bucket)
    with pytest.raises(NotImplementedError, match=r"params\[1\] of shape \[7\] and strides \[2\] does"):
        op(**kwargs)
    bucket = make_bucket("sgd", {}, torch.float32, sizes=(120, 7))
    bucket.params[0] = _channels_last(bucket.params[0])
    for key in ("grads", "gains", "grad_sums", "prev_signs"):
        getattr(bucket, key)[0] = getattr(bucket, key)[0].reshape(2, 3, 4, 5)
    bucket.state["momentum_buffer"][0] = _channels_last(bucket.state["momentum_buffer"][0])
    op, kwargs = cpu.op_call(bucket)
    message = r"grads\[0\] has strides \[60, 20, 5, 1\] but params\[0\] has strides \[60, 1, 15, 3\]"
    with pytest.raises(NotImplementedError, match=message):
        op(**kwargs)


@pytest.mark.parametrize("optimizer", list(DEFAULTS))
def test_ops_pass_opcheck(optimizer):
    """Schema, fake (Meta) kernel, autograd registration and AOT dispatch, as torch.compile needs."""
    bucket = make_bucket(optimizer, dict(amsgrad=True), sizes=(3, 5))
    bucket.boundary = Boundary.UPDATE
    op, kwargs = cpu.op_call(bucket)
    torch.library.opcheck(op, (), kwargs)


def test_meta_tensors_run_the_no_op_fake_kernel():
    bucket = make_bucket("adabelief", dict(amsgrad=True), sizes=(3, 4))
    meta = copy.deepcopy(bucket)
    for key, values in tensors(meta).items():
        values[:] = [t.to("meta") for t in values]
    cpu.step(meta)


def test_unavailable_off_cpu():
    assert "CPU tensors only" in cpu.unavailable_reason(torch.device("meta"))
