"""Active(optimizer)'s pass after its inner optimizer stepped (docs/active_wrapper.md), on every
backend: for each element of a bucket (params of one device and dtype, one boundary kind),

1. the epoch boundary named by ``bucket.boundary``, as in ``bucket.py``; with the sign test
   (``rule.sign_threshold`` > 0) a sum counts where grad_sum**2 > factor * noise, ``noise`` the
   bucket's ``grad_sq_sums`` (the wrapper's own) or else its ``moments`` (the inner optimizer's),
   ``factor`` its ``sign_test_factors``, compared in the compute dtype below; ``grad_sq_sum``
   is then reset to 0, as ``grad_sum``;
2. ``param <- before + gain * (param - before)``, where ``param`` is the inner optimizer's
   result and ``before`` the param's value before it; ``param`` is kept as it is where the gain
   is 1 (the formula would round it); in float64 for float64 params, else in float32;
3. ``grad_sum <- grad_sum + g`` (float32), ``g`` the grad, negated when the inner optimizer's
   group says ``maximize``; where the bucket keeps ``grad_sq_sums``,
   ``grad_sq_sum <- grad_sq_sum + g32 * g32`` in float32 (g32: g rounded to float32).

Three passes: ``reference``, the oracle (a for-loop of plain torch ops), ``foreach``, the
portable version, and ``cpu``, one fused C++ op (``torch.ops.adaptive_lr.active_rescale_``).
``PASSES`` names the one each backend runs: the ``cuda`` and ``triton`` backends have no fused
pass and run ``foreach``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..gain_rule import GainRule
from . import choose, fused
from . import foreach as foreach_backend
from . import reference as reference_backend
from .bucket import Boundary, state_dtype


@dataclass
class RescaleBucket:
    params: list[Tensor]
    befores: list[Tensor]
    grads: list[Tensor]
    gains: list[Tensor]
    grad_sums: list[Tensor]
    prev_signs: list[Tensor]
    rule: GainRule
    maximize: bool  # the inner optimizer group's: the epoch sum is of the negated grad
    boundary: Boundary
    # the sign test (rule.sign_threshold > 0): the wrapper's epoch sums of g**2 (accumulated
    # every step, the test's noise), or else the inner optimizer's moments (float32, read at a
    # boundary only), and per tensor the factor the noise is multiplied by
    grad_sq_sums: list[Tensor] | None = None
    moments: list[Tensor] | None = None
    sign_test_factors: list[float] | None = None

    def floors(self) -> list[Tensor] | None:
        """Per tensor, the sign test's floor (None when this step tests no sum)."""
        if self.boundary == Boundary.NONE or self.rule.sign_threshold == 0:
            return None
        noises = self.grad_sq_sums if self.grad_sq_sums is not None else self.moments
        return [floor(noise, factor, p.dtype)
                for noise, factor, p in zip(noises, self.sign_test_factors, self.params)]


def floor(noise: Tensor, factor: float, param_dtype: torch.dtype) -> Tensor:
    """factor * noise in the pass's compute dtype: where grad_sum**2 exceeds it the sum's sign
    counts (the cpu op rounds the factor to that dtype and multiplies, as torch does here)."""
    return noise.to(state_dtype(param_dtype)) * factor


def _scaled(param: Tensor, before: Tensor, gain: Tensor) -> Tensor:
    compute = state_dtype(param.dtype)
    after, before, gain = param.to(compute), before.to(compute), gain.to(compute)
    return torch.where(gain == 1, after, before + gain * (after - before))


def reference(b: RescaleBucket) -> None:
    floors = b.floors()
    for i, param in enumerate(b.params):
        reference_backend.apply_boundary(b.boundary, b.gains[i], b.grad_sums[i], b.prev_signs[i],
                                         b.rule, None if floors is None else floors[i])
        param.copy_(_scaled(param, b.befores[i], b.gains[i]))
        g = b.grads[i].to(state_dtype(param.dtype))
        b.grad_sums[i].add_((-g if b.maximize else g).float())
        if b.grad_sq_sums is not None:
            if b.boundary != Boundary.NONE:
                b.grad_sq_sums[i].zero_()
            g32 = g.float()
            b.grad_sq_sums[i].add_(g32 * g32)  # not addcmul_: two roundings, as the cpu op


def foreach(b: RescaleBucket) -> None:
    if b.boundary != Boundary.NONE:
        foreach_backend.apply_boundary(b.boundary, b.gains, b.grad_sums, b.prev_signs, b.rule,
                                       b.floors())
    compute = state_dtype(b.params[0].dtype)
    after = [p.to(compute) for p in b.params]
    before = [t.to(compute) for t in b.befores]
    scaled = torch._foreach_sub(after, before)
    torch._foreach_mul_(scaled, [g.to(compute) for g in b.gains])
    torch._foreach_add_(scaled, before)
    # no foreach select: one where per tensor keeps the inner result exactly where the gain is 1
    torch._foreach_copy_(b.params, [torch.where(gain == 1, a, s)
                                    for gain, a, s in zip(b.gains, after, scaled)])
    grads = [g.float() for g in b.grads]
    if b.grad_sq_sums is not None:
        if b.boundary != Boundary.NONE:
            torch._foreach_zero_(b.grad_sq_sums)
        torch._foreach_add_(b.grad_sq_sums, torch._foreach_mul(grads, grads))
    if b.maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(b.grad_sums, grads)


def cpu(b: RescaleBucket) -> None:
    h = b.rule
    fused.run(torch.ops.adaptive_lr.active_rescale_.default, dict(
        params=b.params, befores=b.befores, grads=b.grads, gains=b.gains, grad_sums=b.grad_sums,
        prev_signs=b.prev_signs, grad_sq_sums=b.grad_sq_sums or [], moments=b.moments or [],
        sign_test_factors=b.sign_test_factors or [], gain_inc=h.gain_inc, gain_dec=h.gain_dec,
        min_gain=h.min_gain, max_gain=h.max_gain, sign_threshold=h.sign_threshold,
        relax_gains=h.relax_gains, maximize=b.maximize, boundary=int(b.boundary)))


# The pass each backend runs (every name of adaptive_lr.backends.NAMES)
PASSES = {"reference": reference, "foreach": foreach, "cpu": cpu, "cuda": foreach,
          "triton": foreach}


def resolve(name: str, device: torch.device):
    """The pass of the backend ``adaptive_lr.backends.choose(name, device)`` names ("auto"
    included; it raises for a backend that cannot run there). Meta tensors (shapes without
    values) get the foreach pass."""
    if torch.device(device).type == "meta":
        return foreach
    return PASSES[choose(name, device)]
