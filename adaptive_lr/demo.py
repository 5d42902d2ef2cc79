"""A short real training run: an MLP on scikit-learn's bundled handwritten digits, trained with
AdamW and with ActiveAdamW at a learning rate far too small for AdamW, side by side."""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def load_digits(seed: int = 0):
    """scikit-learn's 8x8 digits (shipped with the package, no download), standardised, 75/25 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=seed, stratify=data.target
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda x: torch.tensor((x - mean) / std, dtype=torch.float32)  # noqa: E731
    as_y = lambda y: torch.tensor(y, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(make_optimizer, data, epochs: int, batch_size: int, seed: int) -> dict:
    """Train a fresh MLP; returns final train loss, test accuracy and seconds."""
    x_train, y_train, x_test, y_test = data
    model = mlp(seed)
    steps_per_epoch = -(-len(x_train) // batch_size)
    optimizer = make_optimizer(model.parameters(), steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(x_train), generator=order).split(batch_size):
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"train_loss": total / len(x_train), "test_accuracy": accuracy, "seconds": seconds}


def main(argv=None) -> None:
    from adaptive_lr import ActiveAdamW

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate for both (1e-4)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    data = load_digits(args.seed)
    runs = {
        "AdamW": lambda params, spe: torch.optim.AdamW(params, lr=args.lr),
        "ActiveAdamW": lambda params, spe: ActiveAdamW(params, lr=args.lr, steps_per_epoch=spe),
    }
    print(f"digits MLP, {len(data[0])} train / {len(data[2])} test images, "
          f"lr={args.lr:g}, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}")
    print(f"{'optimizer':<12} {'train loss':>10} {'test acc':>9} {'seconds':>8}")
    for name, make in runs.items():
        r = train(make, data, args.epochs, args.batch_size, args.seed)
        print(f"{name:<12} {r['train_loss']:>10.4f} {r['test_accuracy']:>9.2%} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
