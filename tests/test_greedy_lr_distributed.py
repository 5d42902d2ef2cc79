"""GreedyLR under torch.distributed: two CPU ranks (gloo, loopback only) fed deliberately different
losses take identical decisions, namely those of one scheduler fed the per-step mean loss."""

import json
import math
import os

import torch

from adaptive_lr.greedy_lr import GreedyLR
from gloo_ranks import WORLD, requires_gloo, run_ranks

pytestmark = requires_gloo

SCHED = dict(factor=0.8, patience=2, cooldown=1, min_lr=1e-4, max_lr=1.0, smooth=True,
             window_size=3)
NONFINITE = {10: (math.nan, 1.0), 20: (1.0, math.inf), 30: (math.inf, -math.inf)}


def _losses(rank):
    """Rank r sees mean[t] + (-1)^r * 3t: rank 0 keeps getting worse, rank 1 keeps improving, and
    their mean improves, stalls and improves again. A few steps are non-finite on one rank."""
    mean = [10.0 - 0.5 * t for t in range(12)] + [4.0] * 14 + [4.0 - 0.2 * t for t in range(14)]
    losses = [m + (-1) ** rank * 3.0 * t for t, m in enumerate(mean)]
    for t, values in NONFINITE.items():
        losses[t] = values[rank]
    return losses


def _run(losses, sync=True):
    opt = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)
    sched = GreedyLR(opt, sync_across_ranks=sync, **SCHED)
    lrs = []
    for loss in losses:
        sched.step(loss)
        lrs.append(sched.get_last_lr()[0])
    return lrs


def _worker(rank, out_dir):
    losses = _losses(rank)
    result = {"synced": _run(losses), "unsynced": _run(losses, sync=False)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_ranks_with_different_losses_apply_identical_lrs(tmp_path):
    run_ranks(_worker, tmp_path, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    per_rank = [_losses(r) for r in range(WORLD)]
    mean = [sum(values) / WORLD for values in zip(*per_rank)]
    expected = _run(mean)  # not distributed here: one scheduler on the mean loss

    assert results[0]["synced"] == results[1]["synced"] == expected
    assert len(set(expected)) > 3  # the mean sequence moved the lr both ways, not a constant
    # Without sync each rank follows its own losses, and those decisions differ.
    for r in range(WORLD):
        assert results[r]["unsynced"] == _run(per_rank[r])
    assert results[0]["unsynced"] != results[1]["unsynced"]
    assert results[0]["unsynced"] != expected and results[1]["unsynced"] != expected
