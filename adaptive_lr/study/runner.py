"""What both studies share: running independent tasks on worker processes with a progress bar,
summary statistics, and writing raw results (CSV, JSON) with the machine they came from."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm


def _single_threaded() -> None:
    # one intra-op thread per worker: the workers, not torch, share the cores
    torch.set_num_threads(1)


def run_tasks(function: Callable[[dict], dict], tasks: list[dict], workers: int,
              description: str) -> list[dict]:
    """``function(task)`` for every task, in task order, each on one thread. ``workers > 1`` runs
    them on that many spawned processes (torch is not fork-safe once its thread pools exist)."""
    bar = tqdm(total=len(tasks), desc=description, unit="run", dynamic_ncols=True)
    if workers == 1:
        _single_threaded()
        results = []
        for task in tasks:
            results.append(function(task))
            bar.update()
        bar.close()
        return results
    results = [None] * len(tasks)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                             initializer=_single_threaded) as pool:
        futures = {pool.submit(function, task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    bar.close()
    return results


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample sd; a NaN among the values makes both NaN (a diverged run shows)."""
    values = np.asarray(list(values), dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    below, fraction = int(position), position - int(position)
    if fraction == 0:
        return ordered[below]
    above = ordered[below + 1]
    return math.inf if math.isinf(above) else ordered[below] + (above - ordered[below]) * fraction


def median_iqr(values: Iterable[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (linear interpolation). Values are finite or +inf
    (a diverged run): +inf sorts last, so a minority of diverged runs moves the upper quartile,
    not the median."""
    ordered = sorted(values)
    return _quantile(ordered, 0.25), _quantile(ordered, 0.5), _quantile(ordered, 0.75)


def finite_or_inf(value: float) -> float:
    """A diverged loss (NaN or ±inf) counts as +inf, so that it ranks last."""
    return value if math.isfinite(value) else math.inf


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
            "cores": os.cpu_count(), "threads_per_run": 1}


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _strict(value):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(_strict(payload), f, indent=1, allow_nan=False)
