"""A Hugging Face ``transformers.Trainer`` callback: sets the Active optimizer's window from the
training data and ``gradient_accumulation_steps`` at train start, and feeds ``GreedyLR`` the
logged training loss (docs/integration.md, "Hugging Face Trainer")."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import MultiplicativeLR
from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from ..greedy_lr import GreedyLR
from . import check_window_args, set_window


class ActiveLRCallback(TrainerCallback):
    """Sets the window (``steps_per_epoch``) of ``Trainer``'s Active optimizer at train start.

    Args:
        window: the window in optimizer steps.
        windows_per_epoch: else, the data epoch's optimizer steps (``ceil(len(train_dataloader)
            / gradient_accumulation_steps)``, as ``Trainer`` counts them) split into this many
            windows; neither: ``adaptive_lr.integrations.DEFAULT_WINDOWS_PER_EPOCH``.
        greedy_lr: a :class:`adaptive_lr.GreedyLR` to step with every logged training loss (the
            mean over ``logging_steps`` optimizer steps: set ``logging_steps=1`` to step it once
            per optimizer step). Give it to ``Trainer`` as its scheduler as well,
            ``optimizers=(optimizer, greedy_lr)``: ``Trainer`` then leaves it to this callback,
            and logs the lr it sets.
    """

    def __init__(self, window: int | None = None, windows_per_epoch: int | None = None,
                 greedy_lr: GreedyLR | None = None):
        check_window_args(window, windows_per_epoch)
        self.window = window
        self.windows_per_epoch = windows_per_epoch
        self.greedy_lr = greedy_lr

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        if self.greedy_lr is not None:
            self._check_scheduler(args, lr_scheduler)
        epoch_steps = (math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
                       if has_length(train_dataloader) else None)
        set_window([optimizer], window=self.window, windows_per_epoch=self.windows_per_epoch,
                   epoch_steps=epoch_steps, total_steps=state.max_steps)

    def _check_scheduler(self, args, lr_scheduler) -> None:
        if lr_scheduler is self.greedy_lr:
            # Trainer steps a plateau scheduler (GreedyLR is one) with metric_for_best_model
            # after each evaluation: another metric among the training losses
            if args.eval_strategy != "no":
                raise ValueError(
                    "with evaluation during training, Trainer would step its scheduler GreedyLR "
                    "with the evaluation metric too: give Trainer MultiplicativeLR(optimizer, "
                    "lambda _: 1.0) as its scheduler instead (it keeps the lr GreedyLR sets)")
        # any other schedule (Trainer's default decays linearly) overwrites GreedyLR's lr at
        # every step; MultiplicativeLR scales it instead
        elif not isinstance(lr_scheduler, MultiplicativeLR):
            raise ValueError(
                f"Trainer's lr scheduler {type(lr_scheduler).__name__} would overwrite the lr "
                "GreedyLR sets: give Trainer the GreedyLR as its scheduler, "
                "optimizers=(optimizer, greedy_lr)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.greedy_lr is not None and "loss" in logs:  # a training log (eval logs eval_loss)
            self.greedy_lr.step(logs["loss"])
