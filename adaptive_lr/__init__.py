"""ActiveLR optimizers (per-element learning-rate gains driven by epoch-gradient signs) and the
GreedyLR scheduler for PyTorch, with fused CPU kernels."""

from .backends import available_backends
from .greedy_lr import GreedyLR
from .optim.adabelief import ActiveAdaBelief
from .optim.adam import ActiveAdam
from .optim.adamw import ActiveAdamW
from .optim.lion import ActiveLion
from .optim.radam import ActiveRAdam
from .optim.sgd import ActiveSGD
from .optim.wrapper import Active

__all__ = [
    "Active", "ActiveAdaBelief", "ActiveAdam", "ActiveAdamW", "ActiveLion", "ActiveRAdam",
    "ActiveSGD", "GreedyLR", "available_backends",
]
__version__ = "0.1.0"
