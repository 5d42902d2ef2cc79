"""A short real training run: an MLP on scikit-learn's bundled handwritten digits, trained with
AdamW and with ActiveAdamW at a learning rate far too small for AdamW, side by side; then a quick
step-time table (the full one: `adaptive-lr bench`)."""

from __future__ import annotations

import argparse

import torch

from adaptive_lr import benchmark
from adaptive_lr.study.digits import load_digits, train
from adaptive_lr.study.options import positive_float, positive_int

QUICK_EPOCHS = 10
# the step-time table the demo prints: small sizes, four tensors, float32, a few rounds
BENCH_ARGS = ["--layouts", "4", "--dtypes", "float32", "--rounds", "3", "--steps-per-round", "3"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=positive_float, default=1e-4,
                        help="learning rate for both optimizers (default 1e-4)")
    parser.add_argument("--epochs", type=positive_int, default=30,
                        help=f"training epochs (default 30; {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="weights, batch order and split")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} epochs and a step-time table at 1M elements only")


def run(args: argparse.Namespace) -> None:
    from adaptive_lr import ActiveAdamW

    torch.set_num_threads(min(2, torch.get_num_threads()))
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    data = load_digits(args.seed)
    runs = {
        "AdamW": lambda params, spe: torch.optim.AdamW(params, lr=args.lr),
        "ActiveAdamW": lambda params, spe: ActiveAdamW(params, lr=args.lr, steps_per_epoch=spe),
    }
    print(f"digits MLP, {len(data.x_train)} train / {len(data.x_test)} test images, "
          f"lr={args.lr:g}, {epochs} epochs, batch {args.batch_size}, seed {args.seed}")
    print(f"{'optimizer':<12} {'train loss':>10} {'test acc':>9} {'seconds':>8}")
    for name, make in runs.items():
        h = train("mlp", make, data, epochs, args.batch_size, args.seed)
        print(f"{name:<12} {h['train_loss'][-1]:>10.4f} {h['test_accuracy'][-1]:>9.2%} "
              f"{h['seconds']:>8.1f}")
    sizes = ["1M"] if args.quick else ["1M", "10M"]
    print("\nStep time (quick run; the full table: adaptive-lr bench):")
    benchmark.main(["--sizes", *sizes, *BENCH_ARGS])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
