"""Triton backend specifics, beyond the generic backend tests (test_backend_parity, test_amp,
test_bad_input, test_checkpoint include "triton" wherever available_backends("cpu") lists it).

Without a GPU these run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): small sizes, the whole file in well under a minute. Tests marked ``cuda``
need a real GPU (docs/triton.md lists what a first GPU run must check) and skip cleanly here.

bfloat16 under the interpreter: the interpreter's float32->bfloat16 conversion truncates where
GPUs round to nearest even, so the kernel rounds in software first when (and only when) it runs
under the interpreter (``SOFTWARE_BF16_ROUNDING``); bf16 results are then bit-exact with the
reference here, and the GPU path's hardware rounding is checked by the cuda tests.
"""

import ast
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

import adaptive_lr
from adaptive_lr import (
    ActiveAdaBelief, ActiveAdam, ActiveAdamW, ActiveLion, ActiveRAdam, ActiveSGD, available_backends,
)
from adaptive_lr.backends import layout
from adaptive_lr.backends import triton as triton_backend
from optim_configs import (
    CONFIGS, DTYPES, assert_no_host_sync, clone_params, config, configs, grad_sequence,
    make_params, run,
)

INTERPRETED = "triton" in available_backends("cpu")
HAS_CUDA = torch.cuda.is_available()
interpreter = pytest.mark.skipif(
    not INTERPRETED, reason=f"triton on CPU: {triton_backend.unavailable_reason(torch.device('cpu'))}")

if INTERPRETED or HAS_CUDA:
    from adaptive_lr import kernels
    from adaptive_lr.kernels import launch

# One config per optimizer, with the options that change the kernel's code path (SGD's: nesterov,
# and the sign test on its own grad_sq_sum row).
REPRESENTATIVE = [
    config("nesterov", "grad_sq_sum", cls=ActiveSGD),
    config("amsgrad", cls=ActiveAdamW),
    config("both_rectify_branches", cls=ActiveRAdam),  # both sides of rho_t > 5
    config("amsgrad", "clamps", cls=ActiveAdaBelief),
]


def _compare(config, shapes, dtype, steps=7, device="cpu", skip=(), atol=None, **overrides):
    """Run the reference and the triton backend on the same data; return both optimizers."""
    overrides.setdefault("steps_per_epoch", 2)
    start = [p.to(device) for p in make_params(dtype, shapes=shapes)]
    grads = [[g.to(device) for g in step] for step in grad_sequence(shapes, steps, dtype)]
    ref_params, ref_opt = run(config, dtype, steps, "reference", clone_params(start), grads, skip,
                              **overrides)
    out_params, out_opt = run(config, dtype, steps, "triton", clone_params(start), grads, skip,
                              **overrides)
    _assert_same(ref_params, ref_opt, out_params, out_opt, dtype, atol)
    return ref_opt, out_opt


def _assert_same(ref_params, ref_opt, out_params, out_opt, dtype, atol=None):
    # the interpreter default: float32 within a few ulps; bf16/fp16 params come out bit-exact
    # (tolerance far below their ulp; float32 state within a few ulps)
    tol = (1e-12 if dtype == torch.float64 else 1e-5) if atol is None else atol
    for p_ref, p_out in zip(ref_params, out_params):
        s_ref, s_out = ref_opt.state[p_ref], out_opt.state[p_out]
        assert torch.equal(s_ref["step"].cpu(), s_out["step"].cpu())
        assert torch.equal(s_ref["prev_sign"].cpu(), s_out["prev_sign"].cpu())
        assert torch.equal(s_ref["gain"].cpu(), s_out["gain"].cpu())
        torch.testing.assert_close(p_out.detach().cpu(), p_ref.detach().cpu(), rtol=tol, atol=tol)
        for key, value in s_ref.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(s_out[key].cpu(), value.cpu(), rtol=tol, atol=tol)


# ActiveAdam and ActiveLion, with every option their update has
ADAM_LION = configs(cls=ActiveAdam) + configs(cls=ActiveLion)
SPECS = [cls.spec for cls in map(adaptive_lr.__dict__.get, adaptive_lr.__all__)
         if hasattr(cls, "spec")]


def _arrivals_are_zero():
    return all(not plan.arrivals.any() for plan in launch._plans.values())


# ---- availability --------------------------------------------------------------------------


def test_unavailable_reasons_are_clear(monkeypatch):
    assert "not mps" in triton_backend.unavailable_reason(torch.device("mps"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in reason or "not installed" in reason
    with pytest.raises(RuntimeError, match="unavailable on cpu"):
        ActiveAdamW([torch.zeros(2, requires_grad=True)], steps_per_epoch=2, backend="triton")
    monkeypatch.setattr(triton_backend.importlib.util, "find_spec", lambda name: None)
    assert triton_backend.unavailable_reason(torch.device("cuda")) == \
        "triton is not installed (pip install triton)"


@pytest.mark.skipif("ADAPTIVE_LR_EXPECT_TRITON" not in os.environ,
                    reason="only in scripts/test.sh's run under the oldest supported triton")
def test_the_expected_triton_runs_the_tests():
    """That run must not pass by skipping: its triton is the one asked for, and it runs."""
    import triton

    assert triton.__version__ == os.environ["ADAPTIVE_LR_EXPECT_TRITON"]
    assert HAS_CUDA or INTERPRETED, triton_backend.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize(("triton_version", "numpy_version", "interpret", "expected"), [
    ("3.4.0", "2.4.6", False, None),  # compiled kernels: numpy plays no part
    ("3.4.0", "2.3.5", True, None),
    ("3.6.0", "2.4.6", True, "the Triton interpreter of triton 3.6.0 fails with numpy 2.4.6"),
    ("3.7.1", "2.4.6", True, None),
    ("3.10.0", "2.4.6", True, None),
    ("3.9.0", None, True, "the Triton interpreter needs numpy"),
    ("3.3.1", "2.2.6", False, "triton 3.3.1 is older than 3.4"),
    ("3.2.0+git4a0de0c4", None, True, "triton 3.2.0+git4a0de0c4 is older than 3.4"),
])
def test_supported_triton_and_numpy_versions(triton_version, numpy_version, interpret, expected):
    reason = triton_backend.version_reason(triton_version, numpy_version, interpret)
    assert reason == expected if expected is None else reason.startswith(expected)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_a_triton_older_than_3_4_is_left_to_other_backends(monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "3.3.1")
    for device in ("cpu", "cuda"):
        reason = triton_backend.unavailable_reason(torch.device(device))
        assert reason.startswith("triton 3.3.1 is older than 3.4"), reason
        assert "triton" not in available_backends(device)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernels_ship_as_adaptive_lr_kernels():
    """setup.py must map kernels/ to the package adaptive_lr.kernels (package_dir)."""
    assert importlib.util.find_spec("adaptive_lr.kernels") is not None, (
        "adaptive_lr.kernels is not installed: setup.py needs packages=[..., "
        "'adaptive_lr.kernels'] and package_dir={'adaptive_lr.kernels': 'kernels'}, then reinstall")


@interpreter
def test_listed_for_cpu_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" in available_backends("cpu")
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None


# ---- one kernel, each optimizer's update ------------------------------------------------------


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs triton")
def test_wrong_hyperparameter_names_or_update_are_refused():
    p = torch.zeros(3)
    rows = [[p], [p.clone()], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3, dtype=torch.int8)],
            [torch.zeros(())], [torch.zeros(3)], [torch.zeros(3)]]
    args = dict(lr=torch.tensor(0.1, dtype=torch.float64), weight_decay=0.0,
                gain_rule=(2.0, 0.5, 0.0, math.inf, 0.0, False), epoch_steps=3, maximize=False,
                boundary=0, contiguous=True)
    adamw = dict(beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=0.0)
    lion = dict(beta1=0.9, beta2=0.99)
    with pytest.raises(ValueError, match=r"adamw takes the hyperparameters \('beta1', 'beta2', "
                       r"'eps', 'amsgrad'\); missing \['amsgrad'\], unknown \[\]"):
        kernels.active_step("adamw", rows, dict(beta1=0.9, beta2=0.999, eps=1e-8), **args)
    with pytest.raises(ValueError, match=r"missing \['beta2'\], unknown \['beta_2'\]"):
        kernels.active_step("lion", rows[:7], dict(beta1=0.9, beta_2=0.99), **args)
    with pytest.raises(ValueError, match=r"missing \[\], unknown \['rectify'\]"):
        kernels.active_step("adamw", rows, dict(adamw, rectify=0.0), **args)
    with pytest.raises(ValueError, match="no update 'adamx'"):
        kernels.active_step("adamx", rows, adamw, **args)
    with pytest.raises(ValueError, match="lion with sign_threshold 1.0 takes grad_sq_sums"):
        kernels.active_step("lion", rows[:7], lion,
                            **dict(args, gain_rule=(2.0, 0.5, 0.0, math.inf, 1.0, False)))
    with pytest.raises(ValueError, match="lion with sign_threshold 0.0 takes no grad_sq_sums"):
        kernels.active_step("lion", rows[:7], lion, grad_sq_sums=[torch.zeros(3)], **args)
    with pytest.raises(ValueError, match=r"gain_rule is \(gain_inc, gain_dec, min_gain"):
        kernels.active_step("lion", rows[:7], lion,
                            **dict(args, gain_rule=(2.0, 0.5, 0.0, math.inf, 0.0)))
    with pytest.raises(ValueError, match=r"relax_gains needs the sign test"):
        kernels.active_step("lion", rows[:7], lion,
                            **dict(args, gain_rule=(2.0, 0.5, 0.0, math.inf, 0.0, True)))
    assert torch.equal(p, torch.zeros(3)) and rows[5][0].item() == 0  # nothing ran


def test_kernels_import_nothing_of_adaptive_lr():
    """Dependencies go one way: the backend calls the kernels, never the reverse."""
    kernels_dir = os.path.join(os.path.dirname(__file__), os.pardir, "kernels")
    for name in sorted(os.listdir(kernels_dir)):
        if name.endswith(".py"):
            with open(os.path.join(kernels_dir, name)) as f:
                tree = ast.parse(f.read())
            modules = [node.module or "" for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom)]
            modules += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for a in node.names]
            assert not [m for m in modules if m.startswith("adaptive_lr")], name


@interpreter
@pytest.mark.parametrize("config", ADAM_LION, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_adam_and_lion_match_the_reference(config, dtype):
    """2 steps per epoch over 7 steps: roll, then two gain updates; a grad skipped across a
    boundary; a scalar and a tensor of several blocks."""
    _compare(config, [(5, 3), (17,), (), (1100,)], dtype, steps=7, skip={(2, 1), (3, 1)})


# ---- sizes: many tiny tensors, odd sizes, several chunks, empty tensors ---------------------


@interpreter
def test_many_tiny_tensors_in_one_launch():
    shapes = [(1 + i % 7,) for i in range(100)]
    kernels.clear_plan_cache()
    _compare(config("defaults", cls=ActiveAdamW), shapes, torch.float32, steps=3, steps_per_epoch=1)  # no, roll, update
    # each step is one bucket: all 100 tensors in one table, one program each, one launch
    rows = len(kernels.ROWS) + 2  # AdamW: exp_avg, exp_avg_sq
    assert launch._plans and all(plan.n_chunks == 100 and plan.ptr_table.numel() == 100 * rows
                                 for plan in launch._plans.values())


@interpreter
@pytest.mark.parametrize("config", REPRESENTATIVE, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_sizes_and_multi_chunk_tensors(config, dtype):
    chunk = launch.CHUNK
    shapes = [(1,), (15,), (17,), (1025,), (chunk + 1,), (2 * chunk + 3,)]
    _compare(config, shapes, dtype, steps=5)
    assert _arrivals_are_zero()  # every multi-chunk tensor's counter went back to 0


@interpreter
@pytest.mark.parametrize("config", REPRESENTATIVE, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compact_state_is_the_reference_bit_for_bit(config, dtype):
    """Compact state: the kernel draws the reference's rounding bits, also past the first chunk
    (the element index counts from the tensor's start) and at boundaries; for the epoch's sum
    of g**2 too, under its own key."""
    chunk = launch.CHUNK
    ref_opt, out_opt = _compare(config, [(17,), (chunk + 3,), ()], dtype, steps=5,
                                skip={(2, 0)}, state_precision="compact")
    for s_ref, s_out in zip(ref_opt.state.values(), out_opt.state.values()):
        assert s_out["grad_sum"].dtype == torch.bfloat16
        assert torch.equal(s_ref["grad_sum"], s_out["grad_sum"])
        assert torch.equal(s_ref["gain"], s_out["gain"])
        assert s_ref.keys() == s_out.keys()
        if "grad_sq_sum" in s_ref:
            assert s_out["grad_sq_sum"].dtype == torch.bfloat16
            assert torch.equal(s_ref["grad_sq_sum"], s_out["grad_sq_sum"])


@interpreter
@pytest.mark.parametrize("config", REPRESENTATIVE, ids=lambda c: c.id)
def test_empty_tensors_count_their_steps(config):
    ref_opt, out_opt = _compare(config, [(0,), (5,), (3, 0), ()], torch.float32, steps=5)
    assert all(s["step"].item() == 5 for s in out_opt.state.values())


@interpreter
def test_skipped_grads_across_chunks_and_boundaries():
    chunk = launch.CHUNK
    skip = {(1, 0), (2, 0), (3, 0), (4, 2)}  # tensor 0 misses a whole epoch
    _compare(config("defaults", cls=ActiveRAdam), [(chunk + 5,), (3,), (40,)], torch.float32, steps=7, skip=skip)


@interpreter
def test_64_bit_chunk_offsets():
    """A tensor beyond 2**31 elements gets int64 chunk starts (meta tensors: no memory)."""
    big = torch.empty(2**31 + 5, device="meta")
    rows = [[big, torch.empty(3, device="meta")] for _ in range(9)]
    plan = launch._build_plan(rows, torch.device("meta"), ())
    assert plan.chunk_start.dtype == torch.int64 and plan.numels.dtype == torch.int64
    n_big = math.ceil((2**31 + 5) / launch.CHUNK)
    assert plan.n_chunks == n_big + 1


# ---- the pointer-table cache -----------------------------------------------------------------


@interpreter
def test_plan_is_reused_while_nothing_is_reallocated():
    params = make_params(torch.float32)
    grads = grad_sequence([tuple(p.shape) for p in params], 6, torch.float32)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = config("defaults", cls=ActiveAdamW).make(params, backend="triton")
    kernels.clear_plan_cache()
    for step_grads in grads:  # grads written in place: same data pointers every step
        for p, g in zip(params, step_grads):
            p.grad.copy_(g)
        opt.step()  # boundaries (3 steps per epoch) change a constexpr, not the plan
    assert kernels.plan_cache_info() == {"hits": 5, "misses": 1, "size": 1}


@interpreter
def test_plan_is_rebuilt_when_a_grad_or_state_is_reallocated():
    dtype, steps = torch.float32, 6
    start = make_params(dtype)
    grads = grad_sequence([tuple(p.shape) for p in start], steps, dtype)
    ref_params, out_params = clone_params(start), clone_params(start)
    amsgrad = config("amsgrad", cls=ActiveAdamW)
    ref_opt = amsgrad.make(ref_params, backend="reference")
    out_opt = amsgrad.make(out_params, backend="triton")
    kernels.clear_plan_cache()
    keep_alive = []  # old grads stay allocated, so the new ones cannot reuse their addresses
    for t, step_grads in enumerate(grads):
        for params in (ref_params, out_params):
            for p, g in zip(params, step_grads):
                keep_alive.append(p.grad)
                p.grad = None
                p.grad = g.clone()
        if t == 3:  # a state tensor replaced behind the optimizer's back
            state = out_opt.state[out_params[1]]
            state["exp_avg_sq"] = state["exp_avg_sq"].clone()
        before = kernels.plan_cache_info()["misses"]
        ref_opt.step()
        out_opt.step()
        assert kernels.plan_cache_info()["misses"] == before + 1, "stale plan reused"
    _assert_same(ref_params, ref_opt, out_params, out_opt, dtype)


# ---- scalars read from device memory ---------------------------------------------------------


@interpreter
def test_lr_tensor_changed_in_place_between_steps():
    dtype = torch.float32
    start = make_params(dtype)
    grads = grad_sequence([tuple(p.shape) for p in start], 6, dtype)
    ref_params, out_params = clone_params(start), clone_params(start)
    ref_lr, out_lr = torch.tensor(1e-2), torch.tensor(1e-2)
    maximize = config("maximize", cls=ActiveAdamW)
    ref_opt = maximize.make(ref_params, backend="reference", lr=ref_lr)
    out_opt = maximize.make(out_params, backend="triton", lr=out_lr)
    for p in out_params:
        p.grad = torch.zeros_like(p)
    kernels.clear_plan_cache()
    for step_grads in grads:
        for p, g in zip(ref_params, step_grads):
            p.grad = g.clone()
        for p, g in zip(out_params, step_grads):
            p.grad.copy_(g)
        ref_opt.step()
        out_opt.step()
        ref_lr.mul_(0.7)
        out_lr.mul_(0.7)  # in place: the kernel reads it, nothing on the host changes
    _assert_same(ref_params, ref_opt, out_params, out_opt, dtype)
    assert kernels.plan_cache_info()["misses"] == 1


@interpreter
def test_float_lr_changed_by_a_scheduler():
    start = make_params(torch.float32)
    grads = grad_sequence([tuple(p.shape) for p in start], 5, torch.float32)
    runs = []
    for backend in ("reference", "triton"):
        params = clone_params(start)
        opt = config("defaults", cls=ActiveSGD).make(params, backend=backend, steps_per_epoch=2)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
            scheduler.step()
        runs.append((params, opt))
    _assert_same(*runs[0], *runs[1], torch.float32)


@interpreter
@pytest.mark.parametrize("config", REPRESENTATIVE, ids=lambda c: c.id)
def test_found_inf_toggled_in_place_on_multi_chunk_tensors(config):
    """found_inf is read in the kernel: skipped steps leave params, moments and step counters
    alone (also for tensors split over several programs) but still apply a due boundary."""
    dtype, steps = torch.float32, 7
    shapes = [(launch.CHUNK + 7,), (5,)]
    start = make_params(dtype, shapes=shapes)
    grads = grad_sequence(shapes, steps, dtype)
    ref_params, out_params = clone_params(start), clone_params(start)
    ref_opt = config.make(ref_params, backend="reference", steps_per_epoch=2)
    out_opt = config.make(out_params, backend="triton", steps_per_epoch=2)
    ref_inf, out_inf, scale = torch.zeros(1), torch.zeros(1), torch.full((1,), 4.0)
    for opt, found_inf in ((ref_opt, ref_inf), (out_opt, out_inf)):
        opt.grad_scale, opt.found_inf = scale, found_inf
    for t, step_grads in enumerate(grads):
        for params in (ref_params, out_params):
            for p, g in zip(params, step_grads):
                p.grad = g.clone() * 4.0
        overflow = t in (2, 3, 5)  # 2: a boundary step (2 steps per epoch) that overflows
        ref_inf.fill_(float(overflow))
        out_inf.fill_(float(overflow))
        ref_opt.step()
        out_opt.step()
    _assert_same(ref_params, ref_opt, out_params, out_opt, dtype)
    assert all(s["step"].item() == steps - 3 for s in out_opt.state.values())
    assert _arrivals_are_zero()


# ---- memory layouts --------------------------------------------------------------------------


def _layout_params():
    """A misaligned view, a transposed (dense) param and a strided (not dense) one."""
    gen = torch.Generator().manual_seed(0)
    views = [torch.zeros(20)[3:19], torch.zeros(6, 4).t(), torch.zeros(5, 8)[:, ::2]]
    params = [torch.nn.Parameter(view) for view in views]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen))
    return params


@interpreter
def test_views_non_contiguous_and_misaligned_params():
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(16, generator=gen), torch.randn(6, 4, generator=gen).t(),
              torch.randn(5, 4, generator=gen)] for _ in range(5)]
    kernels.clear_plan_cache()
    runs = []
    for backend in ("reference", "triton"):
        params = _layout_params()
        assert params[0].data_ptr() % 16 != 0 and not params[1].is_contiguous()
        opt = ActiveAdamW(params, lr=1e-2, steps_per_epoch=2, backend=backend)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone(memory_format=torch.preserve_format)
            opt.step()
        runs.append((params, opt))
    assert launch._plans and not any(plan.aligned for plan in launch._plans.values())
    _assert_same(*runs[0], *runs[1], torch.float32)


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs triton")
def test_dense_layouts_run_in_place_and_others_on_copies():
    dense = torch.zeros(6, 4).t()
    strided = torch.zeros(5, 8)[:, ::2]
    rows = [[dense, strided] for _ in range(9)]
    rows[5] = [torch.zeros(()), torch.zeros(())]  # the step row is never copied
    out, writeback = layout.flat_rows(rows, kernels.ROWS.index("grad"),
                                      (kernels.ROWS.index("step"),))
    assert all(row[0] is dense for r, row in enumerate(out) if r != 5)  # same layout: no copy
    assert all(row[1].is_contiguous() for row in out)
    assert len(writeback) == 7  # every row but the grad and the step is written back


if INTERPRETED:
    import triton
    import triton.language as tl

    from adaptive_lr.kernels.active_step import _round_to_bf16
    from adaptive_lr.kernels.updates import Update

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, _round_to_bf16(x), mask=offs < n)

    @triton.jit
    def _keep(h, t, lr, theta, g, gamma, state, CT: tl.constexpr):
        """An update that changes nothing, whatever its hyperparameters."""
        return theta, state


@interpreter
def test_the_sign_test_finds_beta2_by_name(monkeypatch):
    """The sign test bias-corrects the second moment with beta2 wherever the update lists it."""
    sign_test = dict(lr=torch.tensor(0.1, dtype=torch.float64), weight_decay=0.0,
                     gain_rule=(2.0, 0.5, 0.0, math.inf, 1.0, False), epoch_steps=2,
                     maximize=False, boundary=2, contiguous=True)

    def gains_after_a_boundary(update):
        monkeypatch.setitem(kernels.UPDATES, "keep", update)
        # after one step: G^2 = 4 against k^2 S v / (1 - beta2) = 2 (beta2 = 0.5), a sign that
        # agrees with the last one and the gain grows by 2; against 10 (beta1 taken for it): held
        rows = [[torch.ones(3)], [torch.ones(3)], [torch.ones(3)], [torch.full((3,), 2.0)],
                [torch.ones(3, dtype=torch.int8)], [torch.ones(())], [torch.zeros(3)],
                [torch.full((3,), 0.5)]]
        kernels.active_step("keep", rows, dict(beta1=0.9, beta2=0.5), **sign_test)
        return rows[2][0]

    state = ("exp_avg", "exp_avg_sq")
    for hyper in (("beta1", "beta2"), ("beta2", "beta1")):
        gains = gains_after_a_boundary(Update(_keep, hyper, state, second_moment=1))
        assert torch.equal(gains, torch.full((3,), 3.0)), hyper
    no_beta2 = Update(_keep, ("beta1", "b2"), state, second_moment=1)
    monkeypatch.setitem(kernels.UPDATES, "keep", no_beta2)
    with pytest.raises(ValueError, match=r"keep's sign test needs beta2, which its "
                       r"hyperparameters \('beta1', 'b2'\) lack"):
        kernels.active_step("keep", [[torch.ones(3)]], dict(beta1=0.9, b2=0.5), **sign_test)


@interpreter
def test_software_bf16_rounding_matches_torch():
    """The interpreter-only rounding helper equals torch's round-to-nearest-even cast, ties,
    subnormals and non-finite values included (the interpreter's own cast truncates)."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0x7FC00001,
                         0xBF808000 - 2**32, 0x00008000, 0x00018000], dtype=torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.randn(1000) * 1e3,
                   torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])])
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, x.numel(), BLOCK=2048)
    expected = x.to(torch.bfloat16).float()
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y[~y.isnan()], expected[~expected.isnan()])


# ---- compiled for real GPUs, without one -------------------------------------------------

_COMPILE_SCRIPT = r"""
import re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import adaptive_lr
from adaptive_lr.kernels.active_step import active_step_kernel as kernel
from adaptive_lr.kernels.updates import UPDATES

POINTERS = {"ptr_table": "*i64", "numels": "*i64", "seeds": "*i64", "chunk_tensor": "*i64",
            "chunk_start": "*i64", "arrivals": "*i32", "hyper": "*fp64", "lr_ptr": "*fp64", "grad_scale_ptr": "*fp32",
            "found_inf_ptr": "*fp32"}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
SPECS = [cls.spec for cls in map(adaptive_lr.__dict__.get, adaptive_lr.__all__)
         if hasattr(cls, "spec")]
# flags on: every option that adds code (amsgrad's state, weight decay, maximize, AMP)
# last: bfloat16 moments (state_precision="bfloat16"), for the updates that offer them
VARIANTS = [(90, spec, dtype, boundary, flags, False) for spec in SPECS
            for dtype, boundary, flags in (("fp32", 2, True), ("bf16", 0, False))]
VARIANTS += [(80, spec, "bf16", 2, True, False) for spec in SPECS]
VARIANTS += [(80, spec, "bf16", 2, True, True) for spec in SPECS if spec.offers_bfloat16_moments]
VARIANTS += [(90, SPECS[0], "fp64", 1, True, False), (90, SPECS[-1], "fp16", 0, True, False)]
for arch, spec, dtype, boundary, flags, bf16_moments in VARIANTS:
    ct = tl.float64 if dtype == "fp64" else tl.float32
    update = UPDATES[spec.kernel]
    n_state = len(spec.state) - (spec.amsgrad_state is not None and not flags)
    # flags on: the sign test too (on the second moment, or on grad_sq_sum for an update
    # without one), relaxing held gains; low-precision params compile with compact state, the others with full state
    constants = dict(UPDATE=update.function, N_HYPER=len(update.hyper), N_STATE=n_state,
                     BOUNDARY=boundary, MOMENT=update.second_moment or 0,
                     BETA2=update.hyper.index("beta2") if flags and update.second_moment is not None
                     else 0, SIGN_TEST=flags, RELAX=flags,
                     GRAD_SQ=flags and update.second_moment is None,
                     COMPACT=dtype in ("bf16", "fp16"), BF16_MOMENTS=bf16_moments,
                     MAXIMIZE=flags, HAS_WEIGHT_DECAY=flags,
                     HAS_GRAD_SCALE=flags, HAS_FOUND_INF=flags, PARAM_DTYPE=DTYPES[dtype], CT=ct,
                     ALIGNED=True, SOFTWARE_BF16_ROUNDING=False,
                     BLOCK=1024 if ct == tl.float32 else 512, CHUNK=4096)
    signature = dict(POINTERS, n_tensors="i32", **{name: "constexpr" for name in constants})
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in POINTERS}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned),
        target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    vector_loads = len(re.findall(r"ld[.]global[.](v4|v2[.]b64)", ptx))
    print(arch, spec.kernel, n_state, dtype, boundary, flags, bf16_moments, "vector loads",
          vector_loads, flush=True)
    assert vector_loads > 0, "full blocks are not vectorised"
    assert ".local" not in ptx, "register spills"
    # the update's float64 scalars (bias corrections ...) are hoisted out of the block loop
    blocks = re.split(r"^[$](L__BB\w+):", ptx, flags=re.M)
    loops = [body for label, body in zip(blocks[1::2], blocks[2::2]) if f"${label};" in body]
    assert loops and (ct == tl.float64 or not any(".f64" in body for body in loops)), \
        "float64 work in the block loop"
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_compiles_to_ptx_for_sm80_and_sm90():
    """The GPU compile path (which the interpreter never runs) builds every code path of the
    kernel for A100/H100 with triton's bundled ptxas, vectorised and without spills."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    if importlib.util.find_spec("adaptive_lr.kernels") is None:
        pytest.skip("adaptive_lr.kernels is not installed (see the test above)")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="0")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]


# ---- real GPU (skipped without one) ----------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_cuda_parity(config, dtype):
    # float32 math on the GPU may use other roundings (FMA contraction): a ulp-level tolerance
    atol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    shapes = [(5, 3), (17,), (), (0,), (70_000,), (2, 3, 4)]
    _compare(config, shapes, dtype, steps=9, device="cuda", skip={(3, 1), (4, 1), (5, 1)},
             atol=atol)


def _cuda_setup(n=1 << 20, tensors=8, lr=1e-3):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(n // tensors, device="cuda", generator=gen).requires_grad_()
              for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen)
    return params


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_step_never_syncs_with_the_host():
    params = _cuda_setup()
    lr = torch.tensor(1e-3, device="cuda")
    opt = ActiveAdamW(params, lr=lr, steps_per_epoch=2, backend="triton")
    grad_scale, found_inf = torch.full((1,), 2.0, device="cuda"), torch.zeros(1, device="cuda")

    def steps():
        for _ in range(4):  # 2 steps per epoch: every boundary kind
            opt.step()
            lr.mul_(0.9)
        opt.grad_scale, opt.found_inf = grad_scale, found_inf  # as torch.amp.GradScaler does
        found_inf.zero_()
        opt.step()
        found_inf.fill_(1.0)
        opt.step()
        del opt.grad_scale, opt.found_inf

    assert_no_host_sync(steps)  # warm-up compiles every specialisation, builds the plan


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay_across_an_epoch_boundary():
    """One graph per boundary kind (the only per-step value baked into a launch); replaying them
    in the clock's order equals eager steps, with steps, lr and bias corrections read on device."""
    params = _cuda_setup(n=1 << 16)
    eager = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, eager):
        q.grad = p.grad.clone()
    graphed_opt = ActiveAdamW(params, lr=torch.tensor(1e-2, device="cuda"), steps_per_epoch=None,
                              backend="triton")
    eager_opt = ActiveAdamW(eager, lr=torch.tensor(1e-2, device="cuda"), steps_per_epoch=None,
                            backend="triton")
    # warm-up on a side stream, as torch.cuda.graphs asks: epoch 1, roll, epoch 2, update
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for opt in (graphed_opt, eager_opt):
            opt.step()
            opt.end_epoch()
            opt.step()
            opt.end_epoch()
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    steady, boundary = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(steady):
        graphed_opt.step()
    graphed_opt.end_epoch()
    with torch.cuda.graph(boundary):
        graphed_opt.step()  # kind UPDATE: every param has a previous sign
    schedule = [steady, steady, boundary, steady, boundary, steady]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for graph in schedule:
        new_grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in params]
        for p, q, g in zip(params, eager, new_grads):
            p.grad.copy_(g)
            q.grad.copy_(g)
        if graph is boundary:
            eager_opt.end_epoch()
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(params, eager):
        assert torch.equal(p, q)
        for key in ("step", "gain", "grad_sum", "prev_sign", "exp_avg", "exp_avg_sq"):
            assert torch.equal(graphed_opt.state[p][key], eager_opt.state[q][key]), key


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_bandwidth_against_torch_fused_adamw():
    """Streams 40 bytes/element (AdamW, fp32) to torch fused AdamW's 28: expect >= 60% of its
    bandwidth. Prints both; the numbers go into docs/triton.md."""
    n, tensors = 50_000_000, 200
    params = _cuda_setup(n, tensors)
    ours = ActiveAdamW(params, lr=1e-3, steps_per_epoch=10**6, backend="triton")
    theirs = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def time_steps(opt, count=20):
        for _ in range(3):
            opt.step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(count):
            opt.step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / count / 1e3

    ours_gbs = 40 * n / time_steps(ours) / 1e9
    theirs_gbs = 28 * n / time_steps(theirs) / 1e9
    print(f"triton ActiveAdamW {ours_gbs:.0f} GB/s, torch fused AdamW {theirs_gbs:.0f} GB/s")
    assert ours_gbs >= 0.6 * theirs_gbs


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_tensor_beyond_2_31_elements():
    n = 2**31 + 4099  # about 37 GB with bf16 params and SGD state
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs a GPU with >= 48 GiB")
    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    p.grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    opt = ActiveSGD([p], lr=0.5, momentum=0.0, steps_per_epoch=10, backend="triton")
    opt.step()
    torch.cuda.synchronize()
    tail = p.detach()[-5000:].float()
    assert torch.equal(tail, torch.full_like(tail, -0.5)) and p.detach()[0].item() == -0.5
    assert opt.state[p]["step"].item() == 1 and opt.state[p]["grad_sum"][-1].item() == 1.0
