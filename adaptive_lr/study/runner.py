"""What both studies share: running independent tasks on worker processes with a progress bar,
summary statistics, and writing raw results (CSV, JSON) with the machine they came from.

A study's runs are recorded one by one as they finish (a JSON-lines journal beside its results),
so that Ctrl-C or a failing run loses no finished run, and a re-run of the same settings into the
same directory only runs what is missing."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import signal
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable, Iterable, Iterator

import torch


def _single_threaded() -> None:
    # one intra-op thread per worker: the workers, not torch, share the cores
    torch.set_num_threads(1)


def _start_worker() -> None:
    # Ctrl-C in a terminal reaches every process of the group: the main process alone handles it
    # (and ends the workers), so a worker never records a run as failed by KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _single_threaded()


@dataclass
class Outcome:
    """What came of a list of tasks: the results of the runs that finished, in task order."""

    rows: list[dict]
    total: int
    failed: int = 0
    interrupted: bool = False

    def status(self) -> dict:
        """The counts a study's summary keeps (its "runs")."""
        return dict(finished=len(self.rows), total=self.total, failed=self.failed,
                    interrupted=self.interrupted)


def describe(status: dict) -> str:
    """E.g. '130 of 160 runs finished (interrupted, 1 failed)'."""
    why = ["interrupted"] * status["interrupted"] + [f"{status['failed']} failed"] * bool(
        status["failed"])
    return f"{status['finished']} of {status['total']} runs finished" + (
        f" ({', '.join(why)})" if why else "")


def incomplete(runs: dict[str, dict]) -> dict[str, dict]:
    """The phases of a study's ``runs`` (phase -> status) that did not finish every run."""
    return {phase: s for phase, s in runs.items() if s["finished"] < s["total"]}


def partial_note(runs: dict[str, dict]) -> str:
    """The Markdown line that heads the tables of a study some of whose runs did not finish."""
    missing = incomplete(runs)
    if not missing:
        return ""
    return ("**PARTIAL RESULTS: " + "; ".join(f"{phase}: {describe(s)}" for phase, s in
                                               missing.items())
            + ".** The tables cover the finished runs only; a failed run's error is in the "
            "`*_runs.jsonl` file, and the same command run again runs the rest.")


def _task_key(task: dict) -> str:
    return json.dumps(task, sort_keys=True)


def _recorded_results(journal: str) -> dict[str, dict]:
    """The results of the finished runs in ``journal``, by task."""
    if not os.path.exists(journal):
        return {}
    with open(journal) as f:
        records = [json.loads(line) for line in f]
    return {_task_key(r["task"]): r["result"] for r in records if "result" in r}


def _attempt(function: Callable[[dict], dict], task: dict) -> tuple[dict | None, str | None]:
    try:
        return function(task), None
    except Exception:  # a failed run is recorded; KeyboardInterrupt is not caught
        return None, traceback.format_exc()


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Cancels the pending runs and ends the running ones now (shutdown alone would wait for
    them). Python 3.14 has this as ProcessPoolExecutor.terminate_workers()."""
    processes = list(pool._processes.values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def _runs(function, tasks: list[dict], indices: list[int], workers: int
          ) -> Iterator[tuple[int, dict | None, str | None]]:
    """(index, result, error) of each of the tasks at ``indices`` as it finishes."""
    if workers == 1:
        _single_threaded()
        for index in indices:
            yield index, *_attempt(function, tasks[index])
        return
    # spawned: torch is not fork-safe once its thread pools exist
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                               initializer=_start_worker)
    try:
        futures = {pool.submit(function, tasks[index]): index for index in indices}
        for future in as_completed(futures):
            error = future.exception()
            yield (futures[future], None if error else future.result(),
                   "".join(traceback.format_exception(error)) if error else None)
    except BaseException:  # Ctrl-C, or the caller stopped early
        _terminate(pool)
        raise
    pool.shutdown()


def run_tasks(function: Callable[[dict], dict], tasks: list[dict], workers: int,
              description: str, journal: str | None = None) -> Outcome:
    """``function(task)`` for every task, each on one thread; ``workers > 1`` runs them on that
    many processes. A run that raises is reported and the others go on; Ctrl-C stops at once
    (pending runs are cancelled, running ones ended) and returns what finished.

    With a ``journal`` (a JSON-lines file) every run is appended to it as it finishes, the task
    with its result or its error, and the tasks it already holds a result for are not run again.
    """
    from tqdm import tqdm

    results = {}
    if journal is not None:
        recorded = _recorded_results(journal)
        results = {i: recorded[_task_key(t)] for i, t in enumerate(tasks)
                   if _task_key(t) in recorded}
        if results:
            print(f"{description}: {len(results)} of {len(tasks)} runs are already in {journal} "
                  "(from an earlier run with these settings; delete it to run them again)")
    pending = [i for i in range(len(tasks)) if i not in results]
    outcome = Outcome([], len(tasks))
    bar = tqdm(total=len(tasks), initial=len(results), desc=description, unit="run",
               dynamic_ncols=True)
    log = open(journal, "a") if journal is not None else None
    runs = _runs(function, tasks, pending, workers)
    try:
        for index, result, error in runs:
            if error is None:
                results[index] = result
            else:
                outcome.failed += 1
                bar.write(f"{description}: run {tasks[index]} failed: "
                          f"{error.strip().splitlines()[-1]}")
            if log is not None:
                record = {"result": result} if error is None else {"error": error}
                log.write(json.dumps({"task": tasks[index], **record}) + "\n")
                log.flush()
            bar.update()
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        runs.close()  # after Ctrl-C: ends the workers
        bar.close()
        if log is not None:
            log.close()
    outcome.rows = [results[i] for i in sorted(results)]
    return outcome


def run_phase(function: Callable[[dict], dict], tasks: list[dict], workers: int, description: str,
              journal: str, csv_path: str, csv_row: Callable[[dict], dict]) -> Outcome:
    """One phase of a study whose phases share a journal: ``run_tasks``, then its finished runs
    (``csv_row`` of each) written to ``csv_path``."""
    outcome = run_tasks(function, tasks, workers, description, journal)
    write_csv(csv_path, [csv_row(r) for r in outcome.rows])
    return outcome


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample sd; a NaN among the values makes both NaN (a diverged run shows); both NaN
    for no values (a cell no run of a partial study reached)."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


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
    not the median. All NaN for no values (a cell no run of a partial study reached)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan, math.nan, math.nan
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
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
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


def run_study(function: Callable[[dict], dict], tasks: list[dict], workers: int, phase: str,
              out_dir: str, stem: str, summarize: Callable[[list[dict]], dict],
              markdown: Callable[[dict], str]) -> dict:
    """Run one study's tasks and write <stem>_runs.jsonl (each run as it finishes: the same
    command into the same directory resumes from it), <stem>.csv (one row per finished run),
    <stem>.json (the summary, with "runs": how many finished, and the machine) and <stem>.md
    into ``out_dir``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    outcome = run_tasks(function, tasks, workers, phase,
                        os.path.join(out_dir, f"{stem}_runs.jsonl"))
    summary = summarize(outcome.rows)
    summary["runs"] = {phase: outcome.status()}
    summary["machine"] = machine()
    write_csv(os.path.join(out_dir, f"{stem}.csv"), outcome.rows)
    write_json(os.path.join(out_dir, f"{stem}.json"), summary)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown(summary))
    return summary
