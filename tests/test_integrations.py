"""The examples of docs/integration.md: a plain loop, AMP, Hugging Face Trainer and Lightning,
each run on a tiny regression problem on CPU (no network, no hub: plain modules)."""

import pytest
import torch

from doc_examples import example

EPOCHS = 3
BATCH = 8


def _data(n=64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    return x, torch.sin(x.sum(1, keepdim=True))


def _loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH)


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


class _Regressor(torch.nn.Module):
    """A plain module with the forward signature Trainer expects (labels in, loss out)."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_trainer_feeds_greedy_lr_the_training_loss(tmp_path, accumulation):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback, TrainingArguments

    from adaptive_lr import ActiveAdamW

    trainer_cls = example("hf_trainer")["GreedyLRTrainer"]
    x, y = _data()
    model = _Regressor()
    steps_per_epoch = len(x) // BATCH // accumulation
    opt = ActiveAdamW(model.parameters(), lr=torch.tensor(1e-2), steps_per_epoch=steps_per_epoch)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
        gradient_accumulation_steps=accumulation, logging_steps=1, use_cpu=True, report_to="none",
        save_strategy="no", disable_tqdm=True,
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)],
        optimizers=(opt, None), greedy_lr_kwargs=dict(patience=1, factor=0.5),
    )

    class RecordLr(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after GreedyLR's step
            lrs.append(opt.param_groups[0]["lr"].item())

    lrs = [opt.param_groups[0]["lr"].item()]
    trainer.add_callback(RecordLr)
    trainer.train()
    assert trainer.state.global_step == EPOCHS * steps_per_epoch
    assert opt.param_groups[0]["epoch"] == EPOCHS  # the epoch clock followed Trainer's epochs
    assert trainer.greedy_lr.last_epoch == trainer.state.global_step  # one metric per step
    # Trainer logs the lr each step used: GreedyLR's, which Trainer's ×1 schedule kept
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == lrs[:-1] and len(set(logged)) > 1


# lightning 2.6.6 itself calls a torch.utils._pytree API that torch 2.13 deprecates
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
def test_lightning_monitors_train_loss():
    lightning = pytest.importorskip("lightning")

    regressor_cls = example("lightning")["Regressor"]
    loader = _loader()
    trainer = lightning.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(regressor_cls(_net(), len(loader)), loader)
    (opt,), scheduler = trainer.optimizers, trainer.lr_scheduler_configs[0].scheduler
    assert opt.param_groups[0]["epoch"] == EPOCHS
    assert scheduler.last_epoch == trainer.global_step == EPOCHS * len(loader)
    # the smoothing window holds the last logged losses: the metric reached GreedyLR
    assert len(scheduler.window) == scheduler.window_size
    assert scheduler.window[-1] == pytest.approx(trainer.callback_metrics["train_loss"].item())
