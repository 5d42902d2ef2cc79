"""Triton multi-tensor kernels of adaptive_lr (imported as adaptive_lr.kernels)."""

from .launch import active_step, clear_plan_cache, plan_cache_info

__all__ = ["active_step", "clear_plan_cache", "plan_cache_info"]
