"""The examples of docs/integration.md: a plain loop, AMP, and the sign-window callbacks of
adaptive_lr.integrations under the real Hugging Face Trainer and Lightning, each run on a tiny
regression problem on CPU (no network, no hub: plain modules)."""

import math

import pytest
import torch

from doc_examples import example

EPOCHS = 3
BATCH = 8


def _data(n=64, offset=0.0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    return x, torch.sin(x.sum(1, keepdim=True)) + offset


def _loader(n=64, offset=0.0):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(n, offset)),
                                       batch_size=BATCH)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_plain_loop():
    losses = example("plain_loop")["train"](_net(), _loader(), EPOCHS)
    assert len(losses) == EPOCHS and losses[-1] < losses[0]


def test_amp_loop():
    opt = example("amp_loop")["train_amp"](_net(), _loader(), EPOCHS)
    assert opt.param_groups[0]["epoch"] == EPOCHS
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].item() > 0


# ---- the sign-window callbacks (adaptive_lr.integrations) under the real frameworks ---------
# 17 batches (an odd count: with accumulation 2 an epoch has ceil(17 / 2) = 9 optimizer steps, the
# last of one micro-batch) of a target whose offset keeps the gradients' signs for the first
# epochs: their sums pass the sign test and the gains grow once three windows have begun.
BATCHES = 17
OFFSET = 2.0
ACCUMULATION = 2
EPOCH_STEPS = math.ceil(BATCHES / ACCUMULATION)


def _gains_changed(opt) -> bool:
    return any(bool((opt.state[p]["gain"] != 1).any())
               for group in opt.param_groups for p in group["params"] if opt.state[p])


class _Regressor(torch.nn.Module):
    """A plain module with the forward signature Trainer expects (labels in, loss out)."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def _hf_args(tmp_path, **kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, logging_steps=1,
        use_cpu=True, report_to=[], disable_tqdm=True, **{"save_strategy": "no", **kwargs})


def _hf_dataset():
    x, y = _data(BATCHES * BATCH, OFFSET)
    return [{"x": a, "labels": b} for a, b in zip(x, y)]


def _hf_gain_watch():
    """A callback noting the first optimizer step after which a gain differs from 1."""
    from transformers import TrainerCallback

    class GainWatch(TrainerCallback):
        first_change = None

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if self.first_change is None and _gains_changed(optimizer.optimizer):
                self.first_change = state.global_step

    return GainWatch()


def test_hf_callback_sets_the_window_and_feeds_greedy_lr(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    args = _hf_args(tmp_path, num_train_epochs=3, gradient_accumulation_steps=ACCUMULATION)
    trainer = example("hf_trainer")["make_trainer"](_Regressor(), args, _hf_dataset())
    opt, greedy_lr = trainer.optimizer, trainer.lr_scheduler

    class RecordLr(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # after GreedyLR's step
            if "loss" in logs:
                lrs.append(opt.param_groups[0]["lr"])

    lrs = [opt.param_groups[0]["lr"]]
    watch = _hf_gain_watch()
    trainer.add_callback(RecordLr)
    trainer.add_callback(watch)
    trainer.train()
    assert opt.steps_per_epoch == EPOCH_STEPS  # optimizer steps, not micro-batches
    assert trainer.state.global_step == 3 * EPOCH_STEPS
    assert opt.param_groups[0]["epoch"] == 3  # the windows followed Trainer's epochs
    assert watch.first_change == 2 * EPOCH_STEPS + 1  # the first step of the third window
    # GreedyLR received every logged training loss, and nothing else
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert greedy_lr.last_epoch == len(logged) == trainer.state.global_step
    assert list(greedy_lr.window) == [entry["loss"] for entry in logged]
    # Trainer logs the lr each step used: the one GreedyLR set
    assert [entry["learning_rate"] for entry in logged] == lrs[:-1] and len(set(lrs)) > 1


def test_hf_resume_keeps_the_window(tmp_path):
    pytest.importorskip("transformers")
    make_trainer = example("hf_trainer")["make_trainer"]
    args = _hf_args(tmp_path, num_train_epochs=3, gradient_accumulation_steps=ACCUMULATION,
                    save_strategy="steps", save_steps=13)  # mid-way through the third window
    full = make_trainer(_Regressor(), args, _hf_dataset(), window=5)
    full_opt = full.optimizer
    full.train()
    resumed = make_trainer(_Regressor(), args, _hf_dataset(), window=5)
    opt = resumed.optimizer
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-13"))
    assert opt.steps_per_epoch == full_opt.steps_per_epoch == 5
    assert opt.param_groups[0]["epoch"] == full_opt.param_groups[0]["epoch"] == 27 // 5
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["gain"], full_opt.state[q]["gain"])
    assert _gains_changed(opt)


def test_hf_trainer_built_optimizer_gets_shorter_windows_within_one_epoch(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from adaptive_lr import ActiveAdamW
    from adaptive_lr.integrations.hf import ActiveLRCallback

    watch = _hf_gain_watch()
    trainer = Trainer(
        model=_Regressor(), args=_hf_args(tmp_path, num_train_epochs=1),
        train_dataset=_hf_dataset(),
        optimizer_cls_and_kwargs=(ActiveAdamW, {"lr": 1e-3, "steps_per_epoch": None}),
        callbacks=[ActiveLRCallback(windows_per_epoch=3), watch],
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, ActiveAdamW)
    assert trainer.optimizer.optimizer.steps_per_epoch == BATCHES // 3
    assert watch.first_change == 2 * (BATCHES // 3) + 1


@pytest.mark.parametrize("scheduler", ["Trainer's default", "GreedyLR, evaluating",
                                       "MultiplicativeLR, evaluating"])
def test_hf_greedy_lr_needs_a_schedule_that_keeps_its_lr(tmp_path, scheduler):
    pytest.importorskip("transformers")
    from torch.optim.lr_scheduler import MultiplicativeLR
    from transformers import Trainer

    from adaptive_lr import ActiveAdamW, GreedyLR
    from adaptive_lr.integrations.hf import ActiveLRCallback

    model, dataset = _Regressor(), _hf_dataset()
    opt = ActiveAdamW(model.parameters(), lr=1e-3, steps_per_epoch=None)
    greedy_lr = GreedyLR(opt, smooth=True, window_size=3 * BATCHES)
    evaluating = scheduler.endswith("evaluating")
    trainer = Trainer(
        model=model, train_dataset=dataset, eval_dataset=dataset[:BATCH] if evaluating else None,
        args=_hf_args(tmp_path, num_train_epochs=3, eval_strategy="epoch" if evaluating else "no"),
        optimizers=(opt, {"Trainer's default": None, "GreedyLR, evaluating": greedy_lr,
                          "MultiplicativeLR, evaluating": MultiplicativeLR(opt, lambda _: 1.0)}[scheduler]),
        callbacks=[ActiveLRCallback(greedy_lr=greedy_lr)],
    )
    if scheduler.startswith("MultiplicativeLR"):
        trainer.train()
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert list(greedy_lr.window) == logged  # the training losses only
        assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 3
        return
    match = ("would overwrite the lr GreedyLR sets" if scheduler == "Trainer's default"
             else "with the evaluation metric too")
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert opt.param_groups[0]["steps_in_epoch"] == 0  # refused before the first step


def test_hf_a_window_too_short_raises_before_training(tmp_path):
    pytest.importorskip("transformers")
    trainer = example("hf_trainer")["make_trainer"](
        _Regressor(), _hf_args(tmp_path, num_train_epochs=1), _hf_dataset(), window=4)
    opt = trainer.optimizer
    with pytest.raises(ValueError, match="too short for the sign test.*at least 5 steps"):
        trainer.train()
    assert opt.steps_per_epoch is None and opt.param_groups[0]["steps_in_epoch"] == 0


# lightning 2.6.6 itself calls a torch.utils._pytree API that torch 2.13 deprecates
_LIGHTNING_PYTREE = pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
_QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False)


@_LIGHTNING_PYTREE
def test_lightning_callback_sets_the_window_and_greedy_lr_steps_per_optimizer_step():
    pytest.importorskip("lightning")
    trainer = example("lightning")["fit"](_net(), _loader(BATCHES * BATCH, OFFSET), max_epochs=3,
                                          accumulate_grad_batches=ACCUMULATION, **_QUIET)
    (opt,), scheduler = trainer.optimizers, trainer.lr_scheduler_configs[0].scheduler
    assert opt.steps_per_epoch == EPOCH_STEPS  # optimizer steps, not micro-batches
    assert trainer.global_step == 3 * EPOCH_STEPS and opt.param_groups[0]["epoch"] == 3
    assert _gains_changed(opt)
    # GreedyLR got one logged loss per optimizer step
    assert scheduler.last_epoch == trainer.global_step
    assert scheduler.window[-1] == pytest.approx(trainer.callback_metrics["train_loss"].item())


@_LIGHTNING_PYTREE
def test_lightning_run_too_short_for_the_gains_to_change_warns():
    pytest.importorskip("lightning")
    with pytest.warns(UserWarning, match=rf"third window \(step {2 * EPOCH_STEPS + 1}\)"):
        trainer = example("lightning")["fit"](
            _net(), _loader(BATCHES * BATCH, OFFSET), max_epochs=2,
            accumulate_grad_batches=ACCUMULATION, **_QUIET)
    (opt,) = trainer.optimizers
    assert trainer.global_step == 2 * EPOCH_STEPS and not _gains_changed(opt)


@_LIGHTNING_PYTREE
def test_lightning_windows_per_epoch_change_the_gains_within_one_epoch():
    pytest.importorskip("lightning")
    trainer = example("lightning")["fit"](_net(), _loader(BATCHES * BATCH, OFFSET),
                                          windows_per_epoch=3, max_epochs=1, **_QUIET)
    (opt,) = trainer.optimizers
    assert opt.steps_per_epoch == BATCHES // 3 and _gains_changed(opt)


@_LIGHTNING_PYTREE
def test_lightning_manual_optimization_needs_a_window():
    lightning = pytest.importorskip("lightning")
    from adaptive_lr.integrations.lightning import ActiveLRCallback

    class Manual(example("lightning")["Regressor"]):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False

        def configure_optimizers(self):  # (a scheduler would be left to training_step)
            return super().configure_optimizers()["optimizer"]

    trainer = lightning.Trainer(max_epochs=1, callbacks=[ActiveLRCallback()], **_QUIET)
    with pytest.raises(ValueError, match="manual optimization.*pass window="):
        trainer.fit(Manual(_net()), _loader())
