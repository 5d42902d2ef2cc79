"""Training-quality studies behind `adaptive-lr sweep`: the LR-robustness sweep of the Active
optimizers (lr_sweep) and the GreedyLR scheduler study (greedy)."""
