"""Per-tensor scalars of one step, computed once on the host from the tensor's step count."""

from __future__ import annotations

import math

# RAdam's variance rectification applies only once the SMA length exceeds this.
RECTIFY_THRESHOLD = 5.0


def bias_corrections(betas: tuple[float, float], step: float) -> tuple[float, float]:
    beta1, beta2 = betas
    return 1 - beta1**step, 1 - beta2**step


def radam_rectification(beta2: float, step: float) -> float | None:
    """RAdam's r_t, or None while rho_t <= 5 (the un-adapted, momentum-only update)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
    if rho_t <= RECTIFY_THRESHOLD:
        return None
    return math.sqrt(
        (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    )
