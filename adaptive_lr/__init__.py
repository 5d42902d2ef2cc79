"""ActiveLR optimizers (per-element learning-rate gains driven by epoch-gradient signs) and the
GreedyLR scheduler for PyTorch, with fused CPU kernels."""

from .backends import available_backends
from .greedy_lr import GreedyLR
from .optim import Active, ActiveAdaBelief, ActiveAdamW, ActiveRAdam, ActiveSGD

__all__ = [
    "Active", "ActiveAdaBelief", "ActiveAdamW", "ActiveRAdam", "ActiveSGD", "GreedyLR",
    "available_backends",
]
__version__ = "0.1.0"
