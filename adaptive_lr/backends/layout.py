"""Memory layouts for the kernels that index every tensor of a param as one flat array (the fused
cpu op and the Triton kernel): element k of the param's state, grad and gain sits at offset k of
each tensor's memory, in the param's element order."""

from __future__ import annotations

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
    """``rows[r][i]`` is tensor i of list r (row 0: the params). Columns that are all contiguous,
    or share their dense param's strides (channels_last, transposed: state made by zeros_like has
    them), are used in place; the rare others run on contiguous copies, to be copied back into
    the returned (original, copy) pairs after the launch. Row ``read_only`` (the grads) is never
    copied back; rows in ``skip`` (one-element step counters) are left as they are."""
    writeback: list[tuple[Tensor, Tensor]] = []
    out = rows
    for i, p in enumerate(rows[0]):
        column = [row[i] for r, row in enumerate(rows) if r not in skip]
        if all(t.is_contiguous() for t in column):
            continue
        if is_dense(p) and all(t.stride() == p.stride() for t in column):
            continue
        if out is rows:
            out = [list(row) for row in rows]
        for r, row in enumerate(out):
            if r not in skip and not row[i].is_contiguous():
                copy = row[i].contiguous()
                if r != read_only:
                    writeback.append((row[i], copy))
                row[i] = copy
    return out, writeback
