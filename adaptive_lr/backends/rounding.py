"""Compact state's roundings, in torch ops, for the reference and foreach backends: the same
functions as csrc/include/adaptive_lr/math.h (``mix32``, ``rounding_key``, ``gain_key``,
``bfloat16_stochastic``, ``bfloat16_stochastic_low_bits``) and the Triton kernel, so every backend
draws the same bits and stores the same bfloat16 grad_sum, grad_sq_sum and gain
(docs/algorithm.md, "Compact state"); a NaN sum stays NaN (0x7fc0, as math.h's).

A ``bfloat16`` state (``state_precision="bfloat16"``) also rounds its moments so, each under a
key of its own (``moment_key``).

The 32-bit hash runs on int64 tensors holding unsigned 32-bit values, with multipliers chosen so
that no product leaves int64; the foreach backend's batches hash on int32 tensors instead (half
the bytes) where the device's int32 products and narrowing casts wrap around, which torch does not
promise and ``int32_wraps`` checks once per device type. The rounding adds its draws in int32,
where no sum overflows. ``mix32`` and ``rounding_key`` also take Python ints."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import is_dense

MASK32 = 0xFFFFFFFF


def _is_int32(x) -> bool:
    return isinstance(x, Tensor) and x.dtype == torch.int32


def _mul32(x, c: int):
    """x * c mod 2**32 (x an unsigned 32-bit value, c a constant); a tensor x in place. A c of
    2**31 or more is taken as c - 2**32 (the same mod 2**32): the product's magnitude stays below
    2**63, so int64 never overflows, and the mask leaves its low 32 bits (two's complement). An
    int32 tensor (the bits of the value) wraps by itself (int32_wraps)."""
    x *= c if c < 1 << 31 else c - (1 << 32)
    if not _is_int32(x):
        x &= MASK32
    return x


# C. Wellons' "lowbias32": two rounds of an xor-shift and a multiplication, then an xor-shift by 16
_ROUNDS = ((16, 0x7FEB352D), (15, 0x846CA68B))


def mix32(x, scratch: Tensor | None = None):
    """The 32-bit hash. A tensor is hashed in place (give it a fresh one): the augmented
    assignments below mutate tensors and rebind ints. ``scratch`` (of a tensor's shape): where
    its shifted copies go, so that a pass allocates nothing."""
    return _xorshift(_mix32_high(x, scratch), 16, scratch)


def _mix32_high(x, scratch: Tensor | None = None):
    """mix32 but its last xor-shift, which leaves the high 16 bits as they are: a grad_sum's or a
    gain's draw needs no more."""
    for shift, c in _ROUNDS:
        x = _mul32(_xorshift(x, shift, scratch), c)
    return x


def _xorshift(x, shift: int, scratch: Tensor | None):
    shifted = x >> shift if scratch is None else torch.bitwise_right_shift(x, shift, out=scratch)
    if _is_int32(x):  # a logical shift: the arithmetic one's copies of the sign bit cleared
        shifted &= (1 << (32 - shift)) - 1
    x ^= shifted
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


# A new compact gain is rounded with draws of its own, from the step's key salted and hashed
# again: bits independent of both epoch sums' (the two halves of one hash under the step's key).
_GAIN_SALT = 0x9E3779B9


def gain_key(key: int | Tensor) -> int | Tensor:
    """The key of a new compact gain's stochastic rounding (math.h's gain_key), from its param's
    rounding key for the step (an int, or a 0-dim tensor: not modified)."""
    return mix32(key ^ _GAIN_SALT)


# A bfloat16 moment (state k of its optimizer, in the kernels' order) is rounded with draws of its
# own too: math.h's moment_key.
_MOMENT_SALT = 0x85EBCA6B


def moment_key(key: int | Tensor, k: int) -> int | Tensor:
    """The key of the stochastic rounding of a bfloat16 moment, state ``k`` of its optimizer, from
    its param's rounding key for the step (an int, or a 0-dim tensor: not modified)."""
    return mix32(key ^ (_MOMENT_SALT + k))


def element_index(t: Tensor) -> Tensor:
    """Each element's index as the fused kernels count it: its position in memory for a dense
    tensor (any layout the kernels run in place), in row-major order otherwise (they run such a
    param on a contiguous copy)."""
    flat = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    if is_dense(t):
        return flat.as_strided(t.shape, t.stride())
    return flat.view(t.shape)


_WRAPS: dict[str, bool] = {}


def int32_wraps(device: torch.device) -> bool:
    """Whether the device's int32 products and int64 -> int32 casts wrap around (two's
    complement), as on every CPU and GPU torch runs on but not promised by torch: checked once
    per device type on values that overflow, in an odd length (SIMD lanes and a scalar tail)."""
    if device.type not in _WRAPS:
        values = [0x7FFFFFFF, -0x80000000, 0x12345678, -1, 65537, 0x7FEB352D, 3] * 9
        c = 0x846CA68B - (1 << 32)
        product = (torch.tensor(values, dtype=torch.int32, device=device) * c).tolist()
        narrowed = torch.tensor([2**31 + 5, 2**32 - 1, 7], device=device).to(torch.int32).tolist()
        _WRAPS[device.type] = (product == [(v * c + 2**31) % 2**32 - 2**31 for v in values]
                               and narrowed == [5 - 2**31, -1, 7])
    return _WRAPS[device.type]


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
    """A compact grad_sum: float32 ``x`` rounded stochastically to bfloat16, element ``index``
    (element_index of its param) with ``key``'s draw, the hash's high 16 bits."""
    draws = _mix32_high((index + key) & MASK32)
    draws >>= 16
    return _to_bfloat16(_round_with(x, draws))


def bfloat16_stochastic_low_bits(x: Tensor, key: int, index: Tensor) -> Tensor:
    """A compact grad_sq_sum: as bfloat16_stochastic with the same hash's low 16 bits."""
    draws = mix32((index + key) & MASK32)
    draws &= 0xFFFF
    return _to_bfloat16(_round_with(x, draws))


def bfloat16_stochastic_gain(x: Tensor, key: int, index: Tensor) -> Tensor:
    """A new compact gain, under the step's ``key``: as bfloat16_stochastic under gain_key(key)."""
    return bfloat16_stochastic(x, gain_key(key), index)


# The foreach backend rounds in batches of at most this many elements: pieces of a big tensor, or
# small tensors packed side by side. A step's temporaries are then bounded (about 10 MiB) whatever
# its tensors' sizes, the int64 passes run in cache (2**17-2**18 were the fastest on a CPU, 2**20
# took half as long again: docs/step_time.md), and a small tensor costs 4 ops beside a batch's
# dozen. On a GPU each op is a launch: a pass over 2**18 int64 still moves megabytes.
CHUNK = 1 << 18


def accumulate_stochastic(grad_sums: list[Tensor], values: list[Tensor],
                          roundings: list[tuple[int, Tensor]],
                          grad_sq_sums: list[Tensor] | None = None) -> None:
    """Compact epoch sums, in place, with ``roundings[i] = (key, param)``:
    ``grad_sums[i] <- bfloat16_stochastic(float32(grad_sums[i]) + values[i], key,
    element_index(param))``, and where given ``grad_sq_sums[i]`` likewise with values[i] ** 2
    (the product and the sum each rounded once, as the reference does) and
    bfloat16_stochastic_low_bits: the two share each element's hash."""
    flat_values = [_in_index_order(v, p).reshape(-1) for v, (_, p) in zip(values, roundings)]

    def add(x, i, total, start, stop):
        x.copy_(total[start:stop])
        x += flat_values[i][start:stop]

    def add_square(x, i, total, start, stop):
        value = flat_values[i][start:stop]
        torch.mul(value, value, out=x)
        x += total[start:stop]

    outputs = [(grad_sums, add, False)]
    if grad_sq_sums is not None:
        outputs.append((grad_sq_sums, add_square, True))
    _store(roundings, outputs)


def store_stochastic(outs: list[Tensor], values: list[Tensor],
                     roundings: list[tuple[int, Tensor]]) -> None:
    """``outs[i] <- bfloat16_stochastic(values[i], key, element_index(param))`` with
    ``roundings[i] = (key, param)``, in place."""
    flat_values = [_in_index_order(v, p).reshape(-1) for v, (_, p) in zip(values, roundings)]
    _store(roundings,
           [(outs, lambda x, i, _, start, stop: x.copy_(flat_values[i][start:stop]), False)])


def store_stochastic_gain(gains: list[Tensor], values: list[Tensor],
                          roundings: list[tuple[int, Tensor]]) -> None:
    """New compact gains: ``gains[i] <- bfloat16_stochastic_gain(values[i], key,
    element_index(param))`` with ``roundings[i] = (key, param)``, in place."""
    store_stochastic(gains, values, [(gain_key(key), param) for key, param in roundings])


def _store(roundings: list[tuple[int, Tensor]], outputs) -> None:
    """For each ``(outs, fill, low_bits)`` of ``outputs`` (lists over the params of
    ``roundings``): outs[i] <- the float32 values ``fill(x, i, flat_out, start, stop)`` writes
    into x for the elements [start, stop) of outs[i] (element_index order), rounded
    stochastically with the hash's high bits, or its low bits (``low_bits``), CHUNK elements at
    a time; the outputs share each element's hash."""
    params = [param for _, param in roundings]
    targets = [[_in_index_order(out, p) for out, p in zip(outs, params)] for outs, _, _ in outputs]
    flats = [[t.reshape(-1) for t in ts] for ts in targets]  # views, where laid out as the params
    sizes = [f.numel() for f in flats[0]]
    device = params[0].device
    size = min(CHUNK, sum(sizes))
    index = torch.empty(size, dtype=torch.int64, device=device)  # element indices pass 2**31
    # the hash's dtype: int32 (half the bytes of int64) where it wraps on this device
    narrow = torch.empty(size, dtype=torch.int32, device=device) if int32_wraps(device) else None
    scratch = torch.empty_like(index if narrow is None else narrow)
    draws = torch.empty(size, dtype=torch.int32, device=device)
    x = torch.empty(size, dtype=torch.float32, device=device)
    # the high bits need no more than mix32's last xor-shift spares
    mix = mix32 if any(low_bits for _, _, low_bits in outputs) else _mix32_high
    for batch, used in _batches(sizes):
        for i, start, stop, at in batch:
            key = roundings[i][0]
            torch.arange(key + start, key + stop, out=index[at:at + stop - start])
        hashed = index[:used]
        hashed &= MASK32
        if narrow is not None:
            hashed = narrow[:used].copy_(hashed)  # the same 32 bits
        hashed = mix(hashed, scratch[:used])
        for (_, fill, low_bits), flat in zip(outputs, flats):
            for i, start, stop, at in batch:
                fill(x[at:at + stop - start], i, flat[i], start, stop)
            if low_bits:
                torch.bitwise_and(hashed, 0xFFFF, out=draws[:used])
            else:
                torch.bitwise_right_shift(hashed, 16, out=draws[:used])
                if narrow is not None:  # an int32 hash shifts in copies of its sign bit
                    draws[:used] &= 0xFFFF
            rounded = _round_with(x[:used], draws[:used])
            for i, start, stop, at in batch:  # each piece's bfloat16 bits, shifted into place
                torch.bitwise_right_shift(rounded[at:at + stop - start], 16,
                                          out=flat[i][start:stop].view(torch.int16))
    for ts, fs in zip(targets, flats):
        for target, flat in zip(ts, fs):
            if not target.is_contiguous():  # flat was a copy
                target.copy_(flat.view(target.shape))


def _batches(sizes: list[int]):
    """Pieces ``(i, start, stop, at)`` of tensors of ``sizes`` elements (tensor i's elements
    [start, stop) at offset ``at`` of the batch), in batches of at most CHUNK elements: yields
    (pieces, elements)."""
    batch, used = [], 0
    for i, n in enumerate(sizes):
        start = 0
        while start < n:
            stop = min(n, start + CHUNK - used)
            batch.append((i, start, stop, used))
            used += stop - start
            start = stop
            if used == CHUNK:
                yield batch, used
                batch, used = [], 0
    if batch:
        yield batch, used


def _in_index_order(t: Tensor, param: Tensor) -> Tensor:
    """t (of param's shape) with its dims permuted so that its row-major order is
    element_index(param)'s: param's memory order (dims by decreasing stride) if param is dense."""
    if not is_dense(param):
        return t
    return t.permute(sorted(range(param.dim()), key=param.stride, reverse=True))
