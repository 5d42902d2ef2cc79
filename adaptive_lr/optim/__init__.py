from .adabelief import ActiveAdaBelief
from .adamw import ActiveAdamW
from .base import ActiveOptimizer
from .radam import ActiveRAdam
from .sgd import ActiveSGD

__all__ = ["ActiveAdaBelief", "ActiveAdamW", "ActiveOptimizer", "ActiveRAdam", "ActiveSGD"]
