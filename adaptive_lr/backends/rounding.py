"""Compact state's roundings, in torch ops, for the reference and foreach backends: the same
functions as csrc/include/adaptive_lr/math.h (``mix32``, ``rounding_key``, ``grad_sq_sum_key``,
``bfloat16_stochastic``, ``bfloat16_stochastic_gain``) and the Triton kernel, so every backend
draws the same bits and stores the same bfloat16 grad_sum, grad_sq_sum and gain
(docs/algorithm.md, "Compact state"); a NaN sum stays NaN, with the
bit pattern torch's conversion gives it.

The 32-bit hash runs on int64 tensors holding unsigned 32-bit values; a product is split into
16-bit halves so that no intermediate leaves int64. ``mix32`` and ``rounding_key`` also take
Python ints."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import is_dense

MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x * c mod 2**32 (x an unsigned 32-bit value, c a constant); a tensor x in place."""
    high = x * (c >> 16)
    high &= 0xFFFF
    high <<= 16
    x *= c & 0xFFFF
    x += high
    x &= MASK32
    return x


def mix32(x):
    """C. Wellons' "lowbias32" integer hash. A tensor is hashed in place (give it a fresh one):
    the augmented assignments below mutate tensors and rebind ints, and on the foreach backend's
    big tensors every pass not allocated counts."""
    x ^= x >> 16
    x = _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    x ^= x >> 16
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
    bfloat16_round_with): added below the kept bits before truncation, which rounds up with
    probability equal to the dropped fraction. Infinities and NaN round to nearest."""
    # on the signed bit pattern: a finite float's stays inside int32 (only NaNs could leave it)
    draws += x.view(torch.int32)
    draws &= -0x10000
    # the low 16 bits are 0: the conversion to bfloat16 is exact
    return torch.where(x.isfinite(), draws.to(torch.int32).view(torch.float32), x).to(torch.bfloat16)


def bfloat16_stochastic(x: Tensor, key: int, index: Tensor) -> Tensor:
    """A compact epoch sum: float32 ``x`` rounded stochastically to bfloat16, element ``index``
    (element_index of its param) with ``key``'s draw, the hash's high 16 bits."""
    draws = mix32((index + key) & MASK32)
    draws >>= 16
    return _round_with(x, draws)


def bfloat16_stochastic_gain(x: Tensor, key: int, index: Tensor) -> Tensor:
    """A new compact gain: as bfloat16_stochastic with the same hash's low 16 bits."""
    draws = mix32((index + key) & MASK32)
    draws &= 0xFFFF
    return _round_with(x, draws)
