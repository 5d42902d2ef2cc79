from .base import ActiveOptimizer
from .spec import OptimizerSpec

__all__ = ["ActiveOptimizer", "OptimizerSpec"]
