"""The fused CUDA backend (csrc/cuda via torch.ops.adaptive_lr) against the reference backend.

Tests marked ``cuda`` need a CUDA GPU and an adaptive_lr._C built with its CUDA kernels; they skip
cleanly elsewhere (docs/cuda.md lists what the first GPU run must check). They run the cpu
backend's parity matrix (tests/test_cpu_backend.py: every optimizer and option, float64 against the
reference, low precision at most 2x the reference's error, over a schedule of epoch boundaries) on
CUDA tensors, and the CUDA-only cases: launches split by the plan, misaligned views, found_inf,
CUDA graphs across epoch boundaries, no host sync, tensors past 2^31 elements. The tests without
the mark run everywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import subprocess
import sys

import pytest
import torch

from adaptive_lr import ActiveAdaBelief, ActiveAdamW, ActiveRAdam, ActiveSGD, backends
from adaptive_lr.backends import cpu, cuda, reference, triton
from adaptive_lr.backends import lr as lr_module
from adaptive_lr.backends.lr import lr_tensor
from adaptive_lr.backends.bucket import Boundary, Bucket
from optim_configs import CONFIGS, assert_no_host_sync, config
from test_cpu_backend import (
    FOUND_INF_ROWS,
    _op_call,
    assert_all_equal,
    assert_found_inf_applies_only_the_boundary,
    make_bucket,
    make_grads,
    run,
    tensors,
    to_float64,
)

_GPU_REASON = cuda.unavailable_reason(torch.device("cuda"))
SGD = config("defaults", cls=ActiveSGD)
AMSGRAD_ADAMW = config("amsgrad", cls=ActiveAdamW)


def gpu(test):
    """Marks a test ``cuda`` and skips it where the cuda backend cannot run."""
    skip = pytest.mark.skipif(_GPU_REASON is not None, reason=f"cuda backend: {_GPU_REASON}")
    return pytest.mark.cuda(skip(test))


_LISTS = ("params", "grads", "gains", "grad_sums", "prev_signs", "steps")


def moved(bucket: Bucket, device, place=lambda t, device: t.to(device)) -> Bucket:
    """A copy of ``bucket`` with every tensor (lr, grad_scale and found_inf too) on ``device``."""
    b = copy.deepcopy(bucket)
    for name in _LISTS:
        setattr(b, name, [place(t, device) for t in getattr(b, name)])
    if b.grad_sq_sums is not None:
        b.grad_sq_sums = [place(t, device) for t in b.grad_sq_sums]
    b.state = {k: [place(t, device) for t in v] for k, v in b.state.items()}
    for name in ("grad_scale", "found_inf"):
        if getattr(b, name) is not None:
            setattr(b, name, getattr(b, name).to(device))
    if isinstance(b.hyper.lr, torch.Tensor):
        b.hyper = dataclasses.replace(b.hyper, lr=b.hyper.lr.to(device))
    b.device = torch.device(device)
    return b


def on_cpu(bucket: Bucket) -> dict[str, list[torch.Tensor]]:
    return {k: [t.cpu() for t in v] for k, v in tensors(bucket).items()}


def assert_close_to(bucket: Bucket, expected: Bucket, rtol: float, atol: float) -> None:
    ours = on_cpu(bucket)
    for key, values in tensors(expected).items():
        for i, (x, y) in enumerate(zip(ours[key], values)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f"{key}[{i}]")


# ---- everywhere ---------------------------------------------------------------------------------


def test_unavailable_off_cuda():
    assert "CUDA tensors only" in cuda.unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA")
def test_unavailable_with_a_cpu_torch_names_the_build():
    reason = cuda.unavailable_reason(torch.device("cuda"))
    assert "without its CUDA kernels" in reason and "has CUDA None" in reason
    with pytest.raises(RuntimeError, match="without its CUDA kernels"):
        cuda.step(make_bucket(SGD, sizes=(3,)))


def test_auto_prefers_the_cuda_backend_on_cuda_devices(monkeypatch):
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: None)
    monkeypatch.delenv("ADAPTIVE_LR_BACKEND", raising=False)
    assert backends.resolve("auto", torch.device("cuda")) is cuda.step


def test_a_cpu_lr_is_read_as_it_is():
    given = torch.tensor(3e-3)
    assert lr_tensor(given, torch.zeros(3)) is given
    wrapped = lr_tensor(0.1, torch.zeros(3))
    assert wrapped.dtype == torch.float64 and wrapped.item() == 0.1


@gpu
def test_a_float_lr_lives_in_one_device_tensor_per_bucket():
    first, other = torch.zeros(3, device="cuda"), torch.zeros(3, device="cuda")
    lr = lr_tensor(0.1, first)
    assert lr.dtype == torch.float64 and lr.item() == 0.1
    assert lr_tensor(0.1, first) is lr
    assert lr_tensor(0.25, first) is lr and lr.item() == 0.25  # refreshed in place
    assert lr_tensor(0.25, other) is not lr
    given = torch.tensor(3e-3, device="cuda")
    assert lr_tensor(given, first) is given  # a tensor on the device is read as it is
    held = len(lr_module._FLOAT_LRS)
    del other
    gc.collect()
    assert len(lr_module._FLOAT_LRS) == held - 1  # freed with its param, never while it lives


def test_gpus_older_than_the_built_kernels_are_left_to_other_backends(monkeypatch):
    monkeypatch.setattr(cuda, "_build_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 7.5" in cuda.unavailable_reason(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert cuda.unavailable_reason(torch.device("cuda:0")) is None


# ---- the parity matrix on CUDA tensors ----------------------------------------------------------


@gpu
@pytest.mark.parametrize("row", CONFIGS, ids=lambda c: c.id)
def test_float64_matches_reference(row):
    ref = make_bucket(row, torch.float64)
    fused = moved(ref, "cuda")
    grads = make_grads(ref)
    run(cuda.step, fused, grads)
    run(reference.step, ref, grads)
    assert_close_to(fused, ref, rtol=1e-10, atol=1e-14)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row", CONFIGS, ids=lambda c: c.id)
def test_low_precision_error_at_most_twice_the_reference(row, dtype):
    ref = make_bucket(row, dtype)
    fused, exact = moved(ref, "cuda"), to_float64(ref)
    grads = make_grads(ref)
    run(cuda.step, fused, grads)
    run(reference.step, ref, grads)
    run(reference.step, exact, grads)
    ours = on_cpu(fused)
    for key, exact_list in tensors(exact).items():
        for i, e in enumerate(exact_list):
            if e.numel() == 0:
                continue
            err_fused = (ours[key][i].double() - e.double()).abs().max().item()
            err_ref = (tensors(ref)[key][i].double() - e.double()).abs().max().item()
            assert err_fused <= 2 * err_ref + 1e-12, \
                f"{key}[{i}]: {err_fused} vs reference {err_ref}"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row", CONFIGS, ids=lambda c: c.id)
def test_bit_identical_to_the_cpu_backend(row, dtype):
    """Both call math.h per element without FMA contraction and with IEEE division and sqrt; only
    the per-tensor scalars (double pow on the device vs glibc) may differ, by a double ulp that
    rounding to float32 absorbs."""
    on_host = make_bucket(row, dtype)
    fused = moved(on_host, "cuda")
    grads = make_grads(on_host)
    run(cuda.step, fused, grads)
    run(cpu.step, on_host, grads)
    assert_all_equal(on_cpu(fused), tensors(on_host))


@gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_grad_scale_matches_reference(dtype, scale):
    ref = make_bucket(AMSGRAD_ADAMW, dtype, maximize=True)
    ref.grad_scale = torch.tensor([scale])
    ref.found_inf = torch.zeros(1)
    fused = moved(ref, "cuda")
    grads = make_grads(ref)
    run(cuda.step, fused, grads)
    run(reference.step, ref, grads)
    assert_close_to(fused, ref, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-7)


@gpu
@pytest.mark.parametrize("row", FOUND_INF_ROWS, ids=lambda c: c.id)
@pytest.mark.parametrize("boundary", list(Boundary))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_found_inf_applies_only_the_boundary(boundary, dtype, row):
    assert_found_inf_applies_only_the_boundary(cuda.step, boundary, dtype, row,
                                               move=lambda b: moved(b, "cuda"), read=on_cpu)


# ---- what only the CUDA launcher does -----------------------------------------------------------


@gpu
def test_a_bucket_split_over_several_launches():
    """More tensors than a launch has slots (24) and a tensor with more chunks than a launch has
    blocks (320 of 65536 elements): the split tensor continues in the next launch, and every step
    counter advances exactly once per step."""
    sizes = (3,) * 30 + (320 * 65536 + 5,) + (7,) * 5 + (0,)
    on_host = make_bucket(AMSGRAD_ADAMW, torch.float32, sizes=sizes)
    fused = moved(on_host, "cuda")
    grads = make_grads(on_host, steps=3)
    run(cuda.step, fused, grads)
    run(cpu.step, on_host, grads)
    assert_all_equal(on_cpu(fused), tensors(on_host))


def _misaligned(t: torch.Tensor, device) -> torch.Tensor:
    """A contiguous copy of t on device whose first element is one element past an allocation."""
    if t.dim() == 0:  # the step counters: one element, alignment is moot
        return t.to(device)
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    return buffer[1:].view(t.shape).copy_(t)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views_take_the_scalar_path(dtype):
    on_host = make_bucket(config("amsgrad", cls=ActiveAdaBelief), dtype, sizes=(1, 17, 65537, 300))
    fused = moved(on_host, "cuda", place=_misaligned)
    assert fused.params[2].data_ptr() % 16 != 0
    grads = make_grads(on_host)
    run(cuda.step, fused, grads)
    run(cpu.step, on_host, grads)
    assert_all_equal(on_cpu(fused), tensors(on_host))


def _strided(t: torch.Tensor, device) -> torch.Tensor:
    """A copy of t on device that does not fill its memory (every other element)."""
    if t.dim() == 0:
        return t.to(device)
    return torch.empty((*t.shape, 2), dtype=t.dtype, device=device)[..., 0].copy_(t)


@gpu
def test_layouts_the_kernels_cannot_index_run_on_contiguous_copies():
    on_host = make_bucket(AMSGRAD_ADAMW, torch.float32, sizes=(17, 65537))
    fused = moved(on_host, "cuda", place=_strided)
    grads = make_grads(on_host)
    run(cuda.step, fused, grads)
    run(cpu.step, on_host, grads)
    assert not fused.params[1].is_contiguous()
    assert_all_equal(on_cpu(fused), tensors(on_host))


_TRITON_REASON = triton.unavailable_reason(torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [
    pytest.param(cuda, id="cuda", marks=pytest.mark.skipif(
        _GPU_REASON is not None, reason=f"cuda backend: {_GPU_REASON}")),
    pytest.param(triton, id="triton", marks=pytest.mark.skipif(
        _TRITON_REASON is not None or not torch.cuda.is_available(),
        reason=f"triton backend on cuda: {_TRITON_REASON or 'no CUDA device'}")),
])
def test_cuda_graphs_replay_every_boundary_kind(backend):
    """One graph per boundary kind (the only per-step value that is a launch argument), replayed
    in an epoch clock's order while grads, an lr tensor and found_inf change in place between
    replays: the same result as the reference stepping eagerly. For both fused CUDA backends."""
    graphed = moved(make_bucket(config("defaults", cls=ActiveRAdam), torch.float32,
                                sizes=(70_000, 3, 0, 65536), lr=torch.tensor(1e-2)), "cuda")
    graphed.grad_scale = torch.full((1,), 4.0, device="cuda")
    graphed.found_inf = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: every kind once, eagerly (as torch.cuda.graph asks)
        for kind in Boundary:
            graphed.boundary = kind
            backend.step(graphed)
    torch.cuda.current_stream().wait_stream(side)
    ref = moved(graphed, "cpu")
    graphs = {}
    for kind in Boundary:
        graphed.boundary = kind
        graphs[kind] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[kind]):
            backend.step(graphed)

    schedule = [Boundary.NONE, Boundary.NONE, Boundary.UPDATE, Boundary.NONE, Boundary.ROLL,
                Boundary.NONE, Boundary.UPDATE]
    overflow_at = 3
    for t, kind in enumerate(schedule):
        for g, r in zip(graphed.grads, ref.grads):
            new = torch.randn(r.shape, dtype=r.dtype)
            g.copy_(new)
            r.copy_(new)
        for b in (graphed, ref):
            b.hyper.lr.mul_(0.9)
            b.found_inf.fill_(float(t == overflow_at))
        ref.boundary = kind
        graphs[kind].replay()
        reference.step(ref)
    torch.cuda.synchronize()
    assert_close_to(graphed, ref, rtol=1e-5, atol=1e-6)
    assert [s.item() for s in graphed.steps] == [s.item() for s in ref.steps]


@gpu
def test_steps_never_sync_with_the_host():
    bucket = moved(make_bucket(AMSGRAD_ADAMW, sizes=(70_000, 5, 0), lr=torch.tensor(1e-3)),
                   "cuda")
    bucket.grad_scale = torch.full((1,), 2.0, device="cuda")
    bucket.found_inf = torch.zeros(1, device="cuda")
    params = [torch.randn(n, device="cuda", requires_grad=True) for n in (70_000, 5)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ActiveAdamW(params, lr=1e-3, steps_per_epoch=2, backend="cuda")  # a float lr

    def steps():
        for kind in Boundary:
            bucket.boundary = kind
            cuda.step(bucket)
            bucket.hyper.lr.mul_(0.9)
        bucket.found_inf.fill_(1.0)
        cuda.step(bucket)
        bucket.found_inf.zero_()
        for lr in (1e-3, 5e-4, 5e-4, 2e-4):  # every boundary kind; the float lr changes
            opt.param_groups[0]["lr"] = lr
            opt.step()

    assert_no_host_sync(steps)  # warm-up allocates the arrival counters and the device lr


_CAPTURE_FIRST_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_cuda_backend import SGD, cuda, make_bucket, moved
bucket = moved(make_bucket(SGD, sizes=(5,), lr=torch.tensor(0.05)), "cuda")
try:
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        cuda.step(bucket)
except RuntimeError as error:
    assert "once outside a CUDA graph capture" in str(error), error
else:
    raise AssertionError("a capture before any eager step was not refused")
"""


@gpu
def test_capturing_before_any_eager_step_is_refused():
    """In a fresh process: arrival counters are kept by the step counter's address, which a
    tensor freed by an earlier test may have had."""
    script = _CAPTURE_FIRST_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], check=True)


@gpu
def test_a_new_float_lr_inside_a_capture_is_refused():
    bucket = moved(make_bucket(SGD, sizes=(5,), lr=0.125), "cuda")
    cuda.step(bucket)
    bucket.hyper = dataclasses.replace(bucket.hyper, lr=0.25)
    with pytest.raises(RuntimeError, match="pass lr as a device tensor"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            cuda.step(bucket)
    assert lr_tensor(0.125, bucket.params[0]).item() == 0.125  # the cache is unchanged


@gpu
@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (lambda b: b.grads.__setitem__(-1, b.grads[-1].cpu()), r"grads\[2\] must be on cuda"),
        (lambda b: b.steps.__setitem__(0, b.steps[0].cpu()), r"steps\[0\] must be a one-element"),
        (lambda b: setattr(b, "found_inf", torch.zeros(1)), r"found_inf must be a one-element"),
        (lambda b: b.state["exp_avg"].__setitem__(-1, b.state["exp_avg"][-1].double()),
         r"exp_avgs\[2\] must have dtype Float"),
    ],
    ids=["grad_on_cpu", "step_on_cpu", "found_inf_on_cpu", "state_dtype"],
)
def test_invalid_input_raises_and_changes_nothing(breaker, message):
    bucket = moved(make_bucket(AMSGRAD_ADAMW, sizes=(5, 6, 7)), "cuda")
    bucket.boundary = Boundary.UPDATE
    breaker(bucket)
    before = copy.deepcopy(on_cpu(bucket))
    with pytest.raises(RuntimeError, match=message):
        cuda.step(bucket)
    assert_all_equal(on_cpu(bucket), before)


@gpu
@pytest.mark.parametrize("row", CONFIGS, ids=lambda c: c.id)
def test_op_passes_opcheck(row):
    """Schema, fake (Meta) kernel, autograd registration and AOT dispatch with CUDA tensors."""
    bucket = moved(make_bucket(row, sizes=(3, 5), lr=torch.tensor(1e-2)), "cuda")
    bucket.boundary = Boundary.UPDATE
    op, kwargs = _op_call(bucket)
    torch.library.opcheck(op, (), kwargs)


@gpu
@pytest.mark.slow
def test_a_tensor_beyond_2_31_elements():
    n = 2**31 + 4099  # 64-bit offsets: about 37 GB with bf16 params and SGD state
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs a GPU with >= 48 GiB")
    kw = dict(device="cuda")
    sgd = SGD.make([torch.zeros(1, requires_grad=True)], backend="reference", lr=0.5,
                   momentum=0.0).param_groups[0]
    bucket = Bucket(
        ActiveSGD.spec,
        params=[torch.zeros(n, dtype=torch.bfloat16, **kw)],
        grads=[torch.ones(n, dtype=torch.bfloat16, **kw)],
        gains=[torch.ones(n, **kw)],
        grad_sums=[torch.zeros(n, **kw)],
        prev_signs=[torch.zeros(n, dtype=torch.int8, **kw)],
        steps=[torch.zeros((), **kw)],
        state={"momentum_buffer": [torch.zeros(n, **kw)]},
        hyper=ActiveSGD.spec.record(sgd),
    )
    cuda.step(bucket)
    torch.cuda.synchronize()
    for ends in (bucket.params[0][:5000], bucket.params[0][-5000:]):
        assert torch.equal(ends.float().cpu(), torch.full((5000,), -0.5))
    assert bucket.steps[0].item() == 1 and bucket.grad_sums[0][-1].item() == 1.0
