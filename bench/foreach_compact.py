"""The foreach backend's compact step against its full-state step (docs/step_time.md, "The
foreach backend's compact step"): ActiveAdamW and ActiveSGD on the same params, interleaved
rounds, median wall time and process CPU time per step (CPU time is steadier on a shared
machine), their ratio, and the memory one step adds (adaptive_lr.benchmark.step_extra_memory,
median of 3). ``--before REV`` also steps that git revision's foreach backend (its foreach.py
and rounding.py, loaded beside this one) in the same rounds.

    .venv/bin/python bench/foreach_compact.py --sizes 10M resnet50 --before a0af274
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from adaptive_lr import ActiveAdamW, ActiveSGD
from adaptive_lr.backends import foreach
from adaptive_lr.benchmark import make_tensors, size_of, step_extra_memory
from adaptive_lr.model_shapes import MODELS

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(f"adaptive_lr.backends.{name}")
    module.__package__ = "adaptive_lr.backends"
    exec(compile(source, f"{name}.py", "exec"), module.__dict__)
    return module


def backend_at(rev: str):
    """The step function of revision ``rev``'s foreach backend, with that revision's rounding."""
    def show(path):
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
    sys.modules["adaptive_lr.backends.rounding_at_rev"] = _module(
        "rounding_at_rev", show("adaptive_lr/backends/rounding.py"))
    source = show("adaptive_lr/backends/foreach.py").replace(
        "from .rounding import", "from .rounding_at_rev import")
    return _module("foreach_at_rev", source).step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10M"])
    parser.add_argument("--layouts", nargs="+", default=["4"], choices=["4", "200"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--before", metavar="REV", help="also step this revision's backend")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {"": foreach.step}
    if args.before:
        steps[f" ({args.before})"] = backend_at(args.before)

    def step(opt, fn):
        foreach.step = fn  # backends.resolve looks the step up at every step
        try:
            opt.step()
        finally:
            foreach.step = steps[""]

    print("| size | tensors | dtype | optimizer | full ms | compact ms | ratio | full CPU ms "
          "| compact CPU ms | CPU ratio | full extra MiB | compact extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for layout in [size] if size in MODELS else args.layouts:
            for dtype in args.dtypes:
                params = make_tensors(size_of(size), layout, getattr(torch, dtype))
                for cls in (ActiveAdamW, ActiveSGD):
                    runs = {(tag, precision): (cls(
                        params, lr=1e-4, steps_per_epoch=10**9, backend="foreach",
                        state_precision=precision), fn)
                        for tag, fn in steps.items() for precision in ("full", "compact")}
                    for opt, fn in runs.values():  # state created
                        step(opt, fn)
                    wall = {case: [] for case in runs}
                    cpu = {case: [] for case in runs}
                    for _ in range(args.rounds):
                        for case, (opt, fn) in runs.items():
                            for _ in range(args.steps_per_round):
                                start, start_cpu = time.perf_counter(), time.process_time()
                                step(opt, fn)
                                cpu[case].append(time.process_time() - start_cpu)
                                wall[case].append(time.perf_counter() - start)
                    extra = {case: statistics.median(  # the high-water mark is noisy
                        step_extra_memory(lambda: step(opt, fn)) for _ in range(3)) / 2**20
                        for case, (opt, fn) in runs.items()}
                    for tag in steps:
                        full, compact = (tag, "full"), (tag, "compact")
                        w = [statistics.median(wall[c]) * 1e3 for c in (full, compact)]
                        c = [statistics.median(cpu[c]) * 1e3 for c in (full, compact)]
                        print(f"| {size} | {layout} | {dtype} | {cls.__name__}{tag} | {w[0]:.1f} | "
                              f"{w[1]:.1f} | {w[1] / w[0]:.2f}× | {c[0]:.1f} | {c[1]:.1f} | "
                              f"{c[1] / c[0]:.2f}× | {extra[full]:.1f} | {extra[compact]:.1f} |",
                              flush=True)
                    del runs


if __name__ == "__main__":
    main()
