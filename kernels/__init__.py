"""Triton multi-tensor kernels of adaptive_lr (imported as adaptive_lr.kernels)."""

from .active_step import ROWS
from .launch import active_step, clear_plan_cache, plan_cache_info
from .updates import UPDATES

__all__ = ["ROWS", "UPDATES", "active_step", "clear_plan_cache", "plan_cache_info"]
