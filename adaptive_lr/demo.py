"""A short real training run on scikit-learn's bundled handwritten digits, at a learning rate far
too small (an MLP at lr 1e-4) and at one too large (a CNN at lr 0.1, with AdamW and with SGD with
momentum, SGD's most common setting): the base optimizer, its Active version with the ActiveLR
paper's rule, and its Active version at this library's defaults, side by side; then a quick
step-time table (the full one: `adaptive-lr bench`)."""

from __future__ import annotations

import argparse
import functools

import torch

from adaptive_lr import benchmark
from adaptive_lr.study.digits import load_digits, train
from adaptive_lr.study.options import positive_float, positive_int, seed

QUICK_EPOCHS = 10
# the step-time table the demo prints: small sizes, four tensors, float32, a few rounds
BENCH_ARGS = ["--layouts", "4", "--dtypes", "float32", "--rounds", "3", "--steps-per-round", "3"]
# the paper's rule: no sign test (docs/algorithm.md, "The sign test")
PAPER_RULE = dict(sign_threshold=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=positive_float, default=1e-4,
                        help="the too-small learning rate, for the MLP (default 1e-4)")
    parser.add_argument("--large-lr", type=positive_float, default=0.1,
                        help="the too-large learning rate, for the CNN (default 0.1)")
    parser.add_argument("--epochs", type=positive_int, default=30,
                        help=f"training epochs (default 30; {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--seed", type=seed, default=0, help="weights, batch order and split")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} epochs and a step-time table at 1M elements only")


def _optimizers(name: str, lr: float) -> list:
    """The base optimizer ``name`` (AdamW, or SGD with momentum 0.9), its Active version with the
    paper's rule and at the defaults: ``make(params, steps_per_epoch)`` each."""
    from adaptive_lr import ActiveAdamW, ActiveSGD

    base, active = {"AdamW": (torch.optim.AdamW, ActiveAdamW),
                    "SGD": (functools.partial(torch.optim.SGD, momentum=0.9), ActiveSGD)}[name]
    return [lambda params, spe: base(params, lr=lr),
            lambda params, spe: active(params, lr=lr, steps_per_epoch=spe, **PAPER_RULE),
            lambda params, spe: active(params, lr=lr, steps_per_epoch=spe)]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    data = load_digits(args.seed)
    print(f"digits, {len(data.x_train)} train / {len(data.x_test)} test images, {epochs} epochs, "
          f"batch {args.batch_size}, seed {args.seed}; final test accuracy (train loss)")
    cases = (("MLP", "mlp", "AdamW", args.lr, "too small"),
             ("CNN", "cnn", "AdamW", args.large_lr, "too large"),
             ("CNN", "cnn", "SGD", args.large_lr, "too large"))
    print(f"{'':<34}" + "".join(f"{name:>26}" for name in ("base optimizer", "Active, paper's rule",
                                                            "Active, defaults")))
    for label, model, optimizer, lr, how in cases:
        cells = []
        for make in _optimizers(optimizer, lr):
            h = train(model, make, data, epochs, args.batch_size, args.seed)
            cells.append(f"{h['test_accuracy'][-1]:.2%} ({h['train_loss'][-1]:.3g})")
        print(f"{f'{label} {optimizer}, lr {lr:g} ({how})':<34}" + "".join(f"{c:>26}"
                                                                        for c in cells))
    sizes = ["1M"] if args.quick else ["1M", "10M"]
    print("\nStep time (quick run; the full table: adaptive-lr bench):")
    benchmark.main(["--sizes", *sizes, *BENCH_ARGS])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
