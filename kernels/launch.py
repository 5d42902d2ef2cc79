"""Host side of the multi-tensor launch: the device tables, their cache, and the launch itself.

A *plan* holds everything the kernel needs that does not change while the bucket's tensors stay
where they are: one int64 device buffer with the pointer table (``SLOTS`` rows of ``data_ptr()``s),
the tensors' element counts and the chunk table (tensor index, 64-bit start offset), plus the
per-tensor arrival counters, the float64 hyperparameter table and the device copy of a float lr.
Launch configuration is fixed (no autotuning: the kernel updates its inputs in place).

Plans are cached by the data pointers, strides, sizes and dtypes of every tensor of the bucket
(never by Python ids): a grad set to None and recreated, or a state dict loaded, gives new
pointers and so a new plan; the key is recomputed and validated on every step. A cache hit costs
no device work; a miss copies the tables host-to-device once, asynchronously from pinned memory
(not allowed inside a CUDA-graph capture: run a warm-up step before capturing). Nothing on the
step path reads device memory on the host.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton.language as tl
from triton import knobs
from torch import Tensor

from adaptive_lr.backends.layout import flat_rows

from .active_step import HYPER_SLOTS, OPTIMIZERS, ROWS, active_step_kernel

SLOTS = len(ROWS)
GRAD, STEP, STATE0 = ROWS.index("grad"), ROWS.index("step"), ROWS.index("state0")

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
    chunk_tensor: Tensor
    chunk_start: Tensor
    arrivals: Tensor  # int32 per tensor, 0 between launches
    n_chunks: int
    aligned: bool
    hyper_values: tuple | None = None
    hyper: Tensor | None = None
    lr_value: float | None = None
    lr: Tensor | None = None


def _build_plan(rows: list[list[Tensor]], device: torch.device) -> _Plan:
    n = len(rows[0])
    numels = [p.numel() for p in rows[0]]
    # an empty tensor still gets a program: its step counter must advance
    counts = [max(1, -(-k // CHUNK)) for k in numels]
    host = torch.empty(SLOTS * n + n + 2 * sum(counts), dtype=torch.int64)
    ptrs = host[: SLOTS * n].view(SLOTS, n)
    ptrs.zero_()
    for r, row in enumerate(rows):
        ptrs[r] = torch.tensor([t.data_ptr() for t in row], dtype=torch.int64)
    host[SLOTS * n : SLOTS * n + n] = torch.tensor(numels, dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(n), torch.tensor(counts))
    first_chunk = torch.tensor([0] + counts[:-1]).cumsum(0)
    starts = (torch.arange(len(tensor_index)) - first_chunk[tensor_index]) * CHUNK
    tail = host[SLOTS * n + n :]
    tail[: len(starts)] = tensor_index
    tail[len(starts) :] = starts
    if device.type == "cuda":  # pinned + non_blocking: even a miss does not block the host
        buffer = host.pin_memory().to(device, non_blocking=True)
    else:
        buffer = host.to(device)
    c = len(starts)
    return _Plan(
        ptr_table=buffer[: SLOTS * n],
        numels=buffer[SLOTS * n : SLOTS * n + n],
        chunk_tensor=buffer[SLOTS * n + n : SLOTS * n + n + c],
        chunk_start=buffer[SLOTS * n + n + c :],
        arrivals=torch.zeros(n, dtype=torch.int32, device=device),
        n_chunks=c,
        aligned=all(t.data_ptr() % 16 == 0 for row in rows for t in row),
    )


def _plan_for(rows: list[list[Tensor]], device: torch.device, contiguous: bool) -> _Plan:
    key = (
        device,
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
    plan = _build_plan(rows, device)
    _plans[key] = plan
    if len(_plans) > MAX_PLANS:
        _plans.popitem(last=False)
    return plan


def _device_scalars(plan: _Plan, hyper: dict, device: torch.device) -> tuple[Tensor, Tensor]:
    """The hyperparameter table and lr as device tensors, refreshed without a host sync."""
    beta1, beta2 = hyper.get("betas", (0.0, 0.0))
    named = dict(hyper, beta1=beta1, beta2=beta2)
    values = tuple(float(named.get(name, 0.0)) for name in HYPER_SLOTS)
    if values != plan.hyper_values:  # rare: a hyperparameter other than lr changed
        plan.hyper = torch.tensor(values, dtype=torch.float64).to(device)
        plan.hyper_values = values
    lr = hyper["lr"]
    if isinstance(lr, Tensor):  # read in the kernel: in-place changes need no host work at all
        return plan.hyper, lr.to(device)
    lr = float(lr)
    if plan.lr is None:
        plan.lr = torch.full((1,), lr, dtype=torch.float64, device=device)
    elif lr != plan.lr_value:  # a fill kernel: no transfer, no sync
        plan.lr.fill_(lr)
    plan.lr_value = lr
    return plan.hyper, plan.lr


def active_step(
    optimizer: str,
    rows: list[list[Tensor]],
    hyper: dict,
    boundary: int,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One optimizer step over a bucket in one launch.

    ``rows`` = [params, grads, gains, grad_sums, prev_signs, steps, *state lists] (the state
    lists in ``bucket.STATE_KEYS`` order, amsgrad-only ones only when present); ``hyper`` the
    param group's hyperparameters; ``boundary`` 0 / 1 (roll) / 2 (update), as ``bucket.Boundary``.
    """
    params = rows[0]
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _TL_DTYPES:
        raise TypeError(f"adaptive_lr triton backend: unsupported param dtype {dtype}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    contiguous = all(t.is_contiguous() for row in rows for t in row)
    rows, writeback = (rows, ()) if contiguous else flat_rows(rows, GRAD, (STEP,))
    plan = _plan_for(rows, device, contiguous)
    hyper_table, lr = _device_scalars(plan, hyper, device)
    amsgrad = bool(hyper.get("amsgrad", False))
    if len(rows) > STATE0 + 3 or (amsgrad and len(rows) != STATE0 + 3):
        raise ValueError(f"adaptive_lr triton backend: unexpected state lists for {optimizer}")
    active_step_kernel[(plan.n_chunks,)](
        plan.ptr_table, plan.numels, plan.chunk_tensor, plan.chunk_start, plan.arrivals,
        len(params), hyper_table, lr,
        lr if grad_scale is None else grad_scale,  # unused pointer when the flag is off
        lr if found_inf is None else found_inf,
        OPTIMIZER=OPTIMIZERS[optimizer], BOUNDARY=int(boundary), AMSGRAD=amsgrad,
        NESTEROV=bool(hyper.get("nesterov", False)), RECTIFY=bool(hyper.get("rectify", True)),
        MAXIMIZE=bool(hyper.get("maximize", False)),
        HAS_WEIGHT_DECAY=hyper.get("weight_decay", 0) != 0,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        PARAM_DTYPE=_TL_DTYPES[dtype], CT=_TL_DTYPES[compute], ALIGNED=plan.aligned,
        SOFTWARE_BF16_ROUNDING=dtype == torch.bfloat16 and knobs.runtime.interpret,
        BLOCK=1024 if compute == torch.float32 else 512, CHUNK=CHUNK,
        num_warps=NUM_WARPS,
        # no FMA contraction: the same roundings as the reference and the cpu backend
        # (the kernel is memory-bound, so this costs nothing)
        enable_fp_fusion=False,
    )
    for original, copy in writeback:
        original.copy_(copy)
