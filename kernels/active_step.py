"""The one Triton kernel of adaptive_lr: a whole bucket's optimizer step in a single launch.

Every program owns one chunk (``CHUNK`` elements of one tensor) named by the chunk table; the
tensor's base addresses come from a device table of int64 data pointers (one row per list in
``ROWS``, one column per tensor), so one launch covers any number of tensors of any sizes.
Per element it does exactly what ``adaptive_lr/backends/bucket.py`` specifies, in one pass over
memory: the epoch boundary (``BOUNDARY`` is a constexpr, so the steady-state kernel never touches
``prev_sign``), the ``grad_sum`` accumulation and the base update of ActiveSGD / ActiveAdamW /
ActiveRAdam / ActiveAdaBelief (``OPTIMIZER`` is a constexpr switch; the shared prologue,
boundary and epilogue are written once).

Nothing that changes from step to step is a launch argument (CUDA-graph safe): lr, grad_scale,
found_inf and every hyperparameter are loaded from device memory; each tensor's step counter is
read, its bias corrections / RAdam rectification are computed from it in the program, and it is
incremented in the kernel by the last program of that tensor to finish (a per-tensor arrival
counter, reset to 0 by that program, orders the write after every sibling program's read).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Rows of the pointer table: the bucket's lists; state0.. are the base optimizer's state lists in
# bucket.STATE_KEYS order (amsgrad-only ones only when present).
ROWS = ("param", "grad", "gain", "grad_sum", "prev_sign", "step", "state0", "state1", "state2")
# Slots of the float64 hyperparameter table (read in the kernel, never baked into the launch).
HYPER_SLOTS = ("momentum", "dampening", "beta1", "beta2", "eps", "weight_decay",
               "gain_inc", "gain_dec", "min_gain", "max_gain")
OPTIMIZERS = {"sgd": 0, "adamw": 1, "radam": 2, "adabelief": 3}

# the same indices as kernel constants (a @triton.jit function reads only constexpr globals)
PARAM, GRAD, GAIN, GRAD_SUM, PREV_SIGN, STEP, STATE0, STATE1, STATE2 = map(tl.constexpr, range(9))
MOMENTUM, DAMPENING, BETA1, BETA2, EPS, WEIGHT_DECAY, GAIN_INC, GAIN_DEC, MIN_GAIN, MAX_GAIN = map(
    tl.constexpr, range(10))
RECTIFY_THRESHOLD = tl.constexpr(5.0)  # as adaptive_lr.backends.scalars


@triton.jit
def _powi(base, n):
    """base ** n for an int32 n >= 0 by repeated squaring (within a few ulps; float64 exp/log
    would need libdevice, which the interpreter lacks): the same code on GPU and interpreter."""
    result = base * 0.0 + 1.0
    while n > 0:
        result = tl.where(n % 2 == 1, result * base, result)
        base = base * base
        n = n // 2
    return result


@triton.jit
def _sqrt(x, CT: tl.constexpr):
    # IEEE-rounded like torch: tl.sqrt is the approximate instruction for float32 on GPUs
    if CT == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y, CT: tl.constexpr):
    # IEEE-rounded like torch: "/" is the approximate div.full.f32 for float32 on GPUs
    if CT == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _round_to_bf16(x):
    """x (float32) rounded to the nearest-even bfloat16 value, still as float32, so that the
    store's conversion is exact. Only for the Triton interpreter, whose float32->bfloat16
    conversion truncates (GPUs round to nearest even in hardware, so the GPU kernel never
    compiles this); without it interpreter runs drift from the reference by many ulps."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN


@triton.jit
def _tensor_ptr(table, slot: tl.constexpr, n_tensors, i, start, DTYPE: tl.constexpr,
                ALIGNED: tl.constexpr):
    """Address of element ``start`` of tensor ``i`` of a pointer-table row (64-bit arithmetic on
    the scalar base, so per-element offsets stay int32)."""
    ptr = tl.load(table + slot * n_tensors + i).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:  # the host checked every base address; start is a multiple of CHUNK: vector loads
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    # full blocks load without a mask: only then can Triton emit 16-byte vector accesses
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _epoch_boundary(offs, mask, gain_ptr, grad_sum, prev_sign, gain_inc, gain_dec, min_gain,
                    max_gain, BOUNDARY: tl.constexpr, MASKED: tl.constexpr):
    """The fused boundary (docs/algorithm.md): returns the gain this step uses. The caller
    stores the reset grad_sum (0, plus this step's gradient unless the step is skipped)."""
    old_sum = _load(grad_sum, offs, mask, MASKED)
    sign = (old_sum > 0).to(tl.int8) - (old_sum < 0).to(tl.int8)
    gain = _load(gain_ptr, offs, mask, MASKED)
    if BOUNDARY == 2:
        prev = _load(prev_sign, offs, mask, MASKED)
        same = prev.to(tl.int32) * sign.to(tl.int32) > 0
        gain = tl.where(same, gain + gain_inc, gain * gain_dec)
        gain = tl.minimum(tl.maximum(gain, min_gain), max_gain)
        _store(gain_ptr, offs, gain, mask, MASKED)
    _store(prev_sign, offs, sign, mask, MASKED)
    return gain


@triton.jit
def _step_block(
    offs, mask, param, grad, gain_ptr, grad_sum, prev_sign, s0, s1, s2,
    lr, decay, grad_scale, gain_inc, gain_dec, min_gain, max_gain, first,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, sqrt_bc2, bc1, lr_bc1, rect,
    lr_rect_bc1, rectified,
    OPTIMIZER: tl.constexpr, BOUNDARY: tl.constexpr, AMSGRAD: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, PARAM_DTYPE: tl.constexpr, CT: tl.constexpr,
    SOFTWARE_BF16_ROUNDING: tl.constexpr, MASKED: tl.constexpr,
):
    """One block of a step that is not skipped: boundary, accumulation, base update.
    For SGD, beta1 is the momentum and one_minus_beta1 is 1 - dampening."""
    if BOUNDARY != 0:
        gain = _epoch_boundary(offs, mask, gain_ptr, grad_sum, prev_sign, gain_inc, gain_dec,
                               min_gain, max_gain, BOUNDARY, MASKED)
        sum_before = tl.zeros_like(gain)
    else:
        gain = _load(gain_ptr, offs, mask, MASKED)
        sum_before = _load(grad_sum, offs, mask, MASKED)

    g = _load(grad, offs, mask, MASKED).to(CT)
    if HAS_GRAD_SCALE:
        g = _div(g, grad_scale, CT)
    if MAXIMIZE:
        g = -g
    _store(grad_sum, offs, sum_before + g.to(tl.float32), mask, MASKED)

    theta = _load(param, offs, mask, MASKED).to(CT)
    if HAS_WEIGHT_DECAY:  # decoupled, not scaled by the gain
        theta = theta * decay
    gamma = gain.to(CT)
    m = _load(s0, offs, mask, MASKED)  # SGD's momentum buffer, else exp_avg
    if OPTIMIZER == 0:  # SGD
        m = tl.where(first, g, m * beta1 + one_minus_beta1 * g)
        _store(s0, offs, m, mask, MASKED)
        if NESTEROV:
            direction = g + beta1 * m
        else:
            direction = m
        theta = theta - lr * gamma * direction
    else:
        v = _load(s1, offs, mask, MASKED)  # exp_avg_sq, or AdaBelief's exp_avg_var
        m = m * beta1 + one_minus_beta1 * g
        if OPTIMIZER == 3:
            residual = g - m
            v = v * beta2 + one_minus_beta2 * residual * residual + eps
        else:
            v = v * beta2 + one_minus_beta2 * g * g
        _store(s0, offs, m, mask, MASKED)
        _store(s1, offs, v, mask, MASKED)
        if AMSGRAD:
            v = tl.maximum(_load(s2, offs, mask, MASKED), v)
            _store(s2, offs, v, mask, MASKED)
        if OPTIMIZER == 1:  # AdamW
            denom = _div(_sqrt(v, CT), sqrt_bc2, CT) + eps
            theta = theta - _div(lr_bc1 * gamma * m, denom, CT)
        elif OPTIMIZER == 2:  # RAdam
            m_hat = _div(m, bc1, CT)
            adapted = _div(lr * gamma * rect * m_hat * sqrt_bc2, _sqrt(v, CT) + eps, CT)
            theta = theta - tl.where(rectified, adapted, lr * gamma * m_hat)
        else:  # AdaBelief
            denom = _div(_sqrt(v, CT), sqrt_bc2, CT) + eps
            adapted = _div(lr_rect_bc1 * gamma * m, denom, CT)
            theta = theta - tl.where(rectified, adapted, _div(lr * gamma * m, bc1, CT))
    # low-precision params: float32 math, one rounding (to nearest even) at the end
    if SOFTWARE_BF16_ROUNDING:
        theta = _round_to_bf16(theta)
    _store(param, offs, theta.to(PARAM_DTYPE), mask, MASKED)


@triton.jit(do_not_specialize=["n_tensors"])  # one compile for any number of tensors
def active_step_kernel(
    ptr_table, numels, chunk_tensor, chunk_start, arrivals, n_tensors,
    hyper, lr_ptr, grad_scale_ptr, found_inf_ptr,
    OPTIMIZER: tl.constexpr, BOUNDARY: tl.constexpr, AMSGRAD: tl.constexpr,
    NESTEROV: tl.constexpr, RECTIFY: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, CT: tl.constexpr, ALIGNED: tl.constexpr,
    SOFTWARE_BF16_ROUNDING: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    # ---- which chunk of which tensor ----------------------------------------------------------
    pid = tl.program_id(0)
    i = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)  # int64: tensors may exceed 2**31 elements
    numel = tl.load(numels + i)
    n_here = tl.minimum(numel - start, CHUNK).to(tl.int32)

    param = _tensor_ptr(ptr_table, PARAM, n_tensors, i, start, PARAM_DTYPE, ALIGNED)
    grad = _tensor_ptr(ptr_table, GRAD, n_tensors, i, start, PARAM_DTYPE, ALIGNED)
    gain_ptr = _tensor_ptr(ptr_table, GAIN, n_tensors, i, start, tl.float32, ALIGNED)
    grad_sum = _tensor_ptr(ptr_table, GRAD_SUM, n_tensors, i, start, tl.float32, ALIGNED)
    prev_sign = _tensor_ptr(ptr_table, PREV_SIGN, n_tensors, i, start, tl.int8, ALIGNED)
    s0 = _tensor_ptr(ptr_table, STATE0, n_tensors, i, start, CT, ALIGNED)
    s1 = _tensor_ptr(ptr_table, STATE1, n_tensors, i, start, CT, ALIGNED)
    s2 = _tensor_ptr(ptr_table, STATE2, n_tensors, i, start, CT, ALIGNED)
    step_ptr = tl.load(ptr_table + STEP * n_tensors + i).to(tl.pointer_type(tl.float32))

    # ---- per-step scalars, all read from device memory (float64, then rounded once) -----------
    if HAS_FOUND_INF:
        keep = tl.load(found_inf_ptr) == 0
    else:
        keep = pid >= 0  # a scalar True
    lr = tl.load(lr_ptr).to(tl.float64)
    step = tl.load(step_ptr)
    t = step + 1.0  # this tensor's step number (steps differ per tensor: grads may be None)
    gain_inc = tl.load(hyper + GAIN_INC).to(tl.float32)
    gain_dec = tl.load(hyper + GAIN_DEC).to(tl.float32)
    min_gain = tl.load(hyper + MIN_GAIN).to(tl.float32)
    max_gain = tl.load(hyper + MAX_GAIN).to(tl.float32)
    decay = (1.0 - lr * tl.load(hyper + WEIGHT_DECAY)).to(CT)
    grad_scale = lr.to(CT)  # a placeholder unless HAS_GRAD_SCALE
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(CT)
    beta2 = tl.load(hyper + BETA2)
    eps = tl.load(hyper + EPS)
    if OPTIMIZER == 0:  # SGD: b <- momentum * b + (1 - dampening) * g
        beta1 = tl.load(hyper + MOMENTUM)
        one_minus_beta1 = 1.0 - tl.load(hyper + DAMPENING)
    else:
        beta1 = tl.load(hyper + BETA1)
        one_minus_beta1 = 1.0 - beta1
    # bias corrections and RAdam's rectification from this tensor's own step
    beta2_t = _powi(beta2, t.to(tl.int32))
    bc1 = 1.0 - _powi(beta1, t.to(tl.int32))
    bc2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t.to(tl.float64) * beta2_t / bc2
    rectified = rho_t > RECTIFY_THRESHOLD
    rect = tl.sqrt(tl.maximum((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                              / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.0))
    if OPTIMIZER == 3:
        if not RECTIFY:  # AdaBelief(rectify=False): always the adaptive step, r_t = 1
            rectified = pid >= 0
            rect = rect * 0.0 + 1.0

    # float64 scalars rounded once to the compute dtype, in the reference's association order
    lr_c, beta1_c, one_minus_beta1_c = lr.to(CT), beta1.to(CT), one_minus_beta1.to(CT)
    beta2_c, one_minus_beta2_c, eps_c = beta2.to(CT), (1.0 - beta2).to(CT), eps.to(CT)
    sqrt_bc2, bc1_c, lr_bc1 = tl.sqrt(bc2).to(CT), bc1.to(CT), (lr / bc1).to(CT)
    rect_c, lr_rect_bc1, first = rect.to(CT), (lr * rect / bc1).to(CT), t == 1.0

    # ---- one pass over the chunk: full blocks unmasked (vectorised), then the masked tail ------
    n_full = n_here // BLOCK
    offs = tl.arange(0, BLOCK)
    tail = n_full * BLOCK + offs
    if keep:
        for it in range(0, n_full):
            _step_block(
                it * BLOCK + offs, None, param, grad, gain_ptr, grad_sum, prev_sign, s0, s1, s2,
                lr_c, decay, grad_scale, gain_inc, gain_dec, min_gain, max_gain, first,
                beta1_c, one_minus_beta1_c, beta2_c, one_minus_beta2_c, eps_c, sqrt_bc2, bc1_c,
                lr_bc1, rect_c, lr_rect_bc1, rectified,
                OPTIMIZER, BOUNDARY, AMSGRAD, NESTEROV, MAXIMIZE, HAS_WEIGHT_DECAY,
                HAS_GRAD_SCALE, PARAM_DTYPE, CT, SOFTWARE_BF16_ROUNDING, False)
        if n_full * BLOCK < n_here:
            _step_block(
                tail, tail < n_here, param, grad, gain_ptr, grad_sum, prev_sign, s0, s1, s2,
                lr_c, decay, grad_scale, gain_inc, gain_dec, min_gain, max_gain, first,
                beta1_c, one_minus_beta1_c, beta2_c, one_minus_beta2_c, eps_c, sqrt_bc2, bc1_c,
                lr_bc1, rect_c, lr_rect_bc1, rectified,
                OPTIMIZER, BOUNDARY, AMSGRAD, NESTEROV, MAXIMIZE, HAS_WEIGHT_DECAY,
                HAS_GRAD_SCALE, PARAM_DTYPE, CT, SOFTWARE_BF16_ROUNDING, True)
    else:
        # found_inf: the step is skipped, but a due boundary is applied (and the sum reset)
        if BOUNDARY != 0:
            for it in range(0, tl.cdiv(n_here, BLOCK)):
                block = it * BLOCK + offs
                _epoch_boundary(block, block < n_here, gain_ptr, grad_sum, prev_sign, gain_inc,
                                gain_dec, min_gain, max_gain, BOUNDARY, True)
                tl.store(grad_sum + block, tl.zeros([BLOCK], tl.float32), mask=block < n_here)

    # ---- step counter: the last program of this tensor to finish increments it ------------
    n_chunks = tl.maximum(tl.cdiv(numel, CHUNK), 1)
    several = n_chunks > 1
    tl.debug_barrier()  # every warp of this program has read `step` before the arrival below
    arrived = tl.atomic_add(arrivals + i, 1, mask=keep & several)  # acq_rel, gpu scope
    last = keep & ((n_chunks == 1) | (arrived == n_chunks - 1))
    tl.store(step_ptr, t, mask=last)
    tl.store(arrivals + i, 0, mask=last & several)
