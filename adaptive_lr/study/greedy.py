"""GreedyLR study: GreedyLR against constant, cosine, exponential and ReduceLROnPlateau schedules
(and stacked on ActiveAdamW, with and without ``max_gain``) under perturbations that reach both
the optimizer and the scheduler.

Protocol:

* Problems: quadratics in 20 dimensions with condition numbers 1, 100 and 1000 (``quadratic-k*``),
  2-D Rosenbrock, 10-D Rastrigin, and two small MLPs on data shipped with scikit-learn (digits
  classification, diabetes regression).
* Noise: every step optimizes a mini-batch objective. For the analytic functions that is
  ``f(x) + sigma * <xi, x - x*>`` with a fresh ``xi ~ N(0, I)`` per step, so the gradient gets
  additive noise and the loss fed to the scheduler gets the matching noise; ``sigma`` is
  ``NOISE`` times the RMS of the starting gradient. The MLPs use real mini-batches.
* Spike (second condition): at ``SPIKE_AT`` of the run, the step's objective gets a random linear
  kick ``K * <zeta, params>`` (the gradient jumps by ``K * zeta``, ``K`` = ``KICK`` times the
  starting gradient RMS) and the loss fed to ``step(metric)`` is raised by ``SPIKE_LOSS`` times
  the starting loss. Damage = the peak of the true loss (noise-free ``f`` or the full-batch
  training loss) in the tenth of the run after the spike, over its mean in the 20 steps before;
  recovery = steps from the spike until the true loss is back at that mean after the peak.
* Fairness: the same seed gives every schedule the same start, noise and batches. Each schedule's
  starting lr is tuned on a grid with separate tuning seeds (lowest median final true loss, noisy
  condition), then evaluated on fresh seeds. Reported: median and quartiles over seeds.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn

from adaptive_lr import ActiveAdamW, GreedyLR
from adaptive_lr.study import runner
from adaptive_lr.study.digits import load_digits, mlp
from adaptive_lr.study.lr_sweep import STUDY_STATE_PRECISION

NOISE = 0.1
KICK = 10.0
SPIKE_LOSS = 10.0
SPIKE_AT = 0.6
RECOVERY_REFERENCE_STEPS = 20
PEAK_WINDOW = 0.1  # of the run: where the spike's peak is looked for
ANALYTIC_STEPS_PER_EPOCH = 20  # the Active optimizers' epoch on a function without a dataset

# GreedyLR as docs/greedy_lr.md recommends it (smoothed loss, patience, short frozen windows)
GREEDY_KWARGS = dict(factor=0.95, patience=10, cooldown=5, warmup=5, smooth=True, window_size=50)
SCHEDULES = ("constant", "cosine", "exponential", "plateau", "greedy",
             "active", "active+greedy", "active+greedy max_gain=10")


# ------------------------------------------------------------------------------- problems

class Problem(Protocol):
    """A started run of one problem: ``params``, the step's noisy ``objective(step)`` and the
    noise-free ``true_objective()``."""

    params: list[torch.Tensor]
    steps: int
    steps_per_epoch: int

    def objective(self, step: int) -> torch.Tensor: ...

    def true_objective(self) -> torch.Tensor: ...


class Analytic:
    def __init__(self, function, x_star: torch.Tensor, x0: torch.Tensor, steps: int, seed: int):
        self.function, self.x_star = function, x_star
        self.x = x0.clone().requires_grad_()
        self.params = [self.x]
        self.steps, self.steps_per_epoch = steps, ANALYTIC_STEPS_PER_EPOCH
        self.noise = torch.Generator().manual_seed(seed + 1)
        (gradient,) = torch.autograd.grad(function(self.x), self.x)
        self.sigma = NOISE * gradient.pow(2).mean().sqrt().item()

    def objective(self, step: int) -> torch.Tensor:
        xi = torch.randn(self.x.shape, generator=self.noise, dtype=self.x.dtype)
        return self.function(self.x) + self.sigma * (xi * (self.x - self.x_star)).sum()

    def true_objective(self) -> torch.Tensor:
        return self.function(self.x)


class MiniBatch:
    def __init__(self, model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int, epochs: int, seed: int):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.params = list(model.parameters())
        order = torch.Generator().manual_seed(seed + 1)
        self.batches = [b for _ in range(epochs)
                        for b in torch.randperm(len(x), generator=order).split(batch_size)]
        self.steps = len(self.batches)
        self.steps_per_epoch = self.steps // epochs

    def objective(self, step: int) -> torch.Tensor:
        batch = self.batches[step]
        return self.loss_fn(self.model(self.x[batch]), self.y[batch])

    def true_objective(self) -> torch.Tensor:
        return self.loss_fn(self.model(self.x), self.y)


def quadratic(condition: float, dim: int = 20):
    eigenvalues = torch.logspace(0, math.log10(condition), dim, dtype=torch.float64)
    return lambda x: 0.5 * (eigenvalues * x * x).sum()


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def rastrigin(x: torch.Tensor) -> torch.Tensor:
    return 10 * x.numel() + (x * x - 10 * torch.cos(2 * math.pi * x)).sum()


def _diabetes():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)

    def standardised(a):
        return torch.tensor((a - a.mean(0)) / a.std(0), dtype=torch.float32)

    return standardised(x), standardised(y).unsqueeze(1)


def make_problem(name: str, seed: int, analytic_steps: int, mlp_epochs: int) -> Problem:
    """Problem ``name`` started from the seed's point (weights); the seed also fixes its noise
    (batch order)."""
    gen = torch.Generator().manual_seed(seed)
    normal = lambda dim: torch.randn(dim, generator=gen, dtype=torch.float64)  # noqa: E731
    zeros = lambda dim: torch.zeros(dim, dtype=torch.float64)  # noqa: E731
    if name.startswith("quadratic-k"):
        condition = float(name.removeprefix("quadratic-k"))
        return Analytic(quadratic(condition), zeros(20), normal(20), analytic_steps, seed)
    if name == "rosenbrock":
        start = torch.tensor([-1.2, 1.0], dtype=torch.float64) + 0.2 * normal(2)
        return Analytic(rosenbrock, torch.ones(2, dtype=torch.float64), start, analytic_steps, seed)
    if name == "rastrigin":
        start = 5.12 * (2 * torch.rand(10, generator=gen, dtype=torch.float64) - 1)
        return Analytic(rastrigin, zeros(10), start, analytic_steps, seed)
    torch.manual_seed(seed)
    if name == "digits-mlp":
        data = load_digits(0)
        return MiniBatch(mlp(), nn.CrossEntropyLoss(), data.x_train, data.y_train, 64,
                         mlp_epochs, seed)
    if name == "diabetes-mlp":
        x, y = _diabetes()
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
        return MiniBatch(model, nn.MSELoss(), x, y, 32, 2 * mlp_epochs, seed)
    raise ValueError(f"unknown problem {name!r}")


ANALYTIC = ("quadratic-k1", "quadratic-k100", "quadratic-k1000", "rosenbrock", "rastrigin")
MLPS = ("digits-mlp", "diabetes-mlp")
PROBLEMS = ANALYTIC + MLPS


# ------------------------------------------------------------------------------- one run

def _optimizer_and_scheduler(schedule: str, params, lr: float, steps: int, steps_per_epoch: int):
    if schedule.startswith("active"):
        max_gain = 10.0 if schedule.endswith("max_gain=10") else math.inf
        optimizer = ActiveAdamW(params, lr=lr, weight_decay=0.0, steps_per_epoch=steps_per_epoch,
                                max_gain=max_gain, state_precision=STUDY_STATE_PRECISION)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedulers = torch.optim.lr_scheduler
    if "greedy" in schedule:
        return optimizer, GreedyLR(optimizer, **GREEDY_KWARGS)
    if schedule == "cosine":
        return optimizer, schedulers.CosineAnnealingLR(optimizer, T_max=steps)
    if schedule == "exponential":  # to 1/100 of the starting lr at the end
        return optimizer, schedulers.ExponentialLR(optimizer, gamma=0.01 ** (1 / steps))
    if schedule == "plateau":  # torch's defaults: factor 0.1, patience 10
        return optimizer, schedulers.ReduceLROnPlateau(optimizer)
    return optimizer, None  # constant lr


def _rms(tensors) -> float:
    return math.sqrt(sum(t.pow(2).sum().item() for t in tensors) / sum(t.numel() for t in tensors))


def run_one(task: dict) -> dict:
    """One (problem, schedule, lr, seed) run, with or without the spike."""
    problem = make_problem(task["problem"], task["seed"], task["analytic_steps"],
                           task["mlp_epochs"])
    start = problem.true_objective()
    start_loss = start.item()
    kick_scale = KICK * _rms(torch.autograd.grad(start, problem.params))
    optimizer, scheduler = _optimizer_and_scheduler(
        task["schedule"], problem.params, task["lr"], problem.steps, problem.steps_per_epoch)
    metric_driven = isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))
    spike_step = int(SPIKE_AT * problem.steps) if task["spike"] else -1
    kick = torch.Generator().manual_seed(task["seed"] + 2)
    true_losses, lrs = [], []
    for step in range(problem.steps):
        loss = problem.objective(step)
        metric = loss.item()
        if step == spike_step:
            zetas = [torch.randn(p.shape, generator=kick, dtype=p.dtype) for p in problem.params]
            loss = loss + kick_scale * sum((z * p).sum() for z, p in zip(zetas, problem.params))
            metric += SPIKE_LOSS * start_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if metric_driven:
            scheduler.step(metric)
        elif scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            true_losses.append(runner.finite_or_inf(problem.true_objective().item()))
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    row = {key: task[key] for key in ("problem", "schedule", "lr", "seed", "spike")}
    damage, recovery = (_damage_and_recovery(true_losses, spike_step) if task["spike"]
                        else (None, None))
    row.update(start_loss=start_loss, final_loss=true_losses[-1],
               ended_above_start=not true_losses[-1] <= start_loss,
               spike_peak_ratio=damage, recovery_steps=recovery)
    if task.get("trace"):
        row.update(true_losses=true_losses, lrs=lrs)
    return row


def _damage_and_recovery(true_losses: list[float], spike_step: int) -> tuple[float, int | None]:
    """The spike's damage: the peak true loss within ``PEAK_WINDOW`` of the run after the spike,
    relative to the mean over the steps before it; and the steps from the spike until the loss is
    back at that mean after the peak (0: it never rose above it; None: it never came back)."""
    before = true_losses[max(0, spike_step - RECOVERY_REFERENCE_STEPS):spike_step]
    reference = sum(before) / len(before)
    after = true_losses[spike_step:spike_step + max(1, int(PEAK_WINDOW * len(true_losses)))]
    peak = max(range(len(after)), key=after.__getitem__) + spike_step
    if true_losses[peak] <= reference:
        return true_losses[peak] / reference, 0
    recovered = next((step for step in range(peak, len(true_losses))
                      if true_losses[step] <= reference), None)
    return true_losses[peak] / reference, None if recovered is None else recovered - spike_step + 1


# ------------------------------------------------------------------------------- the study

@dataclass(frozen=True)
class GreedyConfig:
    problems: tuple[str, ...] = PROBLEMS
    schedules: tuple[str, ...] = SCHEDULES
    analytic_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    mlp_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    analytic_steps: int = 1000
    mlp_epochs: int = 20  # digits; diabetes (a quarter of the data) runs twice as many
    tuning_seeds: tuple[int, ...] = (100, 101, 102)
    analytic_eval_seeds: int = 20
    mlp_eval_seeds: int = 10
    trace_problems: tuple[str, ...] = ("quadratic-k100", "digits-mlp")


QUICK = GreedyConfig(
    problems=ANALYTIC + ("digits-mlp",), analytic_lrs=(1e-3, 1e-2, 1e-1, 1.0),
    mlp_lrs=(1e-4, 1e-3, 1e-2, 1e-1), analytic_steps=400, mlp_epochs=5, tuning_seeds=(100,),
    analytic_eval_seeds=3, mlp_eval_seeds=2,
)


def _base_task(config: GreedyConfig, problem: str, schedule: str) -> dict:
    return dict(problem=problem, schedule=schedule, analytic_steps=config.analytic_steps,
                mlp_epochs=config.mlp_epochs)


def tuning_tasks(config: GreedyConfig) -> list[dict]:
    """Every (problem, schedule) at every lr of its grid, over the tuning seeds, noisy condition
    without spike."""
    return [
        dict(_base_task(config, problem, schedule), lr=lr, seed=seed, spike=False)
        for problem in config.problems for schedule in config.schedules
        for lr in (config.mlp_lrs if problem in MLPS else config.analytic_lrs)
        for seed in config.tuning_seeds
    ]


def tune(config: GreedyConfig, tuning_rows: list[dict]) -> dict:
    """The starting lr of every (problem, schedule) that has tuning runs: lowest median final
    loss over the tuning seeds."""
    tuned = {}
    for problem in config.problems:
        for schedule in config.schedules:
            by_lr = {}
            for r in tuning_rows:
                if r["problem"] == problem and r["schedule"] == schedule:
                    by_lr.setdefault(r["lr"], []).append(r["final_loss"])
            if by_lr:
                tuned[(problem, schedule)] = min(
                    by_lr, key=lambda lr: runner.median_iqr(by_lr[lr])[1])
    return tuned


def evaluation_tasks(config: GreedyConfig, tuned: dict) -> list[dict]:
    """Every tuned (problem, schedule) at its tuned lr, over the evaluation seeds, with and
    without the spike."""
    tasks = []
    for problem in config.problems:
        seeds = config.mlp_eval_seeds if problem in MLPS else config.analytic_eval_seeds
        for schedule in config.schedules:
            if (problem, schedule) not in tuned:
                continue
            for spike in (False, True):
                for seed in range(seeds):
                    tasks.append(dict(
                        _base_task(config, problem, schedule), lr=tuned[(problem, schedule)],
                        seed=seed, spike=spike,
                        trace=spike and seed == 0 and problem in config.trace_problems))
    return tasks


def summarize(config: GreedyConfig, tuned: dict, tuning_rows: list[dict], rows: list[dict]) -> dict:
    cells = []
    for problem in config.problems:
        for schedule in config.schedules:
            mine = [r for r in rows if r["problem"] == problem and r["schedule"] == schedule]
            noisy = [r for r in mine if not r["spike"]]
            spiked = [r for r in mine if r["spike"]]
            recovered = [r["recovery_steps"] for r in spiked if r["recovery_steps"] is not None]
            grid = [r for r in tuning_rows if r["problem"] == problem and r["schedule"] == schedule]
            cells.append(dict(
                problem=problem, schedule=schedule, tuned_lr=tuned.get((problem, schedule)),
                seeds=len(noisy),
                final_loss=runner.median_iqr(r["final_loss"] for r in noisy),
                ended_above_start=sum(r["ended_above_start"] for r in noisy),
                final_loss_with_spike=runner.median_iqr(r["final_loss"] for r in spiked),
                # a run that never recovers counts as +inf: it ranks last, not absent
                recovery_steps=runner.median_iqr(
                    [float(s) for s in recovered] + [math.inf] * (len(spiked) - len(recovered))),
                not_recovered=len(spiked) - len(recovered),
                spike_peak_ratio=runner.median_iqr(r["spike_peak_ratio"] for r in spiked),
                grid_runs_above_start=sum(r["ended_above_start"] for r in grid),
                grid_runs=len(grid),
            ))
    return {"config": asdict(config), "noise": NOISE, "kick": KICK, "spike_loss": SPIKE_LOSS,
            "spike_at": SPIKE_AT, "greedy_kwargs": GREEDY_KWARGS, "cells": cells}


def _g(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3g}"


def _quartiles(q: tuple[float, float, float]) -> str:
    return f"{_g(q[1])} [{_g(q[0])}, {_g(q[2])}]"


def markdown(summary: dict) -> str:
    note = runner.partial_note(summary["runs"])
    out = [note, ""] if note else []
    config = summary["config"]
    for problem in config["problems"]:
        cells = [c for c in summary["cells"] if c["problem"] == problem]
        seeds = config["mlp_eval_seeds" if problem in MLPS else "analytic_eval_seeds"]
        out += [f"**{problem}** ({seeds} seeds; median [IQR])", "",
                "| schedule | tuned lr | final loss | ended above start | final loss, spike run "
                "| spike peak / pre-spike | recovery steps | not recovered "
                "| grid runs ended above start |",
                "|---|---|---|---|---|---|---|---|---|"]
        for c in cells:
            if c["tuned_lr"] is None:
                out.append(f"| {c['schedule']} | no tuning run finished |" + " |" * 7)
                continue
            out.append(
                f"| {c['schedule']} | {c['tuned_lr']:g} | {_quartiles(c['final_loss'])} | "
                f"{c['ended_above_start']}/{c['seeds']} | "
                f"{_quartiles(c['final_loss_with_spike'])} | {_quartiles(c['spike_peak_ratio'])} | "
                f"{_quartiles(c['recovery_steps'])} | {c['not_recovered']}/{c['seeds']} | "
                f"{c['grid_runs_above_start']}/{c['grid_runs']} |")
        out.append("")
    return "\n".join(out)


def plot(summary: dict, traces: list[dict], out_dir: str) -> None:
    """greedy_final_loss.png: medians and IQRs per problem; greedy_spike_traces.png (when the
    config traces a problem): true loss and lr around the spike, seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems, schedules = summary["config"]["problems"], summary["config"]["schedules"]
    columns = 4
    rows_needed = -(-len(problems) // columns)
    fig, axes = plt.subplots(rows_needed, columns, figsize=(4.2 * columns, 3.6 * rows_needed),
                             squeeze=False)
    for ax, problem in zip(axes.flat, problems):
        for i, schedule in enumerate(schedules):
            cell = next(c for c in summary["cells"]
                        if c["problem"] == problem and c["schedule"] == schedule)
            for offset, key, color in ((-0.15, "final_loss", "tab:blue"),
                                       (0.15, "final_loss_with_spike", "tab:red")):
                q1, median, q3 = cell[key]
                if math.isfinite(median):
                    ax.errorbar(i + offset, median, [[median - q1], [q3 - median]] if
                                math.isfinite(q3) else [[median - q1], [0]], fmt="o",
                                color=color, capsize=3)
        ax.set_yscale("log")
        ax.set_title(problem)
        ax.set_xticks(range(len(schedules)), schedules, rotation=60, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(problems):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("final true loss (median, IQR)")
    axes[0, 0].plot([], [], "o", color="tab:blue", label="noisy")
    axes[0, 0].plot([], [], "o", color="tab:red", label="noisy + spike")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "greedy_final_loss.png"), dpi=110)
    plt.close(fig)

    trace_problems = summary["config"]["trace_problems"]
    if not trace_problems:
        return
    fig, axes = plt.subplots(2, len(trace_problems), figsize=(6.5 * len(trace_problems), 7.5),
                             sharex="col", squeeze=False)
    for column, problem in enumerate(trace_problems):
        mine = [t for t in traces if t["problem"] == problem]  # a partial study may lack some
        for trace in mine:
            axes[0, column].plot(trace["true_losses"], lw=1, label=trace["schedule"])
            axes[1, column].plot(trace["lrs"], lw=1)
        if not mine:
            axes[0, column].set_title(f"{problem}: no trace (partial study)")
            continue
        spike = int(SPIKE_AT * len(mine[0]["lrs"]))
        for ax in axes[:, column]:
            ax.axvline(spike, color="k", ls=":", lw=1)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0, column].set_title(f"{problem}: seed 0, spike at step {spike}")
        axes[1, column].set_xlabel("step")
    axes[0, 0].set_ylabel("true loss")
    axes[1, 0].set_ylabel("group lr")
    if traces:
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "greedy_spike_traces.png"), dpi=110)
    plt.close(fig)


def run(config: GreedyConfig, out_dir: str, workers: int) -> dict:
    """Tune, evaluate; write greedy_tuning_runs.jsonl and greedy_eval_runs.jsonl (each run as it
    finishes: a run of the same settings into the same directory resumes from them),
    greedy_tuning.csv, greedy_eval.csv (one row per finished run), greedy_traces.json, greedy.json
    (the summary; its "runs" says how many finished), greedy.md and two PNGs into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    tuning = runner.run_tasks(run_one, tuning_tasks(config), workers, "GreedyLR study: tuning",
                              os.path.join(out_dir, "greedy_tuning_runs.jsonl"))
    tuned = tune(config, tuning.rows)
    tasks = evaluation_tasks(config, tuned)
    evaluation = (runner.Outcome([], len(tasks), interrupted=True) if tuning.interrupted
                  else runner.run_tasks(run_one, tasks, workers, "GreedyLR study: evaluation",
                                        os.path.join(out_dir, "greedy_eval_runs.jsonl")))
    rows = evaluation.rows
    traces = [r for r in rows if "true_losses" in r]
    plain = [{k: v for k, v in r.items() if k not in ("true_losses", "lrs")} for r in rows]
    summary = summarize(config, tuned, tuning.rows, plain)
    summary["runs"] = {"GreedyLR study: tuning": tuning.status(),
                       "GreedyLR study: evaluation": evaluation.status()}
    summary["machine"] = runner.machine()
    runner.write_csv(os.path.join(out_dir, "greedy_tuning.csv"), tuning.rows)
    runner.write_csv(os.path.join(out_dir, "greedy_eval.csv"), plain)
    runner.write_json(os.path.join(out_dir, "greedy_traces.json"), {"traces": [
        {**t, "true_losses": [float(f"{v:.4g}") for v in t["true_losses"]],
         "lrs": [float(f"{v:.4g}") for v in t["lrs"]]} for t in traces]})
    runner.write_json(os.path.join(out_dir, "greedy.json"), summary)
    with open(os.path.join(out_dir, "greedy.md"), "w") as f:
        f.write(markdown(summary))
    plot(summary, traces, out_dir)
    return summary
