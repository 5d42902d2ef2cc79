"""Memory layouts for the kernels that index every tensor of a param as one flat array (the fused
cpu op and the Triton kernel): element k of the param's state, grad and gain sits at offset k of
each tensor's memory, in the param's element order."""

from __future__ import annotations

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """Whether t's elements fill its memory range exactly once (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, k) for s, k in zip(t.stride(), t.shape) if k != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_rows(rows: list[list[Tensor]], read_only: int, skip: tuple[int, ...] = ()
              ) -> tuple[list[list[Tensor]], list[tuple[Tensor, Tensor]]]:
    """``rows[r][i]`` is tensor i of list r (row 0: the params). A column runs in its dense
    param's layout (contiguous, channels_last, transposed: state made by zeros_like has it), or
    contiguous when the param is not dense; its tensors already laid out so are used in place, the
    rare others run on copies in that layout, to be copied back into the returned (original, copy)
    pairs after the launch. So an element's flat index is its position in a dense param's memory
    whatever the layout of its grad (compact state's rounding draws depend on it). Row
    ``read_only`` (the grads) is never copied back; rows in ``skip`` (one-element step counters)
    are left as they are."""
    writeback: list[tuple[Tensor, Tensor]] = []
    out = rows
    for i, p in enumerate(rows[0]):
        dense = is_dense(p)
        column = [r for r, row in enumerate(rows) if r not in skip and not _in_order(row[i], p, dense)]
        if not column:
            continue
        if out is rows:
            out = [list(row) for row in rows]
        for r in column:
            t = out[r][i]
            copy = torch.empty_like(p, dtype=t.dtype).copy_(t) if dense else t.contiguous()
            if r != read_only:
                writeback.append((t, copy))
            out[r][i] = copy
    return out, writeback


def _in_order(t: Tensor, p: Tensor, dense: bool) -> bool:
    """Whether t's memory holds its elements in the order the kernels run param p in."""
    if p.is_contiguous() or not dense:
        return t.is_contiguous()
    return t.stride() == p.stride()
