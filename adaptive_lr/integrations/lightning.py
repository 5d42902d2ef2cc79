"""A Lightning callback: sets the Active optimizers' window from the training data and
``accumulate_grad_batches`` at train start (docs/integration.md, "Lightning"). ``GreedyLR`` needs
no callback there: Lightning steps it, a plateau scheduler by type, with the monitored loss."""

from __future__ import annotations

import math

from lightning.pytorch import Callback

from . import check_window_args, set_window


class ActiveLRCallback(Callback):
    """Sets the window (``steps_per_epoch``) of the LightningModule's Active optimizers at train
    start.

    Args:
        window: the window in optimizer steps (required under manual optimization, where the
            module steps its optimizers as it likes).
        windows_per_epoch: else, the data epoch's optimizer steps (``ceil(num_training_batches /
            accumulate_grad_batches)``: Lightning also steps on an epoch's last batch) split into
            this many windows; neither: ``adaptive_lr.integrations.DEFAULT_WINDOWS_PER_EPOCH``.
    """

    def __init__(self, window: int | None = None, windows_per_epoch: int | None = None):
        check_window_args(window, windows_per_epoch)
        self.window = window
        self.windows_per_epoch = windows_per_epoch

    def on_train_start(self, trainer, pl_module):
        epoch_steps = total_steps = None
        if pl_module.automatic_optimization:
            if trainer.num_training_batches != math.inf:  # else a stream
                epoch_steps = math.ceil(
                    trainer.num_training_batches / trainer.accumulate_grad_batches)
            total = trainer.estimated_stepping_batches  # inf; or a stream's max_steps, -1: none
            total_steps = total if total > 0 else None
        set_window(trainer.optimizers, window=self.window,
                   windows_per_epoch=self.windows_per_epoch, epoch_steps=epoch_steps,
                   total_steps=total_steps)
