"""The measurements behind docs/precision.md:

1. how far an exponential moving average kept in float32, bfloat16 or float16 (math in float32,
   rounded to the state dtype once per step, as the kernels would) gets towards a new target,
   and how often an epoch's gradient sum kept in bfloat16 ends with the wrong sign: why
   optimizer state stays float32 for low-precision params;
2. the digits MLP trained with ActiveAdamW and AdamW, float32 params vs bfloat16 params (the
   model and its inputs in bfloat16), a few seeds: final train loss and test accuracy, mean ± sd.
   torch's AdamW keeps its state in the param dtype; "AdamW, fp32 state" is AdamW with float32
   state for any param dtype: ActiveAdamW with its gains frozen at 1 (gain_inc=0, gain_dec=1);
3. ActiveSGD's and ActiveLion's momentum in bfloat16 (state_precision="bfloat16", rounded
   stochastically) against their float32 momentum (compact state), bfloat16 params, the digits MLP
   and CNN, seed by seed.

    .venv/bin/python bench/precision.py [--tables ...] [--seeds 3] [--epochs 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys

import torch

from adaptive_lr import ActiveAdamW, ActiveLion, ActiveSGD
from adaptive_lr.backends.rounding import bfloat16_stochastic, element_index, rounding_key
from adaptive_lr.study.digits import load_digits, train
from adaptive_lr.study.runner import describe, mean_sd, run_tasks

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (beta, from, to): a second moment (beta2) whose gradient scale changes 4x, 1.7x, 1.25x down or
# up, and a first moment (beta1) moving 2x and 1%
EMA_CASES = [(0.999, 1.0, 4.0), (0.999, 1.0, 0.25), (0.999, 1.0, 0.6), (0.999, 1.0, 1.25),
             (0.9, 1.0, 0.5), (0.9, 1.0, 0.99)]
EMA_STEPS = 20_000


def ema(beta: float, start: float, target: float, dtype: torch.dtype, steps: int) -> float:
    """``v <- beta * v + (1 - beta) * target`` from ``start``, v stored in ``dtype``."""
    v = torch.tensor(start, dtype=dtype)
    for _ in range(steps):
        v = (v.float() * beta + (1 - beta) * target).to(dtype)
    return v.item()


def ema_stochastic(beta: float, start: float, target: float, steps: int,
                   elements: int = 1024) -> float:
    """As ``ema`` in bfloat16, rounded stochastically as state_precision="bfloat16" rounds a
    moment: the mean over ``elements`` elements (each a random walk around the float32 value)."""
    v = torch.full((elements,), start, dtype=torch.bfloat16)
    index = element_index(v)
    for step in range(1, steps + 1):
        v = bfloat16_stochastic(v.float() * beta + (1 - beta) * target, rounding_key(0, step), index)
    return v.float().mean().item()


def print_ema_table() -> None:
    print(f"EMA after {EMA_STEPS} steps, state stored in each dtype (math in float32; the last "
          "column: bfloat16 rounded stochastically, the mean of 1024 elements):")
    print(f"| beta | from | to | {' | '.join(STATE_DTYPES)} | bfloat16, stochastic |")
    print("|---|---|---|" + "---|" * (len(STATE_DTYPES) + 1))
    for beta, start, target in EMA_CASES:
        values = " | ".join(f"{ema(beta, start, target, dtype, EMA_STEPS):.4g}"
                            for dtype in STATE_DTYPES.values())
        stochastic = ema_stochastic(beta, start, target, EMA_STEPS)
        print(f"| {beta} | {start} | {target} | {values} | {stochastic:.4g} |")


OPTIMIZERS = ("AdamW", "AdamW, fp32 state", "ActiveAdamW")


def gradient_workloads(steps: int = 1000, elements: int = 20_000) -> dict[str, torch.Tensor]:
    """Epochs of ``steps`` gradients for ``elements`` elements: noise around a small drift, and a
    drift that reverses after the first tenth of the epoch (the later steps are small next to
    the sum they join: rounded to nearest, they are lost)."""
    gen = torch.Generator().manual_seed(0)
    noise = 0.02 + torch.randn(steps, elements, generator=gen)
    early = steps // 10
    reversal = 0.01 * torch.randn(steps, elements, generator=gen)
    reversal[:early] += 1.0
    reversal[early:] -= 0.2
    return {"N(0.02, 1)": noise, "N(1, 0.01) for 100 steps, then N(-0.2, 0.01)": reversal}


def grad_sum_sign_errors(grads: torch.Tensor, dtype: torch.dtype, stochastic: bool = False
                         ) -> tuple[float, float]:
    """For each element's sum of ``grads`` accumulated in ``dtype`` (float32 math, one rounding
    per step: to nearest, or ``stochastic`` as compact state rounds its bfloat16 grad_sum), the
    fraction of elements whose sum has another sign than the float64 sum, and that fraction
    weighted by |float64 sum|."""
    total = torch.zeros(grads.shape[1], dtype=dtype)
    index = element_index(total)
    for step, g in enumerate(grads, 1):
        total = (bfloat16_stochastic(total.float() + g, rounding_key(0, step), index)
                 if stochastic else (total.float() + g).to(dtype))
    exact = grads.double().sum(0)
    wrong = torch.sign(total.double()) != torch.sign(exact)
    return wrong.double().mean().item(), (exact.abs() * wrong).sum().item() / exact.abs().sum().item()


def print_grad_sum_table() -> None:
    print("\nEpoch gradient sums of 1000 steps, share of elements with the wrong sign "
          "(unweighted; weighted by |sum|):")
    cases = [(name, dtype, False) for name, dtype in STATE_DTYPES.items()]
    cases.append(("bfloat16, stochastic rounding", torch.bfloat16, True))
    for workload, grads in gradient_workloads().items():
        print(f"  gradients {workload}:")
        for name, dtype, stochastic in cases:
            share, weighted = grad_sum_sign_errors(grads, dtype, stochastic)
            print(f"    {name}: {share:.2%}; {weighted:.3%}")


def optimizer_factory(name: str, lr: float):
    if name == "AdamW":
        return lambda params, steps_per_epoch: torch.optim.AdamW(params, lr=lr)
    frozen = dict(gain_inc=0.0, gain_dec=1.0) if name == "AdamW, fp32 state" else {}
    return lambda params, steps_per_epoch: ActiveAdamW(
        params, lr=lr, steps_per_epoch=steps_per_epoch, **frozen)


def train_one(task: dict) -> dict:
    history = train("mlp", optimizer_factory(task["optimizer"], task["lr"]), load_digits(0),
                    task["epochs"], 64, task["seed"], PARAM_DTYPES[task["params"]])
    return dict(task, train_loss=history["train_loss"][-1],
                test_accuracy=history["test_accuracy"][-1])


def _rows(function, tasks: list[dict], workers: int, name: str) -> list[dict]:
    """Every task's result row; exits if any run failed or was interrupted."""
    outcome = run_tasks(function, tasks, workers, name)
    if outcome.failed or outcome.interrupted:
        sys.exit(f"{name}: {describe(outcome.status())}; no table")
    return outcome.rows


def print_training_table(seeds: int, epochs: int, lrs: list[float], workers: int) -> None:
    tasks = [dict(optimizer=optimizer, params=params, lr=lr, seed=seed, epochs=epochs)
             for lr in lrs for optimizer in OPTIMIZERS for params in PARAM_DTYPES
             for seed in range(seeds)]
    results = _rows(train_one, tasks, workers, "digits MLP")
    print(f"\ndigits MLP, {epochs} epochs, batch 64, seeds 0-{seeds - 1}: mean ± sd")
    print("| lr | optimizer | params | final train loss | final test accuracy |")
    print("|---|---|---|---|---|")
    for lr in lrs:
        for optimizer in OPTIMIZERS:
            for params in PARAM_DTYPES:
                runs = [r for r in results
                        if (r["lr"], r["optimizer"], r["params"]) == (lr, optimizer, params)]
                loss = mean_sd(r["train_loss"] for r in runs)
                accuracy = mean_sd(100 * r["test_accuracy"] for r in runs)
                print(f"| {lr:g} | {optimizer} | {params} | {loss[0]:.4f} ± {loss[1]:.4f} | "
                      f"{accuracy[0]:.2f} ± {accuracy[1]:.2f} % |")


# pair -> (its base optimizer, whose bfloat16 momentum rounds to nearest; its Active optimizer; the
# lrs: the base's tuned lr on the digits and 10x, 100x below it). The Active optimizer runs at its
# defaults with its momentum in float32 (compact state, the default) and in bfloat16
# (state_precision="bfloat16"); bfloat16 params.
def _lion(params, lr):
    from lion_pytorch import Lion

    return Lion(params, lr=lr)


MOMENTUM_PAIRS = {
    "SGD": (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9), ActiveSGD,
            (0.1, 0.01, 1e-3)),
    "Lion": (_lion, ActiveLion, (1e-3, 1e-4, 1e-5)),
}
MOMENTUM_VARIANTS = ("base", "compact", "bfloat16")
MOMENTUM_MODELS = ("mlp", "cnn")


def train_momentum(task: dict) -> dict:
    base, active, _ = MOMENTUM_PAIRS[task["pair"]]

    def make(params, steps_per_epoch):
        if task["variant"] == "base":
            return base(params, task["lr"])
        return active(params, lr=task["lr"], steps_per_epoch=steps_per_epoch,
                      state_precision=task["variant"])

    history = train(task["model"], make, load_digits(0), task["epochs"], 64, task["seed"],
                    torch.bfloat16)
    return dict(task, train_loss=history["train_loss"][-1],
                test_accuracy=history["test_accuracy"][-1])


def print_momentum_table(seeds: int, epochs: int, workers: int) -> None:
    tasks = [dict(pair=pair, model=model, variant=variant, lr=lr, seed=seed, epochs=epochs)
             for pair, (_, _, lrs) in MOMENTUM_PAIRS.items() for model in MOMENTUM_MODELS
             for lr in lrs for variant in MOMENTUM_VARIANTS for seed in range(seeds)]
    rows = _rows(train_momentum, tasks, workers, "bfloat16 momentum")
    cell = {(r["pair"], r["model"], r["lr"], r["variant"], r["seed"]): r for r in rows}
    print(f"\nbfloat16 params, {epochs} epochs, batch 64, seeds 0-{seeds - 1}: final test "
          "accuracy, %, mean ± sd (final train loss); the last column: bfloat16 momentum minus "
          "float32 momentum, seed by seed, mean ± standard error")
    print("| pair | model | lr | base (bf16 momentum, nearest) | Active, float32 momentum "
          "| Active, bfloat16 momentum | difference |")
    print("|---|---|---|---|---|---|---|")
    for pair, (_, _, lrs) in MOMENTUM_PAIRS.items():
        for model in MOMENTUM_MODELS:
            for lr in lrs:
                runs = {v: [cell[pair, model, lr, v, s] for s in range(seeds)]
                        for v in MOMENTUM_VARIANTS}
                cells = []
                for variant in MOMENTUM_VARIANTS:
                    acc = mean_sd(100 * r["test_accuracy"] for r in runs[variant])
                    train_loss = mean_sd(r["train_loss"] for r in runs[variant])
                    cells.append(f"{acc[0]:.2f} ± {acc[1]:.2f} ({train_loss[0]:.3g})")
                diff = mean_sd(100 * (b["test_accuracy"] - c["test_accuracy"])
                               for b, c in zip(runs["bfloat16"], runs["compact"]))
                cells.append(f"{diff[0]:+.2f} ± {diff[1] / seeds**0.5:.2f}")
                print(f"| {pair} | {model} | {lr:g} | {' | '.join(cells)} |")


TABLES = ("ema", "grad_sum", "training", "momentum")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    args = parser.parse_args(argv)
    if "ema" in args.tables:
        print_ema_table()
    if "grad_sum" in args.tables:
        print_grad_sum_table()
    if "training" in args.tables:
        print_training_table(args.seeds, args.epochs, args.lrs, args.workers)
    if "momentum" in args.tables:
        print_momentum_table(args.seeds, args.epochs, args.workers)


if __name__ == "__main__":
    main()
