"""Compact state's roundings, in torch ops, for the reference and foreach backends: the same
functions as csrc/include/adaptive_lr/math.h (``mix32``, ``rounding_key``, ``grad_sq_sum_key``,
``bfloat16_stochastic``, ``bfloat16_stochastic_gain``) and the Triton kernel, so every backend
draws the same bits and stores the same bfloat16 grad_sum, grad_sq_sum and gain
(docs/algorithm.md, "Compact state"); a NaN sum stays NaN (0x7fc0, as math.h's).

The 32-bit hash runs on int64 tensors holding unsigned 32-bit values (torch does not promise that
an int32 product wraps around), with multipliers chosen so that no product leaves int64; the
rounding adds its draws in int32, where no sum overflows. ``mix32`` and ``rounding_key`` also
take Python ints."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import is_dense

MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x * c mod 2**32 (x an unsigned 32-bit value, c a constant); a tensor x in place. A c of
    2**31 or more is taken as c - 2**32 (the same mod 2**32): the product's magnitude stays below
    2**63, so int64 never overflows, and the mask leaves its low 32 bits (two's complement)."""
    x *= c if c < 1 << 31 else c - (1 << 32)
    x &= MASK32
    return x


# C. Wellons' "lowbias32": two rounds of an xor-shift and a multiplication, then an xor-shift by 16
_ROUNDS = ((16, 0x7FEB352D), (15, 0x846CA68B))


def mix32(x):
    """The 32-bit hash. A tensor is hashed in place (give it a fresh one): the augmented
    assignments below mutate tensors and rebind ints."""
    x = _mix32_high(x)
    x ^= x >> 16
    return x


def _mix32_high(x):
    """mix32 but its last xor-shift, which leaves the high 16 bits as they are: an epoch sum's
    draw needs no more."""
    for shift, c in _ROUNDS:
        x ^= x >> shift
        x = _mul32(x, c)
    return x


def rounding_key(seed: int, step: float | Tensor) -> int | Tensor:
    """One param's key for one step: its rounding seed and its step count after this step's
    increment. A 0-dim tensor ``step`` gives a 0-dim tensor key: no host read, and under
    torch.compile no graph break and no recompile for each new step."""
    if isinstance(step, Tensor):
        return mix32(mix32(step.to(torch.int64) & MASK32) ^ seed)
    return mix32(seed ^ mix32(int(step) & MASK32))


# A boundary applied outside any step (a param that missed one, optim/clock.py; every backend's
# optimizer runs that path in torch ops) rounds a compact gain under a key no step uses.
_CATCH_UP_SALT = 0x5BD1E995


def catch_up_key(seed: int, step: float) -> int:
    return rounding_key(seed ^ _CATCH_UP_SALT, step)


# A compact grad_sq_sum is rounded with draws of its own, from the step's key salted and hashed
# again: bits independent of the grad_sum's and the gain's under that key.
_GRAD_SQ_SUM_SALT = 0x9E3779B9


def grad_sq_sum_key(key: int | Tensor) -> int | Tensor:
    """The key of a compact grad_sq_sum's stochastic rounding (math.h's grad_sq_sum_key), from
    its param's rounding key for the step (an int, or a 0-dim tensor: not modified)."""
    return mix32(key ^ _GRAD_SQ_SUM_SALT)


def element_index(t: Tensor) -> Tensor:
    """Each element's index as the fused kernels count it: its position in memory for a dense
    tensor (any layout the kernels run in place), in row-major order otherwise (they run such a
    param on a contiguous copy)."""
    flat = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    if is_dense(t):
        return flat.as_strided(t.shape, t.stride())
    return flat.view(t.shape)


def _round_with(x: Tensor, draws: Tensor) -> Tensor:
    """float32 ``x`` rounded stochastically to bfloat16 with 16 uniform bits per element (math.h's
    bfloat16_round_with): added below the kept bits, which rounds up with probability equal to
    the dropped fraction once they are cut off. Returns the int32 sum, the bfloat16's bits in its
    high 16 (``draws`` if int32, in place). Infinities and NaN round to nearest."""
    # a NaN becomes the quiet NaN 0x7fc00000 (math.h's bfloat16_nearest gives that one), whose
    # payload cannot carry; an infinity's low 16 bits are 0, so the draw leaves it as it is. On the
    # signed bit pattern the sum then stays inside int32 (half the bytes of int64, and an addition
    # without the multiplication by alpha int64's does), its high 16 bits inside int16
    bits = x.nan_to_num(nan=math.nan, posinf=math.inf, neginf=-math.inf).view(torch.int32)
    rounded = draws.to(torch.int32)
    rounded += bits
    return rounded


def _to_bfloat16(rounded: Tensor) -> Tensor:
    return (rounded >> 16).to(torch.int16).view(torch.bfloat16)


def bfloat16_stochastic(x: Tensor, key: int, index: Tensor) -> Tensor:
    """A compact epoch sum: float32 ``x`` rounded stochastically to bfloat16, element ``index``
    (element_index of its param) with ``key``'s draw, the hash's high 16 bits."""
    draws = _mix32_high((index + key) & MASK32)
    draws >>= 16
    return _to_bfloat16(_round_with(x, draws))


def bfloat16_stochastic_gain(x: Tensor, key: int, index: Tensor) -> Tensor:
    """A new compact gain: as bfloat16_stochastic with the same hash's low 16 bits."""
    draws = mix32((index + key) & MASK32)
    draws &= 0xFFFF
    return _to_bfloat16(_round_with(x, draws))
