"""Compact state's quality study (docs/RESULTS.md §4): does keeping gains and epoch sums in
bfloat16 (``state_precision="compact"``) change training?

Protocol, fixed before the runs: the LR sweep's grid (both digits models, the four Active
optimizers of the published sweep at their defaults, seven lrs, five seeds, 40 epochs), each run
twice, with full and with compact state, from the same weights and batches. A cell (model,
optimizer, lr) is within seed noise when the difference of the seed-mean final test accuracies is
at most twice its standard error (sqrt((sd_full^2 + sd_compact^2) / seeds)). Every run also
measures, at each epoch's end, how often the stored epoch sum has the sign of a float64 sum of the
same gradients, weighted by that sum's magnitude (the elements whose sign decides a gain weigh
most); compact state's target is >= 99.9 %, in runs that trained (final accuracy >= 50 %): a
diverged run's sums carry no information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptive_lr.study import lr_sweep, runner
from adaptive_lr.study.digits import load_digits, train

PRECISIONS = ("full", "compact")
TRAINED_ACCURACY = 0.5  # a run below it failed (10 classes: chance is 10 %)


@dataclass(frozen=True)
class CompactConfig:
    models: tuple[str, ...] = ("mlp", "cnn")
    pairs: tuple[str, ...] = lr_sweep.STUDY_PAIRS
    lrs: tuple[float, ...] = lr_sweep.SweepConfig().lrs
    seeds: int = 5
    epochs: int = 40
    batch_size: int = 64


QUICK = CompactConfig(lrs=(1e-4, 1e-2), seeds=2, epochs=4)


class SignAgreement:
    """Sums each param's gradients in float64 beside the optimizer and compares the signs with
    its stored epoch sums at each epoch's end (``epoch_end``, before the next boundary reads
    them)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.exact: dict[torch.Tensor, torch.Tensor] = {}
        self.weight = self.weight_agreeing = 0.0
        self.elements = self.elements_agreeing = 0
        self.worst_epoch = 1.0
        optimizer.register_step_pre_hook(self._accumulate)

    def _accumulate(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    exact = self.exact.get(p)
                    grad = p.grad.detach().double()
                    self.exact[p] = grad if exact is None else exact.add_(grad)

    def epoch_end(self, optimizer: torch.optim.Optimizer) -> None:
        weight = agreeing = 0.0
        for p, exact in self.exact.items():
            same = torch.sign(optimizer.state[p]["grad_sum"].double()) == torch.sign(exact)
            magnitude = exact.abs()
            weight += magnitude.sum().item()
            agreeing += magnitude[same].sum().item()
            self.elements += same.numel()
            self.elements_agreeing += int(same.sum())
        self.weight += weight
        self.weight_agreeing += agreeing
        if weight > 0:
            self.worst_epoch = min(self.worst_epoch, agreeing / weight)
        self.exact.clear()

    def result(self) -> dict:
        return {
            "sign_agreement": self.weight_agreeing / self.weight if self.weight else 1.0,
            "sign_agreement_worst_epoch": self.worst_epoch,
            "sign_agreement_elements": (self.elements_agreeing / self.elements
                                        if self.elements else 1.0),
        }


def train_one(task: dict) -> dict:
    """One (model, optimizer, lr, seed, state precision) run; the raw result row."""
    meters = []

    def make_optimizer(params, steps_per_epoch):
        optimizer = lr_sweep.make_optimizer(task["pair"], True, params, task["lr"],
                                            steps_per_epoch,
                                            state_precision=task["state_precision"])
        meters.append(SignAgreement(optimizer))
        return optimizer

    history = train(task["model"], make_optimizer, load_digits(0), task["epochs"],
                    task["batch_size"], task["seed"],
                    on_epoch_end=lambda optimizer: meters[0].epoch_end(optimizer))
    return {
        "model": task["model"], "optimizer": lr_sweep.optimizer_name(task["pair"], True),
        "lr": task["lr"], "seed": task["seed"], "state_precision": task["state_precision"],
        "final_train_loss": history["train_loss"][-1],
        "final_test_accuracy": history["test_accuracy"][-1], **meters[0].result(),
        "seconds": history["seconds"],
    }


def tasks(config: CompactConfig) -> list[dict]:
    return [
        dict(model=model, pair=pair, lr=lr, seed=seed, state_precision=precision,
             epochs=config.epochs, batch_size=config.batch_size)
        for model in config.models for seed in range(config.seeds) for pair in config.pairs
        for lr in config.lrs for precision in PRECISIONS
    ]


def summarize(rows: list[dict], config: CompactConfig) -> dict:
    """Per (model, optimizer, lr): each precision's mean and sd over seeds, their difference and
    whether it is within seed noise; per precision: the sign agreement over all its runs."""
    cells = []
    for model in config.models:
        for pair in config.pairs:
            name = lr_sweep.optimizer_name(pair, True)
            for lr in config.lrs:
                runs = {precision: [r for r in rows if r["model"] == model
                                    and r["optimizer"] == name and r["lr"] == lr
                                    and r["state_precision"] == precision]
                        for precision in PRECISIONS}
                if not all(runs.values()):
                    continue
                cell = {"model": model, "optimizer": name, "lr": lr}
                for precision, at in runs.items():
                    cell[precision] = runner.mean_sd(r["final_test_accuracy"] for r in at)
                    cell[f"{precision}_loss"] = runner.mean_sd(
                        runner.finite_or_inf(r["final_train_loss"]) for r in at)
                (full, sd_full), (compact, sd_compact) = cell["full"], cell["compact"]
                seeds = min(len(at) for at in runs.values())
                cell["difference"] = compact - full
                cell["noise"] = 2 * math.sqrt((sd_full**2 + sd_compact**2) / seeds)
                cell["within_noise"] = abs(cell["difference"]) <= cell["noise"]
                cells.append(cell)
    agreement = {}
    for precision in PRECISIONS:
        finite = [r for r in rows if r["state_precision"] == precision
                  and math.isfinite(r["sign_agreement"])]
        trained = [r for r in finite if r["final_test_accuracy"] >= TRAINED_ACCURACY]
        agreement[precision] = {
            "non_finite_runs": sum(r["state_precision"] == precision for r in rows) - len(finite),
            "trained": _agreement(trained), "every_finite_run": _agreement(finite),
        }
    outside = [c for c in cells if not c["within_noise"]]
    return {
        "config": config.__dict__, "cells": cells, "agreement": agreement,
        "cells_outside_noise": len(outside), "cells_total": len(cells),
        "largest_difference": max(cells, key=lambda c: abs(c["difference"]), default=None),
    }


def _agreement(runs: list[dict]) -> dict:
    """Sign agreement over ``runs``: the mean and worst of the runs' weighted agreement, the
    worst single epoch, and the mean unweighted agreement."""
    if not runs:
        return {"runs": 0}
    weighted = [r["sign_agreement"] for r in runs]
    return {
        "runs": len(runs),
        "mean": sum(weighted) / len(weighted),
        "worst_run": min(weighted),
        "worst_epoch": min(r["sign_agreement_worst_epoch"] for r in runs),
        "elements_mean": sum(r["sign_agreement_elements"] for r in runs) / len(runs),
    }


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def markdown(summary: dict) -> str:
    lines = ["| model | optimizer | lr | full: accuracy % | compact: accuracy % | difference "
             "(points) | 2 SE | within noise |", "|---|---|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        (full, sd_full), (compact, sd_compact) = c["full"], c["compact"]
        lines.append(f"| {c['model']} | {c['optimizer']} | {c['lr']:g} | "
                     f"{100 * full:.1f} ± {100 * sd_full:.1f} | "
                     f"{100 * compact:.1f} ± {100 * sd_compact:.1f} | "
                     f"{_points(c['difference'])} | {100 * c['noise']:.1f} | "
                     f"{'yes' if c['within_noise'] else '**no**'} |")
    lines += ["", f"Cells outside seed noise: {summary['cells_outside_noise']} of "
              f"{summary['cells_total']}.", "",
              "| state | runs | sign agreement weighted by \\|sum\\|: mean of runs | worst run "
              "| worst epoch | unweighted: mean of runs |", "|---|---|---|---|---|---|"]
    for precision, a in summary["agreement"].items():
        for label, key in ((f"trained (final accuracy >= {TRAINED_ACCURACY:.0%})", "trained"),
                           ("every run with finite sums", "every_finite_run")):
            at = a[key]
            if at["runs"]:
                lines.append(f"| {precision}, {label} | {at['runs']} | {100 * at['mean']:.4f} % | "
                             f"{100 * at['worst_run']:.4f} % | {100 * at['worst_epoch']:.4f} % | "
                             f"{100 * at['elements_mean']:.3f} % |")
    lines += ["", "Runs whose gradients became non-finite (no sign to compare): " + ", ".join(
        f"{precision} {a['non_finite_runs']}" for precision, a in summary["agreement"].items())
        + "."]
    return "\n".join(lines) + "\n"


def run(config: CompactConfig, out_dir: str, workers: int) -> dict:
    """Run the study; write compact_runs.jsonl (resumable), compact.csv, compact.json and
    compact.md into ``out_dir``."""
    return runner.run_study(train_one, tasks(config), workers, "compact state", out_dir,
                            "compact", lambda rows: summarize(rows, config), markdown)
