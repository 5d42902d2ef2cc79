"""Compact state's roundings, in torch ops, for the reference and foreach backends: the same
functions as csrc/include/adaptive_lr/math.h (``mix32``, ``rounding_key``,
``bfloat16_stochastic``) and the Triton kernel, so every backend draws the same bits and stores
the same bfloat16 grad_sum (docs/algorithm.md, "Compact state").

The 32-bit hash runs on int64 tensors holding unsigned 32-bit values; a product is split into
16-bit halves so that no intermediate leaves int64. ``mix32`` and ``rounding_key`` also take
Python ints."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import is_dense

MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x * c mod 2**32 (x an unsigned 32-bit value, c a constant)."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """C. Wellons' "lowbias32" integer hash."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_key(seed: int, step: float) -> int:
    """One param's key for one step: its rounding seed and its step count after this step's
    increment."""
    return mix32(seed ^ mix32(int(step) & MASK32))


def element_index(t: Tensor) -> Tensor:
    """Each element's index as the fused kernels count it: its position in memory for a dense
    tensor (any layout the kernels run in place), in row-major order otherwise (they run such a
    param on a contiguous copy)."""
    flat = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    if is_dense(t):
        return flat.as_strided(t.shape, t.stride())
    return flat.view(t.shape)


def bfloat16_stochastic(x: Tensor, key: int, index: Tensor) -> Tensor:
    """float32 ``x`` rounded stochastically to bfloat16, element ``index`` (element_index of its
    param) with ``key``'s draw: 16 hashed bits are added below the kept bits before truncation,
    which rounds up with probability equal to the dropped fraction. Infinities and NaN round to
    nearest."""
    bits = x.view(torch.int32).to(torch.int64) & MASK32
    draws = mix32((index + key) & MASK32) >> 16
    rounded = (bits + draws) & 0xFFFF0000
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    # the low 16 bits are 0: the conversion to bfloat16 is exact
    return torch.where(x.isfinite(), rounded.view(torch.float32), x).to(torch.bfloat16)
