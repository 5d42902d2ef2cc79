"""Scalar and element helpers the Triton kernel and the optimizer updates share: IEEE-rounded
sqrt and division (as torch computes them), and the per-tensor scalars that depend on a tensor's
own step count (bias corrections, RAdam's rectification), computed in float64."""

from __future__ import annotations

import triton
import triton.language as tl

RECTIFY_THRESHOLD = tl.constexpr(5.0)  # as adaptive_lr.backends.scalars
# Step counters are float32, so a step number is an integer below 2**25 (float32 counts exactly
# to 2**24, where +1 stops changing it): powi needs no more squarings than this.
STEP_BITS = tl.constexpr(25)


@triton.jit
def powi(base, n):
    """base ** n for an integer n in [0, 2**25) by repeated squaring (within a few ulps; float64
    exp/log would need libdevice, which the interpreter lacks). Unrolled, without a loop that
    depends on n, so that the compiler can hoist it, with everything else an update derives
    from the step alone, out of the kernel's loop over blocks."""
    result = base * 0.0 + 1.0
    for _ in tl.static_range(STEP_BITS):
        result = tl.where(n % 2 == 1, result * base, result)
        base = base * base
        n = n // 2
    return result


@triton.jit
def bias_corrections(beta1, beta2, t):
    """1 - beta1**t, 1 - beta2**t and beta2**t for the step number t (float64)."""
    n = t.to(tl.int32)
    beta2_t = powi(beta2, n)
    return 1.0 - powi(beta1, n), 1.0 - beta2_t, beta2_t


@triton.jit
def radam_rectification(beta2, beta2_t, t):
    """RAdam's (rho_t > 5, r_t) for the step number t (float64), as
    adaptive_lr.backends.scalars.radam_rectification; r_t is only meaningful when rho_t > 5."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)
    rect = tl.sqrt(tl.maximum((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                              / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.0))
    return rho_t > RECTIFY_THRESHOLD, rect


@triton.jit
def sqrt(x, CT: tl.constexpr):
    # IEEE-rounded like torch: tl.sqrt is the approximate instruction for float32 on GPUs
    if CT == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def div(x, y, CT: tl.constexpr):
    # IEEE-rounded like torch: "/" is the approximate div.full.f32 for float32 on GPUs
    if CT == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)
