"""scikit-learn's 8x8 handwritten digits (shipped with the package, no download), the two models
trained on them, and the training loop shared by the demo and the studies."""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, NamedTuple

import torch
from torch import nn


class Digits(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=4)
def load_digits(split_seed: int = 0) -> Digits:
    """1347 train / 450 test images as 64 standardised features, a stratified 75/25 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=split_seed, stratify=data.target
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda x: torch.tensor((x - mean) / std, dtype=torch.float32)  # noqa: E731
    as_y = lambda y: torch.tensor(y, dtype=torch.long)  # noqa: E731
    return Digits(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    """Two 3x3 convolutions on the 1x8x8 image, one 2x2 pooling, a linear classifier."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn}


def r2_score(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - SSE / SST on the test targets, floored at 0 (no better than predicting their mean) and
    0 for a diverged (non-finite) prediction, so that it reads as an accuracy in [0, 1]."""
    residual = ((predicted - target) ** 2).sum().item()
    score = 1 - residual / ((target - target.mean()) ** 2).sum().item()
    return max(score, 0.0) if math.isfinite(score) else 0.0


def steps_per_epoch(data: Digits, batch_size: int) -> int:
    return -(-len(data.x_train) // batch_size)


def train(model: str | Callable[[], nn.Module], make_optimizer, data: Digits, epochs: int,
          batch_size: int, seed: int, dtype: torch.dtype = torch.float32,
          on_epoch_end: Callable[[torch.optim.Optimizer], None] | None = None) -> dict:
    """Train a fresh model (a name in MODELS, or a function that builds one), its weights and
    float inputs in ``dtype``; ``make_optimizer(params, steps_per_epoch)`` builds the optimizer.
    ``data`` is any Digits-shaped tuple: class labels ``y`` of the inputs' batch shape, or of the
    batch shape plus a sequence dimension (a model that classifies every token: loss and accuracy
    are then per token), or float targets ``y`` of the model's output shape (regression: MSE loss,
    and ``test_accuracy`` is the test R² floored at 0, see ``r2_score``). ``on_epoch_end(optimizer)`` runs after each epoch's last step.

    The seed fixes both the initial weights and the mini-batch order, so every optimizer trained
    with one seed starts from the same weights and sees the same batches. An optimizer with
    ``train()`` / ``eval()`` methods (Schedule-Free) is switched to eval mode for each
    evaluation and back. Returns per-epoch ``train_loss`` (mean over the epoch's batches),
    ``test_loss`` and ``test_accuracy`` lists, and ``seconds``.
    """
    torch.manual_seed(seed)
    model = (MODELS[model] if isinstance(model, str) else model)().to(dtype)
    optimizer = make_optimizer(model.parameters(), steps_per_epoch(data, batch_size))
    modes = getattr(optimizer, "train", None), getattr(optimizer, "eval", None)
    as_input = lambda x: x.to(dtype) if x.is_floating_point() else x  # noqa: E731  (tokens stay)
    order = torch.Generator().manual_seed(seed)
    regression = data.y_train.is_floating_point()
    # BatchNorm evaluates with its running statistics, as in any real evaluation (the test set's
    # own batch statistics would depend on the whole test batch); the other models are evaluated
    # in training mode, as they always were (eval mode would put the transformer on its fused
    # inference kernels and change the recorded numbers)
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    loss_fn = nn.MSELoss() if regression else nn.CrossEntropyLoss()
    history = {"train_loss": [], "test_loss": [], "test_accuracy": []}
    start = time.perf_counter()
    for _ in range(epochs):
        if modes[0] is not None:
            modes[0]()
        model.train()
        total = 0.0
        for batch in torch.randperm(len(data.x_train), generator=order).split(batch_size):
            out = model(as_input(data.x_train[batch]))
            if regression:
                loss = loss_fn(out.float(), data.y_train[batch])
            else:
                loss = loss_fn(out.reshape(-1, out.shape[-1]), data.y_train[batch].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if on_epoch_end is not None:
            on_epoch_end(optimizer)
        if modes[1] is not None:
            modes[1]()
        model.train(not batch_norm)
        with torch.no_grad():
            out = model(as_input(data.x_test))
            if regression:
                accuracy = r2_score(out.float(), data.y_test)
                test_loss = loss_fn(out.float(), data.y_test)
            else:
                accuracy = (out.argmax(-1) == data.y_test).float().mean().item()
                test_loss = loss_fn(out.reshape(-1, out.shape[-1]), data.y_test.reshape(-1))
        history["train_loss"].append(total / len(data.x_train))
        history["test_loss"].append(test_loss.item())
        history["test_accuracy"].append(accuracy)
    history["seconds"] = time.perf_counter() - start
    return history
