from .adabelief import ActiveAdaBelief
from .adamw import ActiveAdamW
from .base import ActiveOptimizer
from .radam import ActiveRAdam
from .sgd import ActiveSGD
from .wrapper import Active

__all__ = [
    "Active", "ActiveAdaBelief", "ActiveAdamW", "ActiveOptimizer", "ActiveRAdam", "ActiveSGD",
]
