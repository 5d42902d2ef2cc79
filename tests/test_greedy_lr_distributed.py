"""GreedyLR under torch.distributed: two CPU ranks (gloo, loopback only) fed deliberately different
losses take identical decisions, namely those of one scheduler fed the per-step mean loss."""

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_lr.greedy_lr import GreedyLR

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD = 2
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


def _worker(rank, init_file, out_dir):
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:  # keep gloo's transport on the loopback interface
        os.environ["GLOO_SOCKET_IFNAME"] = loopback[0]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        losses = _losses(rank)
        result = {"synced": _run(losses), "unsynced": _run(losses, sync=False)}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_ranks_with_different_losses_apply_identical_lrs(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
             join=True)
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
