"""What the sign test costs: ActiveAdamW's step on the fused cpu backend, 10M float32 elements in
4 tensors, mid-epoch and at an epoch boundary (steps_per_epoch=1: every step compares signs),
with the paper's rule (sign_threshold=0) and the default sign test (2). Interleaved rounds of 3
steps each, median ms per step (docs/step_time.md, "The sign test").

    .venv/bin/python bench/boundary_step.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from adaptive_lr import ActiveAdamW

NUMEL, TENSORS = 10_000_000, 4


def _optimizer(sign_threshold: float, steps_per_epoch: int) -> ActiveAdamW:
    params = [torch.randn(NUMEL // TENSORS, requires_grad=True) for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        # one step per epoch is too short for the sign test to count a sign (it warns so): the
        # gains stay 1, but every step runs the boundary's code, which is what this times
        warnings.simplefilter("ignore", UserWarning)
        opt = ActiveAdamW(params, steps_per_epoch=steps_per_epoch, sign_threshold=sign_threshold,
                          backend="cpu")
    for _ in range(3):  # state created, the first (roll-over) boundary passed
        opt.step()
    return opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cases = {(k, spe): _optimizer(k, spe) for k in (0.0, 2.0) for spe in (1, 10**9)}
    times = {case: [] for case in cases}
    for _ in range(rounds):
        for case, opt in cases.items():
            start = time.perf_counter()
            for _ in range(3):
                opt.step()
            times[case].append((time.perf_counter() - start) / 3 * 1e3)
    for (k, spe), samples in times.items():
        kind = "boundary" if spe == 1 else "mid-epoch"
        print(f"{kind:>9} step, sign_threshold={k}: {statistics.median(samples):.2f} ms")


if __name__ == "__main__":
    main()
