"""The one Triton kernel of adaptive_lr: a whole bucket's optimizer step in a single launch,
written once for every optimizer.

Every program owns one chunk (``CHUNK`` elements of one tensor) named by the chunk table; the
tensor's base addresses come from a device table of int64 data pointers (one row per list in
``ROWS``, then one per state list; one column per tensor), so one launch covers any number of
tensors of any sizes. Per element it does exactly what ``adaptive_lr/backends/bucket.py``
specifies, in one pass over memory. The kernel does everything but the optimizer's own update:
the epoch boundary (``BOUNDARY`` is a constexpr, so the steady-state kernel never touches
``prev_sign``), unscaling and maximize, the ``grad_sum`` accumulation (and ``grad_sq_sum``'s, the
sign test's sum of g**2 for an update without a second moment: ``GRAD_SQ``), decoupled weight
decay, the loads and stores of every list and the step counter. The update is ``UPDATE``, a constexpr
``@triton.jit`` function of ``kernels/updates.py`` (``UPDATES``, by the spec's kernel name),
called on each block with the optimizer's hyperparameters and its state blocks as tuples.

Nothing that changes from step to step is a launch argument (CUDA-graph safe): lr, grad_scale,
found_inf and every hyperparameter are loaded from device memory; each tensor's step counter is
read, the update derives its bias corrections etc. from it, and it is incremented in the kernel by
the last program of that tensor to finish (a per-tensor arrival counter, reset to 0 by that
program, orders the write after every sibling program's read).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .numerics import div, powi

# Rows of the pointer table: these lists, then the spec's state lists in state_keys order, then
# (GRAD_SQ) the grad_sq_sums.
ROWS = ("param", "grad", "gain", "grad_sum", "prev_sign", "step")
# The float64 hyperparameter table on the device: these entries every optimizer has (the
# decoupled weight decay is 0 for an optimizer whose update applies its own), then the update's
# own hyperparameters in its UPDATES[...].hyper order (the launch orders them by name).
COMMON_HYPER = ("weight_decay", "gain_inc", "gain_dec", "min_gain", "max_gain",
                "sign_threshold", "epoch_steps")

# the same indices as kernel constants (a @triton.jit function reads only constexpr globals)
PARAM, GRAD, GAIN, GRAD_SUM, PREV_SIGN, STEP = map(tl.constexpr, range(len(ROWS)))
FIRST_STATE = tl.constexpr(len(ROWS))
(WEIGHT_DECAY, GAIN_INC, GAIN_DEC, MIN_GAIN, MAX_GAIN, SIGN_THRESHOLD,
 EPOCH_STEPS) = map(tl.constexpr, range(len(COMMON_HYPER)))
FIRST_KERNEL_HYPER = tl.constexpr(len(COMMON_HYPER))


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
def _mix32(x):
    """math.h's mix32 (C. Wellons' "lowbias32") on uint32 values."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gain_key(key):
    """math.h's gain_key: a new compact gain's own key, from the step's."""
    return _mix32(key ^ 0x9E3779B9)


@triton.jit
def _moment_key(key, k: tl.constexpr):
    """math.h's moment_key: the own key of a bfloat16 moment, state k, from the step's."""
    return _mix32(key ^ (0x85EBCA6B + k))


@triton.jit
def _stochastic_bf16(x, key, index, LOW_BITS: tl.constexpr = False):
    """math.h's bfloat16_stochastic (LOW_BITS: bfloat16_stochastic_low_bits) as a float32 that a
    bfloat16 store keeps exactly: 16 hashed bits of (key, element index), the hash's high half
    for grad_sum (and a gain, under _gain_key) and its low half for grad_sq_sum, added below the
    kept bits, then truncation (unbiased); an infinity stays one (its low bits are 0), a NaN
    stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    hashed = _mix32(key + index)
    draws = hashed & 0xFFFF if LOW_BITS else hashed >> 16
    rounded = ((bits + draws) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def _tensor_ptr(table, row, n_tensors, i, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address of element ``start`` of tensor ``i`` of pointer-table row ``row`` (64-bit
    arithmetic on the scalar base, so per-element offsets stay int32)."""
    ptr = tl.load(table + row * n_tensors + i).to(tl.pointer_type(DTYPE)) + start
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
def _epoch_boundary(offs, mask, gain_ptr, grad_sum, prev_sign, gain_rule, moment, factor, key,
                    start, SIGN_TEST: tl.constexpr, RELAX: tl.constexpr, BOUNDARY: tl.constexpr,
                    COMPACT: tl.constexpr, MASKED: tl.constexpr):
    """The fused boundary (docs/algorithm.md): returns the gain this step uses (float32). The
    caller stores the reset grad_sum (0, plus this step's gradient unless the step is skipped),
    and grad_sq_sum likewise. Under SIGN_TEST, ``moment`` is the noise block the test reads (the
    second moment, or grad_sq_sum; before this step) and ``factor`` the tensor's sign-test
    factor, in its compute dtype; RELAX (relax_gains): a gain above 1 that the test holds moves
    toward 1 instead, (gain - 1) * gain_dec + 1. COMPACT: bfloat16 gain and grad_sum,
    a new gain rounded stochastically after its clamp (``key``; element index start + offs)."""
    gain_inc, gain_dec, min_gain, max_gain = gain_rule
    old_sum = _load(grad_sum, offs, mask, MASKED).to(tl.float32)
    sign = (old_sum > 0).to(tl.int8) - (old_sum < 0).to(tl.int8)
    if SIGN_TEST:  # a sum within the epoch's gradient noise counts as no sign
        wide = old_sum.to(moment.dtype)
        sign = tl.where(wide * wide > factor * moment, sign, 0).to(tl.int8)
    gain = _load(gain_ptr, offs, mask, MASKED).to(tl.float32)
    if BOUNDARY == 2:
        prev = _load(prev_sign, offs, mask, MASKED)
        agreement = prev.to(tl.int32) * sign.to(tl.int32)
        decreased = gain * gain_dec
        if SIGN_TEST:  # no evidence either way: the gain is held (or relaxed toward 1)
            held = gain
            if RELAX:
                held = tl.where(gain > 1, (gain - 1) * gain_dec + 1, gain)
            decreased = tl.where(agreement < 0, decreased, held)
        gain = tl.where(agreement > 0, gain + gain_inc, decreased)
        gain = tl.minimum(tl.maximum(gain, min_gain), max_gain)
        if COMPACT:  # the value the bfloat16 store keeps, computed (the interpreter truncates)
            gain = _stochastic_bf16(gain, _gain_key(key), (start + offs).to(tl.uint32))
        _store(gain_ptr, offs, gain.to(gain_ptr.dtype.element_ty), mask, MASKED)
    _store(prev_sign, offs, sign, mask, MASKED)
    return gain


@triton.jit
def _step_block(
    offs, mask, param, grad, gain_ptr, grad_sum, grad_sq_sum, prev_sign, states, h, t, lr, decay,
    grad_scale, gain_rule, factor, key, start, UPDATE: tl.constexpr, BOUNDARY: tl.constexpr,
    MOMENT: tl.constexpr, SIGN_TEST: tl.constexpr, RELAX: tl.constexpr, GRAD_SQ: tl.constexpr,
    COMPACT: tl.constexpr, BF16_MOMENTS: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, PARAM_DTYPE: tl.constexpr, CT: tl.constexpr,
    SOFTWARE_BF16_ROUNDING: tl.constexpr, MASKED: tl.constexpr,
):
    """One block of a step that is not skipped: boundary, accumulation, the update.
    BF16_MOMENTS: bfloat16 states, updated in float32 and rounded stochastically (_moment_key)."""
    state = ()
    for k in tl.static_range(len(states)):
        state = state + (_load(states[k], offs, mask, MASKED).to(CT),)
    sq_before = factor  # a placeholder unless GRAD_SQ
    if GRAD_SQ:
        sq_before = _load(grad_sq_sum, offs, mask, MASKED).to(tl.float32)
    if BOUNDARY != 0:
        noise = sq_before.to(CT) if GRAD_SQ else state[MOMENT]
        gain = _epoch_boundary(offs, mask, gain_ptr, grad_sum, prev_sign, gain_rule, noise,
                               factor, key, start, SIGN_TEST, RELAX, BOUNDARY, COMPACT, MASKED)
        sum_before = tl.zeros_like(gain)
        sq_before = tl.zeros_like(gain)
    else:
        gain = _load(gain_ptr, offs, mask, MASKED).to(tl.float32)
        sum_before = _load(grad_sum, offs, mask, MASKED).to(tl.float32)

    g = _load(grad, offs, mask, MASKED).to(CT)
    if HAS_GRAD_SCALE:
        g = div(g, grad_scale, CT)
    if MAXIMIZE:
        g = -g
    g32 = g.to(tl.float32)
    index = (start + offs).to(tl.uint32)  # within the tensor, modulo 2**32 as math.h counts it
    total = sum_before + g32
    if COMPACT:
        total = _stochastic_bf16(total, key, index)
    _store(grad_sum, offs, total.to(grad_sum.dtype.element_ty), mask, MASKED)
    if GRAD_SQ:  # float32: the product and the sum each rounded once (no fp fusion)
        sq_total = sq_before + g32 * g32
        if COMPACT:
            sq_total = _stochastic_bf16(sq_total, key, index, LOW_BITS=True)
        _store(grad_sq_sum, offs, sq_total.to(grad_sq_sum.dtype.element_ty), mask, MASKED)

    theta = _load(param, offs, mask, MASKED).to(CT)
    if HAS_WEIGHT_DECAY:  # decoupled, not scaled by the gain
        theta = theta * decay
    theta, state = UPDATE(h, t, lr, theta, g, gain.to(CT), state, CT)
    tl.static_assert(theta.dtype == CT, "an update must return theta in the compute dtype")
    tl.static_assert(len(state) == len(states), "an update must return every state block")
    for k in tl.static_range(len(states)):
        tl.static_assert(state[k].dtype == CT, "an update must return states in the compute dtype")
        moment = state[k]
        if BF16_MOMENTS:  # the value the bfloat16 store keeps, computed (the interpreter truncates)
            moment = _stochastic_bf16(moment, _moment_key(key, k), index)
        _store(states[k], offs, moment.to(states[k].dtype.element_ty), mask, MASKED)
    # low-precision params: float32 math, one rounding (to nearest even) at the end
    if SOFTWARE_BF16_ROUNDING:
        theta = _round_to_bf16(theta)
    _store(param, offs, theta.to(PARAM_DTYPE), mask, MASKED)


@triton.jit(do_not_specialize=["n_tensors"])  # one compile for any number of tensors
def active_step_kernel(
    ptr_table, numels, seeds, chunk_tensor, chunk_start, arrivals, n_tensors,
    hyper, lr_ptr, grad_scale_ptr, found_inf_ptr,
    UPDATE: tl.constexpr, N_HYPER: tl.constexpr, N_STATE: tl.constexpr,
    BOUNDARY: tl.constexpr, MOMENT: tl.constexpr, BETA2: tl.constexpr, SIGN_TEST: tl.constexpr,
    RELAX: tl.constexpr, GRAD_SQ: tl.constexpr, COMPACT: tl.constexpr, BF16_MOMENTS: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
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
    SIGN_STATE: tl.constexpr = tl.bfloat16 if COMPACT else tl.float32
    gain_ptr = _tensor_ptr(ptr_table, GAIN, n_tensors, i, start, SIGN_STATE, ALIGNED)
    grad_sum = _tensor_ptr(ptr_table, GRAD_SUM, n_tensors, i, start, SIGN_STATE, ALIGNED)
    prev_sign = _tensor_ptr(ptr_table, PREV_SIGN, n_tensors, i, start, tl.int8, ALIGNED)
    MOMENT_STATE: tl.constexpr = tl.bfloat16 if BF16_MOMENTS else CT
    states = ()
    for k in tl.static_range(N_STATE):
        states = states + (
            _tensor_ptr(ptr_table, FIRST_STATE + k, n_tensors, i, start, MOMENT_STATE, ALIGNED),)
    grad_sq_sum = grad_sum  # a placeholder unless GRAD_SQ
    if GRAD_SQ:
        grad_sq_sum = _tensor_ptr(ptr_table, FIRST_STATE + N_STATE, n_tensors, i, start,
                                  SIGN_STATE, ALIGNED)
    step_ptr = tl.load(ptr_table + STEP * n_tensors + i).to(tl.pointer_type(tl.float32))

    # ---- per-step scalars, all read from device memory ----------------------------------------
    if HAS_FOUND_INF:
        keep = tl.load(found_inf_ptr) == 0
    else:
        keep = pid >= 0  # a scalar True
    lr = tl.load(lr_ptr).to(tl.float64)
    t = tl.load(step_ptr) + 1.0  # this tensor's step number (grads may have been None)
    gain_rule = (tl.load(hyper + GAIN_INC).to(tl.float32), tl.load(hyper + GAIN_DEC).to(tl.float32),
                 tl.load(hyper + MIN_GAIN).to(tl.float32), tl.load(hyper + MAX_GAIN).to(tl.float32))
    decay = (1.0 - lr * tl.load(hyper + WEIGHT_DECAY)).to(CT)
    grad_scale = lr.to(CT)  # a placeholder unless HAS_GRAD_SCALE
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(CT)
    h = ()
    for k in tl.static_range(N_HYPER):
        h = h + (tl.load(hyper + FIRST_KERNEL_HYPER + k).to(tl.float64),)
    factor = lr.to(CT)  # a placeholder unless a boundary runs the sign test
    if SIGN_TEST and BOUNDARY != 0:
        threshold = tl.load(hyper + SIGN_THRESHOLD)
        if GRAD_SQ:  # k^2, against the epoch's sum of g^2
            factor = (threshold * threshold).to(CT)
        else:  # k^2 S / (1 - beta2^t), t the step count before this step
            # (h[BETA2] is beta2: the host found it by name)
            bc2 = 1.0 - powi(h[BETA2], (t.to(tl.float64) - 1.0).to(tl.int32))
            factor = (threshold * threshold * tl.load(hyper + EPOCH_STEPS) / bc2).to(CT)

    key = t.to(tl.uint32)  # a placeholder unless COMPACT
    if COMPACT:  # math.h's rounding_key(seed, t)
        key = _mix32(tl.load(seeds + i).to(tl.uint32) ^ _mix32(t.to(tl.uint32)))

    # ---- one pass over the chunk: full blocks unmasked (vectorised), then the masked tail ------
    n_full = n_here // BLOCK
    offs = tl.arange(0, BLOCK)
    tail = n_full * BLOCK + offs
    t64 = t.to(tl.float64)
    if keep:
        for it in range(0, n_full):
            _step_block(
                it * BLOCK + offs, None, param, grad, gain_ptr, grad_sum, grad_sq_sum, prev_sign,
                states, h, t64, lr, decay, grad_scale, gain_rule, factor, key, start, UPDATE,
                BOUNDARY, MOMENT, SIGN_TEST, RELAX, GRAD_SQ, COMPACT, BF16_MOMENTS, MAXIMIZE,
                HAS_WEIGHT_DECAY, HAS_GRAD_SCALE, PARAM_DTYPE, CT, SOFTWARE_BF16_ROUNDING, False)
        if n_full * BLOCK < n_here:
            _step_block(
                tail, tail < n_here, param, grad, gain_ptr, grad_sum, grad_sq_sum, prev_sign,
                states, h, t64, lr, decay, grad_scale, gain_rule, factor, key, start, UPDATE,
                BOUNDARY, MOMENT, SIGN_TEST, RELAX, GRAD_SQ, COMPACT, BF16_MOMENTS, MAXIMIZE,
                HAS_WEIGHT_DECAY, HAS_GRAD_SCALE, PARAM_DTYPE, CT, SOFTWARE_BF16_ROUNDING, True)
    else:
        # found_inf: the step is skipped, but a due boundary is applied (and the sums reset)
        if BOUNDARY != 0:
            for it in range(0, tl.cdiv(n_here, BLOCK)):
                block = it * BLOCK + offs
                in_chunk = block < n_here
                moment = factor  # a placeholder unless SIGN_TEST
                if GRAD_SQ:
                    moment = tl.load(grad_sq_sum + block, mask=in_chunk, other=0).to(CT)
                    tl.store(grad_sq_sum + block, tl.zeros([BLOCK], SIGN_STATE), mask=in_chunk)
                elif SIGN_TEST:
                    moment = tl.load(states[MOMENT] + block, mask=in_chunk, other=0)
                _epoch_boundary(block, in_chunk, gain_ptr, grad_sum, prev_sign, gain_rule,
                                moment, factor, key, start, SIGN_TEST, RELAX, BOUNDARY, COMPACT,
                                True)
                tl.store(grad_sum + block, tl.zeros([BLOCK], SIGN_STATE), mask=in_chunk)

    # ---- step counter: the last program of this tensor to finish increments it ------------
    n_chunks = tl.maximum(tl.cdiv(numel, CHUNK), 1)
    several = n_chunks > 1
    tl.debug_barrier()  # every warp of this program has read `step` before the arrival below
    arrived = tl.atomic_add(arrivals + i, 1, mask=keep & several)  # acq_rel, gpu scope
    last = keep & ((n_chunks == 1) | (arrived == n_chunks - 1))
    tl.store(step_ptr, t, mask=last)
    tl.store(arrivals + i, 0, mask=last & several)
