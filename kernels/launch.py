"""Host side of the multi-tensor launch: the device tables, their cache, and the launch itself.

A *plan* holds everything the kernel needs that does not change while the bucket's tensors stay
where they are: one int64 device buffer with the pointer table (one row of ``data_ptr()``s per
list), the tensors' element counts and the chunk table (tensor index, 64-bit start offset), plus
the per-tensor arrival counters and the float64 hyperparameter table. Launch configuration is
fixed (no autotuning: the kernel updates its inputs in place).

Plans are cached by the data pointers, strides, sizes and dtypes of every tensor of the bucket
(never by Python ids): a grad set to None and recreated, or a state dict loaded, gives new
pointers and so a new plan; the key is recomputed and validated on every step. A cache hit costs
no device work; a miss copies the tables host-to-device once, asynchronously from pinned memory
(not allowed inside a CUDA-graph capture: run a warm-up step before capturing). Nothing on the
step path reads device memory on the host.

This package knows no optimizer and imports nothing of adaptive_lr: the caller
(adaptive_lr/backends/triton.py) names the update and hands over its hyperparameters by name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import triton.language as tl
from triton import knobs
from torch import Tensor

from .active_step import ROWS, active_step_kernel
from .updates import UPDATES


# Elements per program (one chunk-table entry) and per loop iteration (BLOCK, below). 1024 float32
# per iteration with 4 warps = 8 elements (two 16-byte vectors) per thread and stream; float64
# keeps the bytes per thread with 512. A 4096-element chunk amortises the per-program prologue
# (table loads, step scalars) over >= 16 KiB per stream while a 50M-element bucket still yields
# ~12k programs (~6 waves of 16 resident 128-thread programs per SM on an H100).
CHUNK = 4096
NUM_WARPS = 4
MAX_PLANS = 64

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
              torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

_plans: OrderedDict[tuple, "_Plan"] = OrderedDict()
_stats = {"hits": 0, "misses": 0}


def plan_cache_info() -> dict:
    """Cache statistics: ``hits``, ``misses`` (plans built) and ``size`` (plans held)."""
    return dict(_stats, size=len(_plans))


def clear_plan_cache() -> None:
    _plans.clear()
    _stats.update(hits=0, misses=0)


@dataclass
class _Plan:
    ptr_table: Tensor  # views into one int64 device buffer
    numels: Tensor
    seeds: Tensor  # compact state's rounding seeds (0 for float32 state)
    chunk_tensor: Tensor
    chunk_start: Tensor
    arrivals: Tensor  # int32 per tensor, 0 between launches
    n_chunks: int
    aligned: bool
    hyper_values: tuple | None = None
    hyper: Tensor | None = None


def _build_plan(rows: list[list[Tensor]], device: torch.device, seeds: tuple[int, ...]
                ) -> _Plan:
    n, n_rows = len(rows[0]), len(rows)
    numels = [p.numel() for p in rows[0]]
    # an empty tensor still gets a program: its step counter must advance
    counts = [max(1, -(-k // CHUNK)) for k in numels]
    host = torch.empty(n_rows * n + 2 * n + 2 * sum(counts), dtype=torch.int64)
    ptrs = host[: n_rows * n].view(n_rows, n)
    for r, row in enumerate(rows):
        ptrs[r] = torch.tensor([t.data_ptr() for t in row], dtype=torch.int64)
    host[n_rows * n : n_rows * n + n] = torch.tensor(numels, dtype=torch.int64)
    host[n_rows * n + n : n_rows * n + 2 * n] = torch.tensor(seeds or [0] * n, dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(n), torch.tensor(counts))
    first_chunk = torch.tensor([0] + counts[:-1]).cumsum(0)
    starts = (torch.arange(len(tensor_index)) - first_chunk[tensor_index]) * CHUNK
    tail = host[n_rows * n + 2 * n :]
    tail[: len(starts)] = tensor_index
    tail[len(starts) :] = starts
    if device.type == "cuda":  # pinned + non_blocking: even a miss does not block the host
        buffer = host.pin_memory().to(device, non_blocking=True)
    else:
        buffer = host.to(device)
    c = len(starts)
    return _Plan(
        ptr_table=buffer[: n_rows * n],
        numels=buffer[n_rows * n : n_rows * n + n],
        seeds=buffer[n_rows * n + n : n_rows * n + 2 * n],
        chunk_tensor=buffer[n_rows * n + 2 * n : n_rows * n + 2 * n + c],
        chunk_start=buffer[n_rows * n + 2 * n + c :],
        arrivals=torch.zeros(n, dtype=torch.int32, device=device),
        n_chunks=c,
        aligned=all(t.data_ptr() % 16 == 0 for row in rows for t in row),
    )


def _plan_for(rows: list[list[Tensor]], device: torch.device, contiguous: bool,
              seeds: tuple[int, ...]) -> _Plan:
    key = (
        device,
        seeds,
        tuple(row[0].dtype for row in rows),
        tuple(p.numel() for p in rows[0]),
        tuple(t.data_ptr() for row in rows for t in row),
        # all contiguous (the usual case): element i of every tensor sits at data_ptr + i, so
        # pointers and sizes determine the plan; otherwise the layouts are part of the key
        True if contiguous else tuple(t.stride() for row in rows for t in row),
    )
    plan = _plans.get(key)
    if plan is not None:
        _stats["hits"] += 1
        _plans.move_to_end(key)
        return plan
    _stats["misses"] += 1
    plan = _build_plan(rows, device, seeds)
    _plans[key] = plan
    if len(_plans) > MAX_PLANS:
        _plans.popitem(last=False)
    return plan


def _hyper_table(plan: _Plan, values: tuple, device: torch.device) -> Tensor:
    """The hyperparameter table as a device tensor, rebuilt only when a value changed."""
    if values != plan.hyper_values:  # rare: a hyperparameter other than lr changed
        plan.hyper = torch.tensor(values, dtype=torch.float64).to(device)
        plan.hyper_values = values
    return plan.hyper


def active_step(
    update: str,
    rows: list[list[Tensor]],
    hyper: Mapping[str, float],
    *,
    lr: Tensor,
    weight_decay: float,
    gain_rule: tuple[float, float, float, float, float, bool],
    epoch_steps: int,
    maximize: bool,
    boundary: int,
    contiguous: bool,
    rounding_seeds: Sequence[int] | None = None,
    grad_sq_sums: list[Tensor] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One optimizer step over a bucket in one launch.

    ``update``: a name of ``UPDATES``, with ``hyper`` its hyperparameters by the names its
    ``Update.hyper`` lists (bools as 0/1; put in that order here).
    ``rows`` = [params, grads, gains, grad_sums, prev_signs, steps, *state lists] (``ROWS``, then
    the update's state lists in order); every column contiguous, or dense with its param's
    strides (the caller runs other layouts on copies); ``contiguous``: whether every tensor is
    (then the plan's key needs no strides). ``lr``: a one-element tensor on the params' device,
    read by the kernel; ``weight_decay``: decoupled, applied before the update (0: none);
    ``gain_rule``: (gain_inc, gain_dec, min_gain, max_gain, sign_threshold, relax_gains), the
    sign test on when sign_threshold > 0 (relaxing held gains above 1 with relax_gains),
    against the second moment over epochs of ``epoch_steps`` steps, or
    for an update without one against ``grad_sq_sums`` (the epochs' sums of g**2, of grad_sums'
    dtype and layout, given exactly then); ``boundary`` 0 / 1 (roll) / 2 (update), as
    ``adaptive_lr.backends.bucket.Boundary``. ``rounding_seeds``: one per param for compact
    state (bfloat16 gains and grad_sums; not for float64 params), None for float32 state.
    bfloat16 state lists (compact state, an update without a second moment): the moments are
    rounded stochastically too (state_precision="bfloat16").
    """
    if update not in UPDATES:
        raise ValueError(f"adaptive_lr triton backend: no update {update!r}; have {list(UPDATES)}")
    names = UPDATES[update].hyper
    if len(hyper) != len(names) or not all(name in hyper for name in names):
        missing = [name for name in names if name not in hyper]
        unknown = [name for name in hyper if name not in names]
        raise ValueError(f"adaptive_lr triton backend: {update} takes the hyperparameters "
                         f"{names}; missing {missing}, unknown {unknown}")
    if len(gain_rule) != 6:
        raise ValueError("adaptive_lr triton backend: gain_rule is (gain_inc, gain_dec, min_gain, "
                         f"max_gain, sign_threshold, relax_gains), got {gain_rule}")
    *numbers, relax_gains = gain_rule
    sign_test = numbers[4] > 0
    if relax_gains and not sign_test:
        raise ValueError("adaptive_lr triton backend: relax_gains needs the sign test "
                         "(sign_threshold > 0)")
    moment = UPDATES[update].second_moment
    # the sign test against the second moment bias-corrects it with beta2
    if sign_test and moment is not None and "beta2" not in names:
        raise ValueError(f"adaptive_lr triton backend: {update}'s sign test needs beta2, which "
                         f"its hyperparameters {names} lack")
    grad_sq = sign_test and moment is None
    if grad_sq != (grad_sq_sums is not None):
        raise ValueError(f"adaptive_lr triton backend: {update} with sign_threshold "
                         f"{gain_rule[4]} takes {'' if grad_sq else 'no '}grad_sq_sums")
    if grad_sq:  # the table's last row (kernels.active_step)
        rows = [*rows, grad_sq_sums]
    params = rows[0]
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _TL_DTYPES:
        raise TypeError(f"adaptive_lr triton backend: unsupported param dtype {dtype}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    compact = rounding_seeds is not None
    if compact and compute == torch.float64:
        raise TypeError("adaptive_lr triton backend: compact state is not for float64 params")
    n_states = len(rows) - len(ROWS) - int(grad_sq)
    moment_dtypes = {t.dtype for row in rows[len(ROWS):len(ROWS) + n_states] for t in row}
    if len(moment_dtypes) > 1:
        raise TypeError(f"adaptive_lr triton backend: {update}'s state lists mix the dtypes "
                        f"{sorted(map(str, moment_dtypes))}")
    # bfloat16 moments (state_precision="bfloat16") are named by the state lists' dtype
    bf16_moments = moment_dtypes == {torch.bfloat16}
    if bf16_moments and moment is not None:
        raise TypeError(f"adaptive_lr triton backend: {update} keeps a second moment, which "
                        "stays float32: bfloat16 state lists are for updates whose state is momenta")
    if bf16_moments and not compact:
        raise TypeError("adaptive_lr triton backend: bfloat16 moments are rounded stochastically: "
                        "they need compact state (rounding_seeds)")
    plan = _plan_for(rows, device, contiguous, tuple(rounding_seeds or ()))
    # COMMON_HYPER, then the update's own in its order
    values = (weight_decay, *numbers, epoch_steps, *(hyper[name] for name in names))
    table = _hyper_table(plan, tuple(float(v) for v in values), device)
    active_step_kernel[(plan.n_chunks,)](
        plan.ptr_table, plan.numels, plan.seeds, plan.chunk_tensor, plan.chunk_start,
        plan.arrivals, len(params), table, lr,
        lr if grad_scale is None else grad_scale,  # unused pointer when the flag is off
        lr if found_inf is None else found_inf,
        UPDATE=UPDATES[update].function, N_HYPER=len(names),
        N_STATE=n_states, BOUNDARY=int(boundary), MOMENT=moment or 0,
        BETA2=names.index("beta2") if sign_test and not grad_sq else 0,
        SIGN_TEST=sign_test, RELAX=bool(relax_gains), GRAD_SQ=grad_sq, COMPACT=compact,
        BF16_MOMENTS=bf16_moments,
        MAXIMIZE=bool(maximize), HAS_WEIGHT_DECAY=weight_decay != 0,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        PARAM_DTYPE=_TL_DTYPES[dtype], CT=_TL_DTYPES[compute], ALIGNED=plan.aligned,
        SOFTWARE_BF16_ROUNDING=dtype == torch.bfloat16 and knobs.runtime.interpret,
        BLOCK=1024 if compute == torch.float32 else 512, CHUNK=CHUNK,
        num_warps=NUM_WARPS,
        # no FMA contraction: the same roundings as the reference and the cpu backend
        # (the kernel is memory-bound, so this costs nothing)
        enable_fp_fusion=False,
    )
